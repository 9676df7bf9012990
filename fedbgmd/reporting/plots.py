"""Matplotlib figures for one run (plot_run) and for a sweep report (plot_comparison).

Headless: the Agg backend is selected here, and figures are built with ``matplotlib.figure.Figure``
(no pyplot global state), so plotting is safe from a server thread and leaks no figures.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedbgmd.reporting.summary import is_missing
from fedbgmd.reporting.writer import PARTITIONS_JSON, read_metrics, read_summary

__all__ = ["Curve", "plot_comparison", "plot_partitions", "plot_run"]

_DPI = 120


def _series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) arrays over the rows where both are present and finite."""
    xs: list[float] = []
    ys: list[float] = []
    for r in rows:
        xv, yv = r.get(x), r.get(y)
        if is_missing(xv) or is_missing(yv):
            continue
        xf, yf = float(xv), float(yv)  # type: ignore[arg-type]
        if math.isfinite(xf) and math.isfinite(yf):
            xs.append(xf)
            ys.append(yf)
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def _two_panel(
    rows: Sequence[dict[str, Any]],
    series: Sequence[tuple[str, str]],
    ylabel: str,
    title: str,
    path: Path,
    scale: float = 1.0,
) -> Path:
    """Panels vs round and vs wall-clock seconds; one line per (column, label) in series."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, xcol, xlabel in (
        (axes[0], "round", "round"),
        (axes[1], "wall_time_s", "wall-clock time (s)"),
    ):
        drawn = False
        for col, label in series:
            xs, ys = _series(rows, xcol, col)
            if xs.size:
                ax.plot(xs, ys * scale, marker="." if xs.size < 50 else None, label=label)
                drawn = True
        if drawn:
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if len(series) > 1:
                ax.legend()
        else:
            _no_data(ax, ylabel.lower())
    fig.suptitle(title)
    return _save(fig, path)


_DIAGNOSTICS: tuple[tuple[str, str, bool], ...] = (
    ("agg_iterations", "aggregator iterations", False),
    ("memory_norm", "memory norm ‖m‖", False),
    ("relative_residual", "relative residual", True),
    ("bytes_up", "bytes up", False),
)
_COUNTS = frozenset({"agg_iterations", "bytes_up"})  # integer ticks (no "2.5 iterations")


def run_title(run_dir: Path | str) -> str:
    """What ran, for plot titles: strategy, attack with ψ, seed (the folder name is a time)."""
    run_dir = Path(run_dir)
    try:
        s = read_summary(run_dir)
    except (OSError, ValueError):
        return run_dir.name
    attack = s.get("attack")
    fraction = s.get("fraction")
    hostile = (
        f"{attack} ψ={float(fraction or 0):g}" if attack not in (None, "none") else "no attack"
    )
    return f"{s.get('strategy')}, {hostile}, seed {s.get('seed')} ({run_dir.name})"


def diagnostic_panels(run_dir: Path | str) -> list[str]:
    """The diagnostics worth a panel: logged, and not the same value every round (a flat line
    says nothing; bytes up is constant without quantization or dropouts)."""
    rows = read_metrics(Path(run_dir))
    return [c for c, _, _ in _DIAGNOSTICS if _varies(_series(rows, "round", c)[1])]


def _varies(ys: np.ndarray) -> bool:
    return ys.size > 0 and bool(np.ptp(ys) > 0)


def plot_partitions(run_dir: Path | str) -> Path:
    """Write partitions.png: each client's samples stacked by class, from partitions.json.

    Why: whether a split is iid, Dirichlet-skewed or a few classes per client shows at a glance.
    """
    run_dir = Path(run_dir)
    report = json.loads((run_dir / PARTITIONS_JSON).read_text(encoding="utf-8"))
    counts = np.asarray(report["class_counts"], dtype=float).reshape(len(report["sizes"]), -1)
    num_parts, num_classes = counts.shape
    fig = Figure(figsize=(min(12.0, 3.0 + 0.25 * num_parts), 3.6))
    ax = fig.subplots()
    xs = np.arange(num_parts)
    bottom = np.zeros(num_parts)
    cmap = matplotlib.colormaps["tab20" if num_classes > 10 else "tab10"]
    for c in range(num_classes):
        ax.bar(xs, counts[:, c], bottom=bottom, width=0.85, color=cmap(c % cmap.N), label=str(c))
        bottom += counts[:, c]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training samples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = str(report.get("partitioner", "")).rpartition(".")[2]
    params = ", ".join(f"{k}={v}" for k, v in report.get("params", {}).items())
    left = f"; {report['unassigned']} of {report['num_samples']} samples unassigned"
    ax.set_title(f"{name}({params})" + (left if report.get("unassigned") else ""), fontsize=9)
    if num_classes <= 20:
        ax.legend(
            title="class",
            fontsize=7,
            title_fontsize=7,
            ncol=2,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
    return _save(fig, run_dir / "partitions.png")


def plot_run(run_dir: Path | str) -> list[Path]:
    """Write accuracy.png, loss.png and diagnostics.png into run_dir; return their paths.

    Reads run_dir/metrics.csv. Missing values are skipped; an all-empty column leaves its panel
    out (or, when nothing at all is logged, a 'no data' placeholder is drawn).
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    title = run_title(run_dir)
    out = [
        _two_panel(
            rows,
            [("test_accuracy", "test")],
            "Accuracy (%)",
            f"Test accuracy — {title}",
            run_dir / "accuracy.png",
            scale=100.0,
        ),
        _two_panel(
            rows,
            [("test_loss", "test"), ("train_loss", "train")],
            "Loss",
            f"Loss — {title}",
            run_dir / "loss.png",
        ),
    ]
    shown = diagnostic_panels(run_dir)
    present = [(c, lbl, log) for c, lbl, log in _DIAGNOSTICS if c in shown]
    fig = Figure(figsize=(4.5 * max(1, len(present)), 3.8))
    if present:
        axes = np.atleast_1d(fig.subplots(1, len(present)))
        for ax, (col, label, log) in zip(axes, present):
            xs, ys = _series(rows, "round", col)
            ax.plot(xs, ys, marker="." if xs.size < 50 else None)
            if log and np.all(ys > 0):
                ax.set_yscale("log")
            if col in _COUNTS:
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
            ax.set_title(label)
            ax.grid(True, alpha=0.3)
    else:
        _no_data(fig.subplots(1, 1), "diagnostics that change")
    fig.suptitle(f"Diagnostics — {title}")
    out.append(_save(fig, run_dir / "diagnostics.png"))
    return out


@dataclass
class Curve:
    """One setting's aggregated curve: mean ± std over seeds, aligned by round."""

    label: str
    rounds: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    time: np.ndarray  # mean wall_time_s at each round (NaN where unknown)
    n: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))  # runs per round
    panel: str = ""  # curves with the same panel share a subplot
    color_key: str = ""  # curves with the same key get the same colour in every panel (or label)
    epoch: np.ndarray | None = None  # mean epoch at each round (NaN where unknown)


_X_LABELS = {"round": "round", "time": "wall-clock time (s)", "epoch": "epoch"}


def _x_values(c: Curve, x: str) -> np.ndarray:
    if x == "round":
        return c.rounds.astype(float)
    values = c.time if x == "time" else c.epoch
    if values is None or len(values) != len(c.rounds):
        return np.full(len(c.rounds), np.nan)
    return np.asarray(values, dtype=float)


def plot_comparison(
    curves: Sequence[Curve],
    path: Path | str,
    x: Literal["round", "time", "epoch"] = "round",
    ylabel: str = "Test accuracy (%)",
    title: str = "",
) -> Path:
    """Mean curve per setting with a ±std band; one subplot per distinct ``Curve.panel``.

    ``x``: round number, mean wall-clock time (``Curve.time``) or mean epoch (``Curve.epoch``).
    """
    if x not in _X_LABELS:
        raise ValueError(f"x must be one of {sorted(_X_LABELS)}, not {x!r}")
    path = Path(path)
    panels: list[str] = []
    for c in curves:
        if c.panel not in panels:
            panels.append(c.panel)
    if not panels:
        panels = [""]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.6 * ncols, 4.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    colors: dict[str, str] = {}  # one colour per colour key, the same in every panel
    for c in curves:
        colors.setdefault(c.color_key or c.label, f"C{len(colors) % 10}")
    for ax, panel in zip(axes, panels):
        drawn = False
        for c in (c for c in curves if c.panel == panel):
            xs = _x_values(c, x)
            ok = np.isfinite(xs) & np.isfinite(c.mean)
            if not ok.any():
                continue
            # by x: a mean wall-clock time need not grow with the round when runs drop out
            order = np.argsort(xs[ok], kind="stable")
            xs, mean = xs[ok][order], c.mean[ok][order]
            std = np.nan_to_num(c.std[ok][order], nan=0.0)
            color = colors[c.color_key or c.label]
            ax.plot(xs, mean, label=textwrap.fill(c.label, 38), color=color)
            ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.2)
            drawn = True
        if drawn:
            ax.set_xlabel(_X_LABELS[x])
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="x-small")
        else:
            _no_data(ax, "curves")
        if panel:
            ax.set_title(textwrap.fill(panel, 60), fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
