"""Collect a sweep (e.g. a Hydra multirun folder) into a Table-2-like report and Figs-2-4-like plots.

``fedbgmd report DIR`` -> ``main([DIR, ...])`` -> ``build_report(DIR, ...)``, which finds every
``summary.json`` below DIR, groups runs by their ``setting`` minus ``seed`` (or by --group-by keys),
and writes into --out (default DIR/report/):

- ``report.md``: one table row per setting (mean ± std over seeds, sample std ddof=1, n shown),
  a strategy x (attack, fraction) pivot like Table 2 when the sweep varies those, the failed runs;
- ``report.csv``: one row per setting;
- ``compare_accuracy_round.png`` / ``compare_accuracy_time.png``: mean test accuracy ± std per
  setting vs round and vs wall-clock time, one subplot per attack setting when there are several.

Runs are only read, never modified. Accuracies in summaries/metrics are fractions in [0, 1] and are
reported in %. Plain python + numpy (+ matplotlib through fedbgmd.plots).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbgmd.results import (
    METRICS_CSV,
    SUMMARY_JSON,
    is_missing,
    read_metrics,
    utc_now_iso,
)

__all__ = [
    "Group",
    "NoRunsFoundError",
    "Run",
    "build_report",
    "collect_runs",
    "group_runs",
    "main",
    "mean_std",
]

EXCLUDED_SETTING_KEYS: frozenset[str] = frozenset({"seed"})
_CLEAN_ATTACKS = ("none", "clean", "no_attack", "null", "")


class NoRunsFoundError(FileNotFoundError):
    """No summary.json below the sweep folder."""


@dataclass
class Run:
    path: Path  # the run folder
    summary: dict[str, Any]
    setting: dict[str, Any]
    metrics: list[dict[str, Any]] | None = None  # loaded lazily

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "completed")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def value(self, key: str) -> Any:
        """A setting value, falling back to the summary's top-level field of the same name."""
        if key in self.setting:
            return self.setting[key]
        return self.summary.get(key)

    def rows(self) -> list[dict[str, Any]]:
        if self.metrics is None:
            self.metrics = read_metrics(self.path)
        return self.metrics


@dataclass
class Group:
    setting: dict[str, Any]  # group key -> value
    runs: list[Run] = field(default_factory=list)

    @property
    def completed(self) -> list[Run]:
        """Completed runs, one per (seed, full setting): a sweep that runs the same setting twice
        (e.g. attack=none at two fractions, which draws no Byzantine client either way) counts
        it once, so n and the std are over distinct runs."""
        seen: set[str] = set()
        out = []
        for r in self.runs:
            key = json.dumps([r.summary.get("seed"), r.setting], sort_keys=True, default=str)
            if r.completed and key not in seen:
                seen.add(key)
                out.append(r)
        return out

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if not r.completed]


# ---------------------------------------------------------------------------------------------
# statistics


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof=1; 0.0 for a single value) and count over the non-missing values."""
    xs = [float(v) for v in values if not is_missing(v) and math.isfinite(float(v))]  # type: ignore[arg-type]
    if not xs:
        return None, None, 0
    arr = np.asarray(xs, dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def _pct(v: object) -> float | None:
    """Accuracy fraction -> percent. A value above 1 is taken as already in percent."""
    if is_missing(v):
        return None
    f = float(v)  # type: ignore[arg-type]
    return f if f > 1.0 else 100.0 * f


def _mean_agg_time(run: Run) -> float | None:
    m, _, _ = mean_std(r.get("agg_time_s") for r in run.rows())
    return m


def _wall_time(run: Run) -> float | None:
    w = run.summary.get("wall_time_s")
    if is_missing(w):
        ws = [r.get("wall_time_s") for r in run.rows() if not is_missing(r.get("wall_time_s"))]
        w = ws[-1] if ws else None
    return None if w is None else float(w)


def _group_stats(g: Group) -> dict[str, Any]:
    done = g.completed
    fa = mean_std(_pct(r.summary.get("final_accuracy")) for r in done)
    ba = mean_std(_pct(r.summary.get("best_accuracy")) for r in done)
    wt = mean_std(_wall_time(r) for r in done)
    at = mean_std(_mean_agg_time(r) for r in done)
    rd = mean_std(r.summary.get("rounds") for r in done)
    return {
        "n_runs": len(g.runs),
        "n_completed": len(done),
        "n_failed": len(g.failed),
        "seeds": " ".join(str(r.summary.get("seed")) for r in done),
        "final_acc_mean": fa[0],
        "final_acc_std": fa[1],
        "final_acc_n": fa[2],
        "best_acc_mean": ba[0],
        "best_acc_std": ba[1],
        "best_acc_n": ba[2],
        "wall_time_s_mean": wt[0],
        "wall_time_s_std": wt[1],
        "agg_time_s_mean": at[0],
        "agg_time_s_std": at[1],
        "rounds_mean": rd[0],
    }


def _curve(g: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, mean/std accuracy (%), mean wall time and n per round over the completed runs."""
    acc: dict[int, list[float]] = {}
    wall: dict[int, list[float]] = {}
    for run in g.completed:
        for row in run.rows():
            rnd, a, w = row.get("round"), _pct(row.get("test_accuracy")), row.get("wall_time_s")
            if is_missing(rnd) or a is None or not math.isfinite(a):
                continue
            acc.setdefault(int(rnd), []).append(a)  # type: ignore[arg-type]
            if not is_missing(w):
                wall.setdefault(int(rnd), []).append(float(w))  # type: ignore[arg-type]
    rounds = sorted(acc)
    stats = [mean_std(acc[r]) for r in rounds]
    times = [mean_std(wall.get(r, []))[0] for r in rounds]
    return (
        np.asarray(rounds, dtype=int),
        np.asarray([s[0] for s in stats], dtype=float),
        np.asarray([s[1] for s in stats], dtype=float),
        np.asarray([math.nan if t is None else t for t in times], dtype=float),
        np.asarray([s[2] for s in stats], dtype=int),
    )


# ---------------------------------------------------------------------------------------------
# discovery and grouping


def _setting_of(summary: dict[str, Any]) -> dict[str, Any]:
    s = summary.get("setting")
    if isinstance(s, dict) and s:
        return dict(s)
    return {k: summary[k] for k in ("strategy", "attack", "fraction") if k in summary}


def _is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _natural_key(path: Path) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.parts]


def collect_runs(
    root: Path | str, exclude: Path | None = None
) -> tuple[list[Run], list[tuple[Path, str]]]:
    """All runs below root (folders holding summary.json), plus (folder, reason) for the folders
    that could not be read or hold metrics.csv without summary.json (killed runs)."""
    root = Path(root)
    runs: list[Run] = []
    problems: list[tuple[Path, str]] = []
    summaries = sorted(root.rglob(SUMMARY_JSON), key=_natural_key)
    for p in summaries:
        if exclude is not None and _is_within(p, exclude):
            continue
        try:
            with p.open(encoding="utf-8") as fh:
                summary = json.load(fh)
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append((p.parent, f"unreadable summary.json: {exc}"))
            continue
        runs.append(Run(path=p.parent, summary=summary, setting=_setting_of(summary)))
    with_summary = {p.parent.resolve() for p in summaries}
    for m in sorted(root.rglob(METRICS_CSV), key=_natural_key):
        if exclude is not None and _is_within(m, exclude):
            continue
        if m.parent.resolve() not in with_summary:
            problems.append((m.parent, "metrics.csv without summary.json (run killed?)"))
    return runs, problems


def _hashable(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return v


def _sort_value(v: Any) -> tuple[int, Any]:
    if v is None:
        return (0, "")
    if isinstance(v, str) and v.lower() in _CLEAN_ATTACKS:
        return (1, v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (2, float(v))
    return (3, str(v))


def group_runs(runs: Sequence[Run], group_by: Sequence[str] | None = None) -> list[Group]:
    """Group runs by group_by keys (default: every setting key except seed), sorted by setting."""
    if group_by:
        keys = list(group_by)
    else:
        keys = []
        for r in runs:
            keys.extend(k for k in r.setting if k not in EXCLUDED_SETTING_KEYS and k not in keys)
        # strategy keys first, then attack keys, then the rest (stable within each class)
        keys.sort(key=lambda k: 0 if _is_strategy_key(k) else 1 if _is_attack_key(k) else 2)
    groups: dict[tuple[Any, ...], Group] = {}
    for r in runs:
        vals = tuple(r.value(k) for k in keys)
        gk = tuple(_hashable(v) for v in vals)
        if gk not in groups:
            groups[gk] = Group(setting=dict(zip(keys, vals)))
        groups[gk].runs.append(r)
    return [groups[k] for k in sorted(groups, key=lambda t: tuple(_sort_value(v) for v in t))]


def _varying_keys(groups: Sequence[Group]) -> list[str]:
    if not groups:
        return []
    keys = list(groups[0].setting)
    return [k for k in keys if len({json.dumps(g.setting.get(k), default=str) for g in groups}) > 1]


def _is_strategy_key(k: str) -> bool:
    return k == "strategy" or k.startswith("strategy.")


def _is_attack_key(k: str) -> bool:
    return k in ("attack", "fraction") or k.startswith(("attack.", "corruption"))


# ---------------------------------------------------------------------------------------------
# formatting


def _fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {(std or 0.0):.{digits}f}"


def _label(setting: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={_fmt_value(setting.get(k))}" for k in keys)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_md(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _pivot_tables(
    groups: Sequence[Group], stats: Sequence[dict[str, Any]], metric: str
) -> list[str]:
    keys = list(groups[0].setting) if groups else []
    varying = _varying_keys(groups)
    col_keys = [k for k in varying if _is_strategy_key(k)] or [k for k in keys if k == "strategy"]
    row_keys = [k for k in keys if _is_attack_key(k)]
    if len(groups) < 2 or not col_keys or not row_keys:
        return []
    section_keys = [k for k in varying if k not in col_keys and k not in row_keys]
    out: list[str] = [
        f"## Test accuracy (%) by strategy and corruption ({metric}, mean ± std over seeds)",
        "",
        "`-`: no completed run (failed or diverged).",
        "",
    ]

    def key_of(g: Group, ks: Sequence[str]) -> tuple[Any, ...]:
        return tuple(_hashable(g.setting.get(k)) for k in ks)

    def order(ts: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return sorted(set(ts), key=lambda t: tuple(_sort_value(v) for v in t))

    indexed = list(zip(groups, stats))
    for section in order(key_of(g, section_keys) for g in groups):
        members = [(g, s) for g, s in indexed if key_of(g, section_keys) == section]
        if section_keys:
            out += [f"### {_label(dict(zip(section_keys, section)), section_keys)}", ""]
        cols = order(key_of(g, col_keys) for g, _ in members)
        rows = order(key_of(g, row_keys) for g, _ in members)
        cell: dict[tuple[Any, Any], dict[str, Any]] = {
            (key_of(g, row_keys), key_of(g, col_keys)): s for g, s in members
        }
        header = [*row_keys, *(" / ".join(_fmt_value(v) for v in c) for c in cols)]
        body: list[list[str]] = []
        for rk in rows:
            means = [
                cell.get((rk, c), {}).get(f"{metric}_acc_mean") for c in cols if (rk, c) in cell
            ]
            best = max((m for m in means if m is not None), default=None)
            line = [_fmt_value(v) for v in rk]
            for c in cols:
                s = cell.get((rk, c))
                if s is None:
                    line.append("")
                    continue
                m, sd = s[f"{metric}_acc_mean"], s[f"{metric}_acc_std"]
                text = _pm(m, sd)
                if m is not None and m == best and len(cols) > 1:
                    text = f"**{m:.2f}** ± {sd:.2f}"
                line.append(text)
            body.append(line)
        out += [*_md_table(header, body), ""]
    return out


# ---------------------------------------------------------------------------------------------
# report


_CSV_STATS = (
    "n_runs",
    "n_completed",
    "n_failed",
    "seeds",
    "final_acc_mean",
    "final_acc_std",
    "best_acc_mean",
    "best_acc_std",
    "wall_time_s_mean",
    "wall_time_s_std",
    "agg_time_s_mean",
    "agg_time_s_std",
    "rounds_mean",
)


def _write_csv(path: Path, groups: Sequence[Group], stats: Sequence[dict[str, Any]]) -> None:
    keys = list(groups[0].setting) if groups else []
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*keys, *_CSV_STATS])
        for g, s in zip(groups, stats):
            w.writerow(
                [
                    *(
                        "" if g.setting.get(k) is None else _fmt_value(g.setting.get(k))
                        for k in keys
                    ),
                    *("" if s[c] is None else s[c] for c in _CSV_STATS),
                ]
            )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def build_report(
    root: Path | str,
    out_dir: Path | str | None = None,
    group_by: list[str] | None = None,
    metric: str = "final",
) -> Path:
    """Write report.md, report.csv and comparison plots for the runs below root.

    ``metric`` ("final" or "best") picks the accuracy shown in the pivot table.
    Returns the path of report.md. Raises NoRunsFoundError when root holds no summary.json.
    """
    if metric not in ("final", "best"):
        raise ValueError(f"metric must be 'final' or 'best', not {metric!r}")
    root = Path(root)
    if not root.is_dir():
        raise NoRunsFoundError(f"no runs found: {root} is not a directory")
    out = Path(out_dir) if out_dir is not None else root / "report"
    runs, problems = collect_runs(root, exclude=out)
    if not runs:
        raise NoRunsFoundError(
            f"no runs found under {root} (looked for {SUMMARY_JSON} in every subfolder)"
        )
    out.mkdir(parents=True, exist_ok=True)

    groups = group_runs(runs, group_by)
    stats = [_group_stats(g) for g in groups]
    all_keys = list(groups[0].setting)
    varying = _varying_keys(groups)
    shown = varying or all_keys
    common = [k for k in all_keys if k not in varying]
    n_failed = sum(len(g.failed) for g in groups)

    md: list[str] = [
        "# fedbgmd sweep report",
        "",
        f"- sweep: `{root}`",
        f"- generated: {utc_now_iso()}",
        f"- runs: {len(runs)} ({len(runs) - n_failed} completed, {n_failed} failed); "
        f"settings: {len(groups)}",
    ]
    if common:
        md.append("- common to all runs: " + _label(groups[0].setting, common))
    md += [
        "",
        "Mean ± sample std (ddof=1) over the completed runs of each setting; ±0.00 when n=1. "
        "Accuracies in %, agg = mean aggregation time per round.",
        "",
        "## Results per setting",
        "",
    ]
    header = [
        *shown,
        "n",
        "failed",
        "final acc (%)",
        "best acc (%)",
        "wall time (s)",
        "agg/round (ms)",
    ]
    body = []
    for g, s in zip(groups, stats):
        agg_m = None if s["agg_time_s_mean"] is None else 1e3 * s["agg_time_s_mean"]
        agg_s = None if s["agg_time_s_std"] is None else 1e3 * s["agg_time_s_std"]
        body.append(
            [
                *(_fmt_value(g.setting.get(k)) for k in shown),
                str(s["n_completed"]),
                str(s["n_failed"]),
                _pm(s["final_acc_mean"], s["final_acc_std"]),
                _pm(s["best_acc_mean"], s["best_acc_std"]),
                _pm(s["wall_time_s_mean"], s["wall_time_s_std"], 1),
                _pm(agg_m, agg_s, 2),
            ]
        )
    md += [*_md_table(header, body), ""]
    md += _pivot_tables(groups, stats, metric)

    if n_failed:
        md += ["## Failed runs (not averaged)", ""]
        rows = []
        for g in groups:
            for r in g.failed:
                err = str(r.summary.get("error") or "").strip().splitlines()
                msg = (err[-1] if err else "")[:200]
                rows.append([_rel(r.path, root), _label(g.setting, shown), r.status, msg])
        md += [*_md_table(["run", "setting", "status", "error"], rows), ""]
    if problems:
        md += ["## Incomplete or unreadable run folders (not counted)", ""]
        md += [f"- `{_rel(p, root)}`: {why}" for p, why in problems]
        md.append("")

    # comparison plots (lazy import: only plotting selects the Agg backend)
    from fedbgmd.plots import Curve, plot_comparison

    panel_keys = [k for k in varying if _is_attack_key(k)]
    label_keys = [k for k in varying if k not in panel_keys]
    curves = []
    for g in groups:
        rounds, mean, std, time_s, n = _curve(g)
        if rounds.size == 0:
            continue
        curves.append(
            Curve(
                label=_label(g.setting, label_keys) or "all runs",
                rounds=rounds,
                mean=mean,
                std=std,
                time=time_s,
                n=n,
                panel=_label(g.setting, panel_keys),
            )
        )
    figs = [
        plot_comparison(curves, out / "compare_accuracy_round.png", x="round"),
        plot_comparison(curves, out / "compare_accuracy_time.png", x="time"),
    ]
    md += ["## Figures", ""]
    md += [f"![{p.stem}]({p.name})" for p in figs]
    md.append("")

    _write_csv(out / "report.csv", groups, stats)
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return md_path


def main(argv: list[str] | None = None) -> int:
    """CLI: ``fedbgmd report DIR [--out OUT] [--group-by k1,k2] [--metric final|best]``."""
    parser = argparse.ArgumentParser(
        prog="fedbgmd report",
        description="Collect a sweep (folders with summary.json) into report.md/.csv and plots.",
    )
    parser.add_argument("dir", type=Path, help="sweep folder, e.g. multirun/2024-05-01/12-00-00")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default DIR/report)")
    parser.add_argument(
        "--group-by",
        action="append",
        default=None,
        metavar="KEYS",
        help="comma-separated setting keys to group by (default: all setting keys except seed); "
        "repeatable",
    )
    parser.add_argument(
        "--metric",
        choices=("final", "best"),
        default="final",
        help="accuracy shown in the strategy x corruption table (default: final)",
    )
    args = parser.parse_args(argv)
    group_by = (
        [k.strip() for item in args.group_by for k in item.split(",") if k.strip()]
        if args.group_by
        else None
    )
    try:
        path = build_report(args.dir, out_dir=args.out, group_by=group_by, metric=args.metric)
    except NoRunsFoundError as exc:
        print(f"fedbgmd report: {exc}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
