"""Statistics over a group's runs: mean ± sample std over seeds, per-round curves, median
times per round and the GMD/BGMD speed-ups. Accuracies come in as fractions and leave in %.
Plain python + numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbgmd.reporting.runs import Group, Run, in_order, is_strategy_key, key_of, num

__all__ = ["Series", "group_stats", "is_reduced", "mean_std", "pct", "series", "speedups"]

# strategy presets compared by the speed-up ratios (GMD / BGMD)
BGMD_STRATEGY = "fedbgmd"
GMD_STRATEGY = "gm"


def mean_std(values: Iterable[object]) -> tuple[float | None, float | None, int]:
    """Mean, sample std (ddof=1; 0.0 for a single value) and count over the numeric values
    (missing, non-numeric and non-finite values are skipped)."""
    xs = [f for f in (num(v) for v in values) if f is not None]
    if not xs:
        return None, None, 0
    arr = np.asarray(xs, dtype=float)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std, int(arr.size)


def pct(v: object) -> float | None:
    """Accuracy fraction -> percent. A value above 1 is taken as already in percent."""
    f = num(v)
    if f is None:
        return None
    return f if f > 1.0 else 100.0 * f


def is_fused(run: Run) -> bool:
    """A fused sweep's job (docs/fused.md): its time columns are its group's, shared evenly
    among the group's jobs, so they say nothing about its own strategy's cost."""
    return run.summary.get("engine") == "fused"


def mean_agg_time(run: Run) -> float | None:
    if is_fused(run):
        return None
    m, _, _ = mean_std(r.get("agg_time_s") for r in run.rows())
    return m


def wall_time(run: Run) -> float | None:
    w = num(run.summary.get("wall_time_s"))
    if w is None:
        ws = [num(r.get("wall_time_s")) for r in run.rows()]
        ws = [x for x in ws if x is not None]
        w = ws[-1] if ws else None
    return w


# per-round timing columns shown in the timing table: (metrics column, short name)
TIMING_COLUMNS: tuple[tuple[str, str], ...] = (
    ("client_time_s", "client"),
    ("comm_time_s", "comm"),
    ("agg_time_s", "agg"),
    ("round_time_s", "round"),
)


def timing_stats(g: Group) -> dict[str, Any]:
    """Median per-round times (ms) over the rounds >= 1 of the completed runs (round 0 is the
    initial evaluation only), plus client+agg: the gradient + aggregation (+ selection) time."""
    vals: dict[str, list[float]] = {name: [] for _, name in TIMING_COLUMNS}
    vals["client_agg"] = []
    n_rounds = 0
    for run in g.completed:
        if is_fused(run):
            continue
        for row in run.rows():
            rnd = num(row.get("round"))
            if rnd is not None and rnd < 1:
                continue
            got = {name: num(row.get(col)) for col, name in TIMING_COLUMNS}
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


def group_stats(g: Group) -> dict[str, Any]:
    done = g.completed
    fa = mean_std(pct(r.summary.get("final_accuracy")) for r in done)
    ba = mean_std(pct(r.summary.get("best_accuracy")) for r in done)
    wt = mean_std(wall_time(r) for r in done)
    at = mean_std(mean_agg_time(r) for r in done)
    rd = mean_std(r.summary.get("rounds") for r in done)
    epochs = [e for e in (r.last_epoch() for r in done) if e is not None]
    return {
        "n_runs": len(g.runs),
        "n_completed": len(done),
        "n_failed": len(g.failed),
        "n_diverged": sum(r.diverged for r in done),
        # rounds the aggregator refused or that had too few replies: the model did not move
        "n_skipped_rounds": sum(int(num(r.summary.get("skipped_rounds")) or 0) for r in done),
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
        **timing_stats(g),
    }


def is_reduced(s: dict[str, Any]) -> bool:
    """The runs stopped before the reference's epochs ``s['target_epochs']`` (or their epochs
    are unknown); False without a target."""
    target = s.get("target_epochs")
    if target is None:
        return False
    # 1%: a whole number of rounds falls short of whole epochs (117 rounds = 0.998 epochs here)
    lo = s.get("epochs_min")
    return lo is None or lo < target * 0.99


@dataclass
class Series:
    """Per-round mean ± std of one metrics column over a group's completed runs."""

    rounds: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    time: np.ndarray  # mean wall_time_s per round (NaN where unknown)
    epoch: np.ndarray  # mean epoch per round (NaN where unknown)
    n: np.ndarray


def series(
    g: Group,
    column: str,
    value: Callable[[object], float | None] = num,
    carry_diverged: bool = False,
) -> Series:
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
            rnd, v = num(row.get("round")), value(row.get(column))
            if rnd is not None and v is not None:
                pts[int(rnd)] = (v, num(row.get("wall_time_s")), num(row.get("epoch")))
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
    return Series(
        rounds=np.asarray(rounds, dtype=int),
        mean=np.asarray([s[0] for s in stats], dtype=float),
        std=np.asarray([s[1] for s in stats], dtype=float),
        time=means(wall, rounds),
        epoch=means(epoch, rounds),
        n=np.asarray([s[2] for s in stats], dtype=int),
    )


def speedups(
    groups: Sequence[Group], stats: Sequence[dict[str, Any]]
) -> list[tuple[dict[str, Any], int, int, dict[str, float | None]]]:
    """(context setting, BGMD group index, GMD group index, GMD/BGMD ratios) for every setting
    other than the strategy keys that has both a `fedbgmd` and a `gm` group."""
    keys = list(groups[0].setting) if groups else []
    if "strategy" not in keys:
        return []
    ctx_keys = [k for k in keys if not is_strategy_key(k)]
    contexts: dict[tuple[Any, ...], dict[str, list[int]]] = {}
    for i, g in enumerate(groups):
        name = str(g.setting.get("strategy"))
        if name in (BGMD_STRATEGY, GMD_STRATEGY):
            by = contexts.setdefault(key_of(g, ctx_keys), {BGMD_STRATEGY: [], GMD_STRATEGY: []})
            by[name].append(i)
    out = []
    for ctx in in_order(contexts):
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
