"""The runs below a sweep folder and their grouping by setting.

``collect_runs`` finds every summary.json below a folder (a Hydra multirun, a fused sweep, any
tree of run folders) and reads each run's setting (:mod:`fedbgmd.reporting.setting`);
``group_runs`` groups the runs by setting, seed apart, so that a group's completed runs are the
seeds of one setting. Runs are only read, never modified. Plain python.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbgmd.reporting.setting import (
    CLEAN_ATTACKS,
    NO_OUTCOME_KEYS,
    hashable,
    outcome_config,
    recorded_setting,
    splitting_keys,
)
from fedbgmd.reporting.writer import METRICS_CSV, SUMMARY_JSON, read_metrics

__all__ = ["Group", "NoRunsFoundError", "Run", "collect_runs", "group_runs"]


class NoRunsFoundError(FileNotFoundError):
    """No summary.json below the sweep folder."""


def num(v: object) -> float | None:
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
        return num(self.summary.get("diverged_at")) is not None

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
            e = num(r.get("epoch"))
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
                key = run_key(r)
                if key not in latest or finished_at(r) >= finished_at(latest[key]):
                    latest[key] = r
        return [r for r in self.runs if r.completed and latest[run_key(r)] is r]

    @property
    def failed(self) -> list[Run]:
        """Failed runs whose seed and setting have no completed run (a failed try that was
        rerun successfully is not a failure of the cell)."""
        done = {run_key(r) for r in self.runs if r.completed}
        return [r for r in self.runs if not r.completed and run_key(r) not in done]

    @property
    def repeats(self) -> int:
        """Runs not counted: completed repeats of a seed and failed tries that were rerun."""
        return len(self.runs) - len(self.completed) - len(self.failed)


def run_key(r: Run) -> str:
    return json.dumps([r.summary.get("seed"), r.setting], sort_keys=True, default=str)


def finished_at(r: Run) -> str:
    return str(r.summary.get("finished_at") or "")


def is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def natural_key(path: Path) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.parts]


def collect_runs(
    root: Path | str, exclude: Path | None = None
) -> tuple[list[Run], list[tuple[Path, str]]]:
    """All runs below root (folders holding summary.json), plus (folder, reason) for the folders
    that could not be read or hold metrics.csv without summary.json (killed runs)."""
    root = Path(root)
    runs: list[Run] = []
    problems: list[tuple[Path, str]] = []
    summaries = sorted(root.rglob(SUMMARY_JSON), key=natural_key)
    for p in summaries:
        if exclude is not None and is_within(p, exclude):
            continue
        try:
            with p.open(encoding="utf-8") as fh:
                summary = json.load(fh)
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append((p.parent, f"unreadable summary.json: {exc}"))
            continue
        runs.append(Run(path=p.parent, summary=summary, setting=recorded_setting(summary)))
    with_summary = {p.parent.resolve() for p in summaries}
    for m in sorted(root.rglob(METRICS_CSV), key=natural_key):
        if exclude is not None and is_within(m, exclude):
            continue
        if m.parent.resolve() not in with_summary:
            problems.append((m.parent, "metrics.csv without summary.json (run killed?)"))
    return runs, problems


def sort_value(v: Any) -> tuple[int, Any]:
    if v is None:
        return (0, "")
    if isinstance(v, str) and v.lower() in CLEAN_ATTACKS:
        return (1, v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (2, float(v))
    return (3, str(v))


def group_runs(runs: Sequence[Run], group_by: Sequence[str] | None = None) -> list[Group]:
    """Group runs by group_by keys (default: their settings, seed apart), sorted by setting."""
    if group_by:
        keys = list(group_by)
    else:
        keys = []
        for r in runs:  # the named settings (an old run may have recorded a seed there)
            keys.extend(k for k in r.setting if k not in NO_OUTCOME_KEYS and k not in keys)
        # strategy keys first, then attack keys, then the rest (stable within each class)
        keys.sort(key=lambda k: 0 if is_strategy_key(k) else 1 if is_attack_key(k) else 2)
        # the rest of the setting: any other config value that differs between runs of one named
        # setting (a learning rate, a partition, an aggregator parameter) splits it
        flats = [outcome_config(r.summary.get("config")) for r in runs]
        named = [tuple(hashable(r.value(k)) for k in keys) for r in runs]
        extra = splitting_keys(named, flats)
        for r, flat in zip(runs, flats):
            for k in extra:
                r.setting.setdefault(k, flat.get(k))
        keys += [k for k in extra if k not in keys]
    groups: dict[tuple[Any, ...], Group] = {}
    for r in runs:
        vals = tuple(r.value(k) for k in keys)
        gk = tuple(hashable(v) for v in vals)
        if gk not in groups:
            groups[gk] = Group(setting=dict(zip(keys, vals)))
        groups[gk].runs.append(r)
    return [groups[k] for k in sorted(groups, key=lambda t: tuple(sort_value(v) for v in t))]


def varying_keys(groups: Sequence[Group]) -> list[str]:
    if not groups:
        return []
    keys = list(groups[0].setting)
    return [k for k in keys if len({json.dumps(g.setting.get(k), default=str) for g in groups}) > 1]


def is_strategy_key(k: str) -> bool:
    return k == "strategy" or k.startswith("strategy.")


def is_attack_key(k: str) -> bool:
    return k in ("attack", "fraction") or k.startswith(("attack.", "corruption"))


def key_of(g: Group, ks: Sequence[str]) -> tuple[Any, ...]:
    return tuple(hashable(g.setting.get(k)) for k in ks)


def in_order(ts: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(set(ts), key=lambda t: tuple(sort_value(v) for v in t))
