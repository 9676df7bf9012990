"""Collect a sweep (e.g. a Hydra multirun folder) into a Table-2-like report and Figs-2-4-like plots.

``fedbgmd report DIR`` -> ``main([DIR, ...])`` -> ``build_report(DIR, ...)``, which finds every
``summary.json`` below DIR, groups runs by their ``setting`` minus ``seed`` (or by --group-by keys),
and writes into --out (default DIR/report/):

- ``report.md``: one table row per setting (mean ± std over seeds, sample std ddof=1, n shown),
  a strategy x (attack, fraction) pivot like Table 2 when the sweep varies those (each cell: mean ±
  std, n, epochs actually run, diverged runs, and with --reference the seed paper's number), a
  per-round timing table with BGMD-vs-GMD speed-ups, the relative-residual summary, the failed runs;
- ``report.csv``: one row per setting; ``timing.csv``: median time per round per setting and the
  GMD/BGMD speed-up ratios;
- ``compare_accuracy_round.png`` / ``compare_accuracy_time.png`` / ``compare_accuracy_epoch.png``:
  mean test accuracy ± std per setting vs round, wall-clock time and epoch, one subplot per attack
  setting when there are several;
- ``residual_epoch.png``: mean relative residual ||G − C_k(G)||²/||G||² vs epoch per setting that
  logs it (BGMD runs); not written (a line in report.md says so) when no run logs it.

``--reference FILE.csv`` (columns strategy, attack, fraction, accuracy_pct, epochs, optional
std_pct; e.g. benchmarks/table2_reference.csv) adds the seed's number to the matching pivot cells and
marks cells whose runs stopped before the reference's epochs as reduced-budget ("1.0/50 ep").

Runs are only read, never modified. Accuracies in summaries/metrics are fractions in [0, 1] and are
reported in %. Plain python + numpy (+ matplotlib through fedbgmd.plots).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbgmd.results import (
    METRICS_CSV,
    SUMMARY_JSON,
    read_metrics,
    setting_from_config,
    utc_now_iso,
)

__all__ = [
    "REFERENCE_COLUMNS",
    "Group",
    "NoRunsFoundError",
    "RefCell",
    "ReferenceFileError",
    "Run",
    "build_report",
    "collect_runs",
    "group_runs",
    "load_reference",
    "main",
    "mean_std",
]

EXCLUDED_SETTING_KEYS: frozenset[str] = frozenset({"seed"})
# config keys that do not change what a run learns: never a reason to tell two runs apart
_NO_OUTCOME_KEYS = (
    "seed",
    "engine",
    "device",
    "plots",
    "progress",
    "resume",
    "eval_every",
    "checkpoint_every",
    "checkpoint_last",
    "eval_batch_size",
    "data.root",
    "data.download",
)
_CLEAN_ATTACKS = ("none", "clean", "no_attack", "null", "")

# strategy presets compared by the speed-up ratios (GMD / BGMD)
BGMD_STRATEGY = "fedbgmd"
GMD_STRATEGY = "gm"

# setting keys that only set the budget: a pivot cell shows the epochs reached instead
_BUDGET_KEYS: frozenset[str] = frozenset({"num_rounds"})

REFERENCE_COLUMNS: tuple[str, ...] = ("strategy", "attack", "fraction", "accuracy_pct", "epochs")
REFERENCE_OPTIONAL_COLUMNS: tuple[str, ...] = ("std_pct",)


class NoRunsFoundError(FileNotFoundError):
    """No summary.json below the sweep folder."""


class ReferenceFileError(ValueError):
    """The --reference CSV cannot be read or has the wrong columns/values."""


def _num(v: object) -> float | None:
    """A finite float, or None for missing, non-numeric or non-finite values."""
    if v is None or isinstance(v, (dict, list)):
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class Run:
    path: Path  # the run folder
    summary: dict[str, Any]
    setting: dict[str, Any]
    metrics: list[dict[str, Any]] | None = None  # loaded lazily
    read_error: str | None = None  # set when metrics.csv could not be read

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "completed")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def diverged(self) -> bool:
        """The server flagged a non-finite global model (summary ``diverged_at``)."""
        return _num(self.summary.get("diverged_at")) is not None

    def value(self, key: str) -> Any:
        """A setting value, falling back to the summary's top-level field of the same name."""
        if key in self.setting:
            return self.setting[key]
        return self.summary.get(key)

    def rows(self) -> list[dict[str, Any]]:
        if self.metrics is None:
            try:
                self.metrics = read_metrics(self.path)
            except (OSError, ValueError, csv.Error) as exc:  # UnicodeDecodeError is a ValueError
                self.metrics = []
                self.read_error = f"unreadable {METRICS_CSV}: {exc}"
        return self.metrics

    def last_epoch(self) -> float | None:
        """The last logged epoch value (the budget this run actually reached)."""
        out = None
        for r in self.rows():
            e = _num(r.get("epoch"))
            if e is not None:
                out = e
        return out


@dataclass
class Group:
    setting: dict[str, Any]  # group key -> value
    runs: list[Run] = field(default_factory=list)

    @property
    def completed(self) -> list[Run]:
        """Completed runs, one per (seed, full setting): a sweep that runs the same setting twice
        (e.g. attack=none at two fractions, which draws no Byzantine client either way) counts
        it once, so n and the std are over distinct runs."""
        latest: dict[str, Run] = {}
        for r in self.runs:  # of repeats, the last to finish (a rerun replaces its earlier try)
            if r.completed:
                key = _run_key(r)
                if key not in latest or _finished(r) >= _finished(latest[key]):
                    latest[key] = r
        return [r for r in self.runs if r.completed and latest[_run_key(r)] is r]

    @property
    def failed(self) -> list[Run]:
        """Failed runs whose seed and setting have no completed run (a failed try that was
        rerun successfully is not a failure of the cell)."""
        done = {_run_key(r) for r in self.runs if r.completed}
        return [r for r in self.runs if not r.completed and _run_key(r) not in done]

    @property
    def repeats(self) -> int:
        """Runs not counted: completed repeats of a seed and failed tries that were rerun."""
        return len(self.runs) - len(self.completed) - len(self.failed)


def _run_key(r: Run) -> str:
    return json.dumps([r.summary.get("seed"), r.setting], sort_keys=True, default=str)


def _finished(r: Run) -> str:
    return str(r.summary.get("finished_at") or "")


# ---------------------------------------------------------------------------------------------
# reference numbers (the seed paper's table)

CellKey = tuple[str, str, float]  # (strategy, attack, fraction)


@dataclass(frozen=True)
class RefCell:
    """One number of the reference table, e.g. the seed's BGMD accuracy under 20 % bit flips."""

    strategy: str
    attack: str
    fraction: float
    accuracy_pct: float
    epochs: float
    std_pct: float | None = None

    @property
    def key(self) -> CellKey:
        return _cell_key(self.strategy, self.attack, self.fraction)


def _is_clean(attack: object) -> bool:
    return str(attack).strip().lower() in _CLEAN_ATTACKS


def _cell_key(strategy: object, attack: object, fraction: float | None) -> CellKey:
    """Clean cells (attack none) match whatever fraction is recorded: nobody is Byzantine."""
    if _is_clean(attack):
        return (str(strategy).strip(), "none", 0.0)
    return (str(strategy).strip(), str(attack).strip(), round(float(fraction or 0.0), 6))


def load_reference(path: Path | str) -> dict[CellKey, RefCell]:
    """Read a reference CSV (REFERENCE_COLUMNS, optional std_pct) into cells keyed by
    (strategy, attack, fraction). Raises ReferenceFileError naming the file (and line) on an
    unreadable file, missing or unknown columns, non-numeric values or duplicate cells."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceFileError(f"cannot read reference file {path}: {exc}") from exc
    try:
        lines = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise ReferenceFileError(f"reference file {path} is not valid CSV: {exc}") from exc
    if not lines or not any(c.strip() for c in lines[0]):
        raise ReferenceFileError(f"reference file {path} is empty (no header line)")
    header = [c.strip() for c in lines[0]]
    known = REFERENCE_COLUMNS + REFERENCE_OPTIONAL_COLUMNS
    missing = [c for c in REFERENCE_COLUMNS if c not in header]
    unknown = [c for c in header if c not in known]
    if missing or unknown or len(set(header)) != len(header):
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(unknown)}")
        if len(set(header)) != len(header):
            parts.append("duplicate column names")
        raise ReferenceFileError(
            f"reference file {path}: {'; '.join(parts)} "
            f"(expected {', '.join(REFERENCE_COLUMNS)}, optional {', '.join(REFERENCE_OPTIONAL_COLUMNS)})"
        )
    cells: dict[CellKey, RefCell] = {}
    for lineno, raw in enumerate(lines[1:], start=2):
        if not any(c.strip() for c in raw):
            continue
        if len(raw) != len(header):
            raise ReferenceFileError(
                f"{path}:{lineno}: {len(raw)} fields, the header has {len(header)}"
            )
        rec = {h: c.strip() for h, c in zip(header, raw)}

        def number(col: str, rec: dict[str, str] = rec, lineno: int = lineno) -> float | None:
            if rec.get(col, "") == "":
                return None
            v = _num(rec[col])
            if v is None:
                raise ReferenceFileError(f"{path}:{lineno}: {col}={rec[col]!r} is not a number")
            return v

        fraction, acc, epochs = number("fraction"), number("accuracy_pct"), number("epochs")
        std = number("std_pct") if "std_pct" in rec else None
        if not rec["strategy"] or not rec["attack"]:
            raise ReferenceFileError(f"{path}:{lineno}: strategy and attack must not be empty")
        if acc is None or epochs is None:
            raise ReferenceFileError(
                f"{path}:{lineno}: accuracy_pct and epochs are required "
                "(leave a cell the reference does not give out of the file)"
            )
        if fraction is None:
            if not _is_clean(rec["attack"]):
                raise ReferenceFileError(f"{path}:{lineno}: fraction is required for an attack")
            fraction = 0.0
        if not 0.0 <= acc <= 100.0 or epochs <= 0 or not 0.0 <= fraction < 1.0:
            raise ReferenceFileError(
                f"{path}:{lineno}: out of range (accuracy_pct in [0, 100], epochs > 0, "
                "fraction in [0, 1))"
            )
        cell = RefCell(rec["strategy"], rec["attack"], fraction, acc, epochs, std)
        if cell.key in cells:
            raise ReferenceFileError(f"{path}:{lineno}: duplicate cell {cell.key}")
        cells[cell.key] = cell
    return cells


def _group_cell_key(g: Group) -> CellKey | None:
    """The reference cell a group stands for, when its setting pins strategy, attack, fraction."""
    s = g.setting
    if "strategy" not in s or "attack" not in s:
        return None
    frac = s.get("attack.fraction", s.get("fraction"))
    if not _is_clean(s["attack"]) and _num(frac) is None:
        return None
    return _cell_key(s["strategy"], s["attack"], _num(frac))


# ---------------------------------------------------------------------------------------------
# statistics


def mean_std(values: Iterable[object]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof=1; 0.0 for a single value) and count over the numeric values
    (missing, non-numeric and non-finite values are skipped)."""
    xs = [f for f in (_num(v) for v in values) if f is not None]
    if not xs:
        return None, None, 0
    arr = np.asarray(xs, dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def _pct(v: object) -> float | None:
    """Accuracy fraction -> percent. A value above 1 is taken as already in percent."""
    f = _num(v)
    if f is None:
        return None
    return f if f > 1.0 else 100.0 * f


def _fused(run: Run) -> bool:
    """A fused sweep's job (docs/fused.md): its time columns are its group's, shared evenly
    among the group's jobs, so they say nothing about its own strategy's cost."""
    return run.summary.get("engine") == "fused"


def _mean_agg_time(run: Run) -> float | None:
    if _fused(run):
        return None
    m, _, _ = mean_std(r.get("agg_time_s") for r in run.rows())
    return m


def _wall_time(run: Run) -> float | None:
    w = _num(run.summary.get("wall_time_s"))
    if w is None:
        ws = [_num(r.get("wall_time_s")) for r in run.rows()]
        ws = [x for x in ws if x is not None]
        w = ws[-1] if ws else None
    return w


# per-round timing columns shown in the timing table: (metrics column, short name)
_TIMING_COLUMNS: tuple[tuple[str, str], ...] = (
    ("client_time_s", "client"),
    ("comm_time_s", "comm"),
    ("agg_time_s", "agg"),
    ("round_time_s", "round"),
)


def _timing(g: Group) -> dict[str, Any]:
    """Median per-round times (ms) over the rounds >= 1 of the completed runs (round 0 is the
    initial evaluation only), plus client+agg: the gradient + aggregation (+ selection) time."""
    vals: dict[str, list[float]] = {name: [] for _, name in _TIMING_COLUMNS}
    vals["client_agg"] = []
    n_rounds = 0
    for run in g.completed:
        if _fused(run):
            continue
        for row in run.rows():
            rnd = _num(row.get("round"))
            if rnd is not None and rnd < 1:
                continue
            got = {name: _num(row.get(col)) for col, name in _TIMING_COLUMNS}
            if any(v is not None for v in got.values()):
                n_rounds += 1
            for name, v in got.items():
                if v is not None:
                    vals[name].append(v)
            if got["client"] is not None and got["agg"] is not None:
                vals["client_agg"].append(got["client"] + got["agg"])
    out: dict[str, Any] = {"timing_rounds": n_rounds}
    for name, xs in vals.items():
        out[f"{name}_ms_median"] = 1e3 * float(np.median(xs)) if xs else None
    return out


def _group_stats(g: Group) -> dict[str, Any]:
    done = g.completed
    fa = mean_std(_pct(r.summary.get("final_accuracy")) for r in done)
    ba = mean_std(_pct(r.summary.get("best_accuracy")) for r in done)
    wt = mean_std(_wall_time(r) for r in done)
    at = mean_std(_mean_agg_time(r) for r in done)
    rd = mean_std(r.summary.get("rounds") for r in done)
    epochs = [e for e in (r.last_epoch() for r in done) if e is not None]
    return {
        "n_runs": len(g.runs),
        "n_completed": len(done),
        "n_failed": len(g.failed),
        "n_diverged": sum(r.diverged for r in done),
        # rounds the aggregator refused or that had too few replies: the model did not move
        "n_skipped_rounds": sum(int(_num(r.summary.get("skipped_rounds")) or 0) for r in done),
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
        "epochs_min": min(epochs) if epochs else None,
        "epochs_max": max(epochs) if epochs else None,
        **_timing(g),
    }


@dataclass
class _Series:
    """Per-round mean ± std of one metrics column over a group's completed runs."""

    rounds: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    time: np.ndarray  # mean wall_time_s per round (NaN where unknown)
    epoch: np.ndarray  # mean epoch per round (NaN where unknown)
    n: np.ndarray


def _series(
    g: Group,
    column: str,
    value: Callable[[object], float | None] = _num,
    carry_diverged: bool = False,
) -> _Series:
    """Mean/std over the group's completed runs at each logged round.

    ``carry_diverged`` (for accuracy): a run that diverged stopped early with its model lost, so
    its last value stands for the rest of the rounds the other runs logged — the curve ends at
    the table's mean (diverged runs are in it) instead of jumping up to the survivors' mean — and
    its evaluation at the stopping round, which no other run has, is left out of the curve (a
    mean of one run there drew a spike). It also keeps only the rounds at which every run has a
    value: runs evaluated at different rounds (another ``eval_every``) otherwise alternate in
    the mean, a sawtooth no run shows."""
    per_run: list[tuple[Run, dict[int, tuple[float, float | None, float | None]]]] = []
    for run in g.completed:
        pts: dict[int, tuple[float, float | None, float | None]] = {}
        for row in run.rows():
            rnd, v = _num(row.get("round")), value(row.get(column))
            if rnd is not None and v is not None:
                pts[int(rnd)] = (v, _num(row.get("wall_time_s")), _num(row.get("epoch")))
        per_run.append((run, pts))
    alive = [pts for run, pts in per_run if not run.diverged]
    if carry_diverged and per_run and len(alive) < len(per_run):
        # every run diverged: carry each to the last stopping round (the curve ends at the mean
        # of their final values)
        grid = sorted(set().union(*(alive or [pts for _, pts in per_run])))
        carried = []
        for run, pts in per_run:
            if run.diverged and pts:
                last = max(pts)
                pts = {r: pts[r] for r in grid if r in pts and (alive or r <= last)} | {
                    r: (pts[last][0], None, None) for r in grid if r > last
                }
            carried.append((run, pts))
        per_run = carried
    if carry_diverged and per_run:
        common = set.intersection(*(set(pts) for _, pts in per_run))
        per_run = [(run, {r: v for r, v in pts.items() if r in common}) for run, pts in per_run]
    vals: dict[int, list[float]] = {}
    wall: dict[int, list[float]] = {}
    epoch: dict[int, list[float]] = {}
    for _, pts in per_run:
        for rnd, (v, w, e) in pts.items():
            vals.setdefault(rnd, []).append(v)
            if w is not None:
                wall.setdefault(rnd, []).append(w)
            if e is not None:
                epoch.setdefault(rnd, []).append(e)

    def means(d: dict[int, list[float]], rounds: list[int]) -> np.ndarray:
        ms = [mean_std(d.get(r, []))[0] for r in rounds]
        return np.asarray([math.nan if m is None else m for m in ms], dtype=float)

    rounds = sorted(vals)
    stats = [mean_std(vals[r]) for r in rounds]
    return _Series(
        rounds=np.asarray(rounds, dtype=int),
        mean=np.asarray([s[0] for s in stats], dtype=float),
        std=np.asarray([s[1] for s in stats], dtype=float),
        time=means(wall, rounds),
        epoch=means(epoch, rounds),
        n=np.asarray([s[2] for s in stats], dtype=int),
    )


# ---------------------------------------------------------------------------------------------
# discovery and grouping


def _setting_of(summary: dict[str, Any]) -> dict[str, Any]:
    s = summary.get("setting")
    if isinstance(s, dict) and s:
        return _complete_setting(dict(s), summary.get("config"))
    # no recorded setting: derive it from the saved config rather than group by three keys
    return _complete_setting(
        {k: summary[k] for k in ("strategy", "attack", "fraction") if k in summary},
        summary.get("config"),
    )


def _complete_setting(setting: dict[str, Any], config: Any) -> dict[str, Any]:
    """Fill setting keys that older runs did not record from their saved config (the rules of
    :func:`fedbgmd.results.setting_from_config`), so old and new runs of one setting group
    together and runs that differ there (e.g. the paper vs as_run memory) never merge."""
    if not isinstance(config, dict):
        return setting
    try:
        derived = setting_from_config(config)
    except (TypeError, ValueError):  # a damaged config (e.g. a number that is not one)
        return setting
    for key, value in derived.items():
        setting.setdefault(key, value)
    return setting


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
        # any other config value that differs between runs of one setting (a learning rate, a
        # partition, an aggregator parameter) splits it: such runs must neither be averaged
        # together nor taken for repeats of one another
        flats = [_flat_config(r.summary.get("config")) for r in runs]
        extra = _distinguishing_keys(runs, flats, keys)
        for r, flat in zip(runs, flats):
            for k in extra:
                r.setting.setdefault(k, flat.get(k))
        keys += [k for k in extra if k not in keys]
    groups: dict[tuple[Any, ...], Group] = {}
    for r in runs:
        vals = tuple(r.value(k) for k in keys)
        gk = tuple(_hashable(v) for v in vals)
        if gk not in groups:
            groups[gk] = Group(setting=dict(zip(keys, vals)))
        groups[gk].runs.append(r)
    return [groups[k] for k in sorted(groups, key=lambda t: tuple(_sort_value(v) for v in t))]


def _flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a saved config (leaves only), without the keys in _NO_OUTCOME_KEYS."""
    out: dict[str, Any] = {}
    if not isinstance(config, dict):
        return out
    for k, v in config.items():
        key = f"{prefix}{k}"
        if key in _NO_OUTCOME_KEYS or key.startswith(tuple(f"{x}." for x in _NO_OUTCOME_KEYS)):
            continue
        if isinstance(v, dict) and v:
            out.update(_flat_config(v, key + "."))
        else:
            out[key] = _hashable(v)
    return out


def _distinguishing_keys(
    runs: Sequence[Run], flats: Sequence[dict[str, Any]], keys: Sequence[str]
) -> list[str]:
    """Config keys whose values differ between runs that agree on ``keys`` (``flats``: each
    run's :func:`_flat_config`; a key a run's config lacks, e.g. one added in a later version,
    is not a difference)."""
    by_setting: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r, flat in zip(runs, flats):
        gk = tuple(_hashable(r.value(k)) for k in keys)
        by_setting.setdefault(gk, []).append(flat)
    found: list[str] = []
    for flats in by_setting.values():
        for k in sorted(set().union(*flats)):
            if k not in found and len({f[k] for f in flats if k in f}) > 1:
                found.append(k)
    return found


def _varying_keys(groups: Sequence[Group]) -> list[str]:
    if not groups:
        return []
    keys = list(groups[0].setting)
    return [k for k in keys if len({json.dumps(g.setting.get(k), default=str) for g in groups}) > 1]


def _is_strategy_key(k: str) -> bool:
    return k == "strategy" or k.startswith("strategy.")


def _is_attack_key(k: str) -> bool:
    return k in ("attack", "fraction") or k.startswith(("attack.", "corruption"))


def _key_of(g: Group, ks: Sequence[str]) -> tuple[Any, ...]:
    return tuple(_hashable(g.setting.get(k)) for k in ks)


def _order(ts: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(set(ts), key=lambda t: tuple(_sort_value(v) for v in t))


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


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def _label(setting: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={_fmt_value(setting.get(k))}" for k in keys)


def _curve_label(setting: dict[str, Any], keys: Sequence[str]) -> str:
    """A short plot legend label: the strategy's name, then ``leaf=value`` of the other keys
    (``strategy.block.beta`` -> ``beta``), leaving out unset ones (e.g. beta of a non-block
    strategy)."""
    parts = [
        _fmt_value(setting[k])
        if k == "strategy"
        else f"{k.rsplit('.', 1)[-1]}={_fmt_value(setting[k])}"
        for k in keys
        if setting.get(k) is not None
    ]
    return ", ".join(parts) or "all runs"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_md(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _fmt_epochs(e: float) -> str:
    text = f"{e:.1f}"
    return text if text != "0.0" else f"{e:.2g}"


def _is_reduced(s: dict[str, Any]) -> bool:
    """The runs stopped before the reference's epochs ``s['target_epochs']`` (or their epochs
    are unknown); False without a target."""
    target = s.get("target_epochs")
    if target is None:
        return False
    # 1%: a whole number of rounds falls short of whole epochs (117 rounds = 0.998 epochs here)
    lo = s.get("epochs_min")
    return lo is None or lo < target * 0.99


def _budget(s: dict[str, Any], target: float | None) -> str:
    """'1.0 ep' (no target or full budget) or '1.0/50 ep' (reduced: reached / target epochs)."""
    lo, hi = s.get("epochs_min"), s.get("epochs_max")
    if lo is None or hi is None:
        reached = "?"
    elif _fmt_epochs(lo) == _fmt_epochs(hi):
        reached = _fmt_epochs(lo)
    else:
        reached = f"{_fmt_epochs(lo)}–{_fmt_epochs(hi)}"
    if target is None:
        return "" if reached == "?" else f"{reached} ep"
    if not _is_reduced({**s, "target_epochs": target}):
        return f"{reached} ep"
    return f"{reached}/{target:g} ep"


def _pivot_cell(
    s: dict[str, Any],
    metric: str,
    ref: RefCell | None,
    bold: bool,
    extras: Sequence[str] = (),
) -> str:
    """e.g. '78.12 ± 0.40 (n=3, 1.0/50 ep, diverged in 1/3) · seed 88.42'."""
    # n = the accuracies averaged (a completed run without one does not count)
    m, sd, n = s[f"{metric}_acc_mean"], s[f"{metric}_acc_std"], s[f"{metric}_acc_n"]
    if m is None:
        head = "-"
    elif bold:
        head = f"**{m:.2f}** ± {(sd or 0.0):.2f}"
    else:
        head = _pm(m, sd)
    notes = [f"n={n}"]
    budget = _budget(s, s.get("target_epochs"))
    if budget:
        notes.append(budget)
    if s["n_diverged"]:
        notes.append(f"diverged in {s['n_diverged']}/{n}")
    if s["n_failed"]:
        notes.append(f"{s['n_failed']} failed")
    if s.get("n_skipped_rounds"):
        notes.append(f"{s['n_skipped_rounds']} rounds skipped")
    notes.extend(extras)
    text = f"{head} ({', '.join(notes)})"
    if ref is not None:
        text += f" · seed {ref.accuracy_pct:.2f}"
    return text


def _pivot_tables(
    groups: Sequence[Group],
    stats: Sequence[dict[str, Any]],
    metric: str,
    refs: dict[CellKey, RefCell] | None = None,
    ref_name: str = "",
) -> list[str]:
    """Strategy columns x (attack, fraction) rows, like the seed's Table 2.

    Other strategy keys that take one value per cell (e.g. strategy.block.beta, which differs
    by row in Table 2) are shown inside the cell instead of splitting the column, and a
    num_rounds that differs between cells does not split the table (the cell shows the epochs
    reached)."""
    refs = refs or {}
    keys = list(groups[0].setting) if groups else []
    varying = _varying_keys(groups)
    row_keys = [k for k in keys if _is_attack_key(k)]
    strategy_keys = [k for k in varying if _is_strategy_key(k)]
    col_keys = ["strategy"] if "strategy" in keys else strategy_keys
    folded = [k for k in strategy_keys if k not in col_keys]
    budget_keys = [k for k in varying if k in _BUDGET_KEYS]  # the cell shows the epochs reached
    section_keys = [
        k
        for k in varying
        if not _is_strategy_key(k) and not _is_attack_key(k) and k not in budget_keys
    ]
    if folded or budget_keys:
        per_cell = Counter(
            (_key_of(g, section_keys), _key_of(g, row_keys), _key_of(g, col_keys)) for g in groups
        )
        if any(c > 1 for c in per_cell.values()):  # not one group per cell: split instead
            col_keys, folded = col_keys + folded, []
            section_keys = [k for k in varying if k in section_keys or k in budget_keys]
    if len(groups) < 2 or not col_keys or not row_keys:
        return []
    cell_text = "measured mean ± sample std over seeds (n = completed runs, epochs reached"
    if refs:
        cell_text += f") · seed = the reference's number ({ref_name})"
    else:
        cell_text += ")"
    out: list[str] = [
        f"## Test accuracy (%) by strategy and corruption ({metric}, mean ± std over seeds)",
        "",
        f"Cell: {cell_text}.",
        "",
    ]
    indexed = list(zip(groups, stats))
    for section in _order(_key_of(g, section_keys) for g in groups):
        members = [(g, s) for g, s in indexed if _key_of(g, section_keys) == section]
        if section_keys:
            out += [f"### {_label(dict(zip(section_keys, section)), section_keys)}", ""]
        cols = _order(_key_of(g, col_keys) for g, _ in members)
        rows = _order(_key_of(g, row_keys) for g, _ in members)
        cell: dict[tuple[Any, Any], tuple[Group, dict[str, Any]]] = {
            (_key_of(g, row_keys), _key_of(g, col_keys)): (g, s) for g, s in members
        }
        header = [*row_keys, *(" / ".join(_fmt_value(v) for v in c) for c in cols)]
        body: list[list[str]] = []
        seen = dict.fromkeys(("reduced", "diverged", "failed", "noref", "nodata"), False)
        for rk in rows:
            means = [cell[(rk, c)][1].get(f"{metric}_acc_mean") for c in cols if (rk, c) in cell]
            best = max((m for m in means if m is not None), default=None)
            line = [_fmt_value(v) for v in rk]
            for c in cols:
                if (rk, c) not in cell:
                    # a strategy/attack pair the sweep did not run: show the reference anyway
                    rs = dict(zip(row_keys, rk))
                    frac = rs.get("attack.fraction", rs.get("fraction"))
                    cs = dict(zip(col_keys, c))
                    ref = None
                    if "strategy" in cs and "attack" in rs:
                        ref = refs.get(_cell_key(cs["strategy"], rs["attack"], _num(frac)))
                    line.append(
                        "not run" if ref is None else f"not run · seed {ref.accuracy_pct:.2f}"
                    )
                    continue
                g, s = cell[(rk, c)]
                ck = _group_cell_key(g)
                ref = refs.get(ck) if ck is not None else None
                m = s[f"{metric}_acc_mean"]
                extras = [
                    f"{k.rsplit('.', 1)[-1]}={_fmt_value(g.setting.get(k))}"
                    for k in folded
                    if g.setting.get(k) is not None
                ]
                bold = m is not None and m == best and len(cols) > 1
                line.append(_pivot_cell(s, metric, ref, bold, extras))
                seen["reduced"] |= _is_reduced(s)
                seen["diverged"] |= bool(s["n_diverged"])
                seen["failed"] |= bool(s["n_failed"])
                seen["noref"] |= bool(refs) and ref is None
                seen["nodata"] |= m is None
            body.append(line)
        out += [*_md_table(header, body), ""]
        legend = []
        if seen["reduced"]:
            legend.append(
                "- **`a/b ep` = reduced budget**: the runs reached a epochs where the reference "
                "trained b; their accuracy is not comparable with the seed's number."
            )
        if seen["diverged"]:
            legend.append(
                "- `diverged in k/n`: the global model of k of the n runs became non-finite "
                "(summary `diverged_at`); such runs end near chance (~10 %) and are included in "
                "the mean."
            )
        if seen["failed"]:
            legend.append("- `f failed`: crashed runs, not averaged (see Failed runs).")
        if seen["noref"]:
            legend.append(
                "- no `seed` part: the reference has no number for the cell (the seed's Table 2 "
                "shows `-` where training diverged)."
            )
        if seen["nodata"]:
            legend.append("- `-`: no completed run with an accuracy.")
        out += [*legend, ""]
    return out


def _speedups(
    groups: Sequence[Group], stats: Sequence[dict[str, Any]]
) -> list[tuple[dict[str, Any], int, int, dict[str, float | None]]]:
    """(context setting, BGMD group index, GMD group index, GMD/BGMD ratios) for every setting
    other than the strategy keys that has both a `fedbgmd` and a `gm` group."""
    keys = list(groups[0].setting) if groups else []
    if "strategy" not in keys:
        return []
    ctx_keys = [k for k in keys if not _is_strategy_key(k)]
    contexts: dict[tuple[Any, ...], dict[str, list[int]]] = {}
    for i, g in enumerate(groups):
        name = str(g.setting.get("strategy"))
        if name in (BGMD_STRATEGY, GMD_STRATEGY):
            by = contexts.setdefault(_key_of(g, ctx_keys), {BGMD_STRATEGY: [], GMD_STRATEGY: []})
            by[name].append(i)
    out = []
    for ctx in _order(contexts):
        by = contexts[ctx]
        for i in by[BGMD_STRATEGY]:
            for j in by[GMD_STRATEGY]:
                ratios: dict[str, float | None] = {}
                for name in ("agg", "round", "client_agg"):
                    b, gm = stats[i][f"{name}_ms_median"], stats[j][f"{name}_ms_median"]
                    ratios[name] = gm / b if b is not None and gm is not None and b > 0 else None
                ctx_setting = {k: groups[i].setting.get(k) for k in ctx_keys}
                out.append((ctx_setting, i, j, ratios))
    return out


# ---------------------------------------------------------------------------------------------
# report


_CSV_STATS = (
    "n_runs",
    "n_completed",
    "n_failed",
    "n_diverged",
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
    "epochs_min",
    "epochs_max",
    "ref_accuracy_pct",
    "ref_std_pct",
    "ref_epochs",
    "target_epochs",
    "reduced_budget",
)

_TIMING_CSV = (
    "n_completed",
    "timing_rounds",
    "client_ms_median",
    "comm_ms_median",
    "agg_ms_median",
    "round_ms_median",
    "client_agg_ms_median",
    "agg_speedup_vs_gm",
    "round_speedup_vs_gm",
    "client_agg_speedup_vs_gm",
)


def _write_csv(
    path: Path, groups: Sequence[Group], stats: Sequence[dict[str, Any]], columns: Sequence[str]
) -> None:
    keys = list(groups[0].setting) if groups else []
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*keys, *columns])
        for g, s in zip(groups, stats):
            w.writerow(
                [
                    *(
                        "" if g.setting.get(k) is None else _fmt_value(g.setting.get(k))
                        for k in keys
                    ),
                    *("" if s.get(c) is None else s[c] for c in columns),
                ]
            )


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def _timing_section(
    groups: Sequence[Group], stats: list[dict[str, Any]], shown: Sequence[str]
) -> list[str]:
    """Median per-round times per setting and the GMD/BGMD speed-ups; fills the speed-up
    fields of the BGMD rows in ``stats`` (for timing.csv)."""
    md = [
        "## Time per round (median over rounds ≥ 1 of the completed runs, ms)",
        "",
    ]
    if not any(s["timing_rounds"] for s in stats):
        fused = any(_fused(r) for g in groups for r in g.completed)
        return [
            *md,
            "Skipped: fused runs (hydra/launcher=fused) share one computation; their time "
            "columns are the group's, not their strategy's (docs/fused.md)."
            if fused
            else "Skipped: no run logs client_time_s, comm_time_s, agg_time_s or round_time_s.",
            "",
        ]
    header = [*shown, "n", "rounds", "client", "comm", "agg", "round", "client+agg"]
    body = [
        [
            *(_fmt_value(g.setting.get(k)) for k in shown),
            str(s["n_completed"]),
            str(s["timing_rounds"]),
            *(
                _ms(s[f"{name}_ms_median"])
                for name in ("client", "comm", "agg", "round", "client_agg")
            ),
        ]
        for g, s in zip(groups, stats)
    ]
    md += [*_md_table(header, body), ""]
    md += [
        "client = local training of all clients (summed as logged), comm = serialisation/transport, "
        "agg = aggregation incl. block selection, round = whole round incl. evaluation rounds; "
        "client+agg = gradient + aggregation time, what the seed's speed-up claim counts.",
        "",
        f"### Speed-up of BGMD over GMD (`{GMD_STRATEGY}` / `{BGMD_STRATEGY}` median time per "
        "round; > 1: BGMD faster)",
        "",
    ]
    pairs = _speedups(groups, stats)
    if not pairs:
        return [
            *md,
            f"No setting has both `{BGMD_STRATEGY}` and `{GMD_STRATEGY}` runs: no speed-up ratios.",
            "",
        ]
    ctx_keys = [k for k in pairs[0][0] if k in shown]
    strat_extra = [k for k in shown if _is_strategy_key(k) and k != "strategy"]
    rows = []
    per_bgmd: Counter[int] = Counter(i for _, i, _, _ in pairs)
    for ctx, i, _j, ratios in pairs:
        bg = groups[i]
        rows.append(
            [
                _label(ctx, ctx_keys) or "all runs",
                _label(bg.setting, strat_extra) or BGMD_STRATEGY,
                _ratio(ratios["agg"]),
                _ratio(ratios["round"]),
                _ratio(ratios["client_agg"]),
            ]
        )
        if per_bgmd[i] == 1:  # one GMD to compare with: the CSV row is unambiguous
            for name, v in ratios.items():
                stats[i][f"{name}_speedup_vs_gm"] = v
    md += [*_md_table(["setting", "BGMD", "agg", "round", "client+agg"], rows), ""]
    return md


def _residual_section(
    groups: Sequence[Group], out: Path, shown: Sequence[str]
) -> tuple[list[str], Path | None]:
    """residual_epoch.png and a summary table, or a logged skip when no run logs the residual."""
    from fedbgmd.plots import Curve, plot_comparison

    md = ["## Relative residual ‖G − C_k(G)‖²/‖G‖² (block selection, Lemma 1)", ""]
    with_data = [(g, _series(g, "relative_residual")) for g in groups]
    with_data = [(g, s) for g, s in with_data if s.rounds.size]
    if not with_data:
        return [
            *md,
            "Skipped: no run logs relative_residual (only block strategies such as fedbgmd do); "
            "residual_epoch.png not written.",
            "",
        ], None
    keys = [k for k in _varying_keys([g for g, _ in with_data]) if k in shown] or list(shown)
    curves = []
    rows = []
    for g, s in with_data:
        label = _curve_label(g.setting, keys)
        curves.append(
            Curve(
                label=label,
                rounds=s.rounds,
                mean=s.mean,
                std=s.std,
                time=s.time,
                n=s.n,
                epoch=s.epoch,
            )
        )
        beta = _num(g.setting.get("strategy.block.beta"))
        rows.append(
            [
                _label(g.setting, [k for k in keys if g.setting.get(k) is not None]),
                str(len(g.completed)),
                f"{float(np.mean(s.mean)):.4f}",
                f"{float(s.mean[-1]):.4f}",
                "-" if beta is None else f"{1 - beta:.4f}",
            ]
        )
    path = plot_comparison(
        curves,
        out / "residual_epoch.png",
        x="epoch",
        ylabel="relative residual",
        title="‖G − C_k(G)‖² / ‖G‖² (mean ± std over seeds)",
    )
    if not any(np.isfinite(s.epoch).any() for _, s in with_data):
        md += ["No epoch column logged: residual_epoch.png has no curves.", ""]
    md += [
        *_md_table(["setting", "n", "mean over rounds", "last round", "1 − β"], rows),
        "",
        "Lemma 1 bounds the expected residual by 1 − ξ with ξ ≥ k/d ≈ β (the worst case, "
        "gradients spread evenly over the coordinates).",
        "",
    ]
    return md, path


def build_report(
    root: Path | str,
    out_dir: Path | str | None = None,
    group_by: list[str] | None = None,
    metric: str = "final",
    reference: Path | str | None = None,
) -> Path:
    """Write report.md, report.csv, timing.csv and the plots for the runs below root.

    ``metric`` ("final" or "best") picks the accuracy shown in the pivot table; ``reference`` is
    a CSV of the seed paper's numbers (see load_reference). Returns the path of report.md.
    Raises NoRunsFoundError when root holds no summary.json, ReferenceFileError for a bad
    reference file (before anything is written).
    """
    if metric not in ("final", "best"):
        raise ValueError(f"metric must be 'final' or 'best', not {metric!r}")
    refs = load_reference(reference) if reference is not None else {}
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
    # the budget a cell is held to: its reference's epochs, else (e.g. a cell the seed leaves
    # out because training diverged) the epochs of the reference's cells for the same corruption
    row_epochs: dict[tuple[str, float], set[float]] = {}
    for r in refs.values():
        row_epochs.setdefault(r.key[1:], set()).add(r.epochs)
    matched: set[CellKey] = set()
    for g, s in zip(groups, stats):
        ck = _group_cell_key(g)
        ref = refs.get(ck) if ck is not None else None
        target = ref.epochs if ref is not None else None
        if target is None and ck is not None and len(row_epochs.get(ck[1:], ())) == 1:
            target = next(iter(row_epochs[ck[1:]]))
        s["target_epochs"] = target
        if target is not None:
            s["reduced_budget"] = int(_is_reduced(s))
        if ref is not None:
            matched.add(ref.key)
            s.update(
                ref_accuracy_pct=ref.accuracy_pct, ref_std_pct=ref.std_pct, ref_epochs=ref.epochs
            )
    all_keys = list(groups[0].setting)
    varying = _varying_keys(groups)
    shown = varying or all_keys
    common = [k for k in all_keys if k not in varying]
    n_failed = sum(len(g.failed) for g in groups)
    n_completed = sum(len(g.completed) for g in groups)
    n_repeats = sum(g.repeats for g in groups)
    n_diverged = sum(s["n_diverged"] for s in stats)
    repeats = (
        f", {n_repeats} not counted (repeats of a seed; the last to finish counts)"
        if n_repeats
        else ""
    )

    md: list[str] = [
        "# fedbgmd sweep report",
        "",
        f"- sweep: `{root}`",
        f"- generated: {utc_now_iso()}",
        f"- runs: {len(runs)} ({n_completed} completed, {n_failed} failed, "
        f"{n_diverged} diverged{repeats}); settings: {len(groups)}",
    ]
    n_skipped = sum(s["n_skipped_rounds"] for s in stats)
    if n_skipped:
        md.append(
            f"- **{n_skipped} rounds skipped** in the completed runs (too few replies, or the "
            "aggregator refused them: the model did not move); see each run's metrics.jsonl"
        )
    if common:
        md.append("- common to all runs: " + _label(groups[0].setting, common))
    if reference is not None:
        md.append(
            f"- reference: `{reference}` ({len(refs)} cells, {len(matched)} matched by this sweep)"
        )
    md += [
        "",
        "Mean ± sample std (ddof=1) over the completed runs of each setting; ±0.00 when n=1. "
        "Accuracies in %, epochs = last logged epoch (min–max over runs), "
        "agg = mean aggregation time per round.",
        "",
        "## Results per setting",
        "",
    ]
    header = [
        *shown,
        "n",
        "failed",
        "diverged",
        "epochs",
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
                str(s["n_diverged"]),
                _budget(s, None) or "-",
                _pm(s["final_acc_mean"], s["final_acc_std"]),
                _pm(s["best_acc_mean"], s["best_acc_std"]),
                _pm(s["wall_time_s_mean"], s["wall_time_s_std"], 1),
                _pm(agg_m, agg_s, 2),
            ]
        )
    md += [*_md_table(header, body), ""]
    ref_name = Path(reference).name if reference is not None else ""
    md += _pivot_tables(groups, stats, metric, refs, ref_name)
    unmatched: dict[tuple[str, float], list[RefCell]] = {}
    for k, r in refs.items():
        if k not in matched:
            unmatched.setdefault(k[1:], []).append(r)
    if unmatched:
        n_un = sum(len(v) for v in unmatched.values())
        md += [f"Reference cells with no run in this sweep ({n_un}):", ""]
        md += [
            f"- {attack} {fraction:g}: "
            + ", ".join(f"{r.strategy} {r.accuracy_pct:.2f} ({r.epochs:g} ep)" for r in cells)
            for (attack, fraction), cells in unmatched.items()
        ]
        md.append("")
    md += _timing_section(groups, stats, shown)

    # plots (lazy import: only plotting selects the Agg backend)
    from fedbgmd.plots import Curve, plot_comparison

    res_md, res_path = _residual_section(groups, out, shown)
    md += res_md

    panel_keys = [k for k in varying if _is_attack_key(k)]
    label_keys = [k for k in varying if k not in panel_keys]
    curves = []
    for g in groups:
        acc = _series(g, "test_accuracy", _pct, carry_diverged=True)
        if acc.rounds.size == 0:
            continue
        curves.append(
            Curve(
                label=_curve_label(g.setting, label_keys),
                color_key=str(g.setting.get("strategy", "")),
                rounds=acc.rounds,
                mean=acc.mean,
                std=acc.std,
                time=acc.time,
                n=acc.n,
                panel=_label(g.setting, panel_keys),
                epoch=acc.epoch,
            )
        )
    figs = [
        plot_comparison(curves, out / "compare_accuracy_round.png", x="round"),
        plot_comparison(curves, out / "compare_accuracy_time.png", x="time"),
        plot_comparison(curves, out / "compare_accuracy_epoch.png", x="epoch"),
    ]
    if res_path is not None:
        figs.append(res_path)

    for run in runs:
        if run.read_error:
            problems.append((run.path, run.read_error))
    if n_failed:
        md += ["## Failed runs (not averaged)", ""]
        rows = []
        for g in groups:
            for run in g.failed:
                err = str(run.summary.get("error") or "").strip().splitlines()
                msg = (err[-1] if err else "")[:200]
                rows.append([_rel(run.path, root), _label(g.setting, shown), run.status, msg])
        md += [*_md_table(["run", "setting", "status", "error"], rows), ""]
    if problems:
        md += ["## Incomplete or unreadable run folders (not counted)", ""]
        md += [f"- `{_rel(p, root)}`: {why}" for p, why in problems]
        md.append("")

    md += ["## Figures", ""]
    md += [f"![{p.stem}]({p.name})" for p in figs]
    md.append("")

    _write_csv(out / "report.csv", groups, stats, _CSV_STATS)
    _write_csv(out / "timing.csv", groups, stats, _TIMING_CSV)
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return md_path


def main(argv: list[str] | None = None) -> int:
    """CLI: ``fedbgmd report DIR [--out OUT] [--group-by k1,k2] [--metric final|best]
    [--reference FILE.csv]``."""
    parser = argparse.ArgumentParser(
        prog="fedbgmd report",
        description="Collect a sweep (folders with summary.json) into report.md/.csv, "
        "timing.csv and plots.",
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
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="FILE.csv",
        help="reference numbers to show next to the measured ones (columns: strategy, attack, "
        "fraction, accuracy_pct, epochs[, std_pct]), e.g. benchmarks/table2_reference.csv",
    )
    args = parser.parse_args(argv)
    group_by = (
        [k.strip() for item in args.group_by for k in item.split(",") if k.strip()]
        if args.group_by
        else None
    )
    try:
        path = build_report(
            args.dir,
            out_dir=args.out,
            group_by=group_by,
            metric=args.metric,
            reference=args.reference,
        )
    except NoRunsFoundError as exc:
        print(f"fedbgmd report: {exc}", file=sys.stderr)
        return 1
    except ReferenceFileError as exc:
        print(f"fedbgmd report: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
