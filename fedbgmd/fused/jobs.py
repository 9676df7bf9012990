"""Running a sweep's jobs: the fusable ones as lockstep groups (:class:`FusedGroup`), the rest
alone on their configured engine, a failed group's jobs alone or recorded as failed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbgmd.fused.group import FusedGroup
from fedbgmd.fused.grouping import Unfusable, plan_groups

log = logging.getLogger("fedbgmd")


def set_aside_partial(run_dir: Path) -> None:
    """Move an unfinished run's files aside (``<name>.interrupted``) so a new run starts clean."""
    for name in ("metrics.csv", "metrics.jsonl", "summary.json"):
        p = run_dir / name
        if p.exists():
            p.replace(run_dir / f"{name}.interrupted")
            log.warning("%s: an unfinished run's %s moved to %s.interrupted", run_dir, name, name)


def run_jobs(
    jobs: Sequence[tuple[Any, Path]], workers: int | None = None, on_group_failure: str = "alone"
) -> dict[int, int]:
    """Run ``jobs`` [(cfg, run_dir)]: fusable ones in lockstep groups, the rest alone.

    ``workers``: planning processes per group (None: the CPUs but two when the group runs on a
    GPU, at most 16; 0 on a CPU device, where they would compete with the computation).
    ``on_group_failure``: "alone" runs a failed group's jobs alone (nothing lost, at the cost
    of their full length one by one); "fail" records them as failed and leaves their folders as
    the group left them (what a time-boxed GPU run wants).
    Returns {job index: exit status} (0 done, 1 failed), as the CLI reports a single run.
    """
    if on_group_failure not in ("alone", "fail"):
        raise ValueError(f"on_group_failure must be 'alone' or 'fail', got {on_group_failure!r}")
    from fedbgmd.config import to_typed
    from fedbgmd.runner import run as run_alone

    # the engine reads the typed config, converted once; config.yaml and a job that runs alone
    # get the config as composed (what the CLI writes and runs for a single job)
    typed = [to_typed(c) for c, _ in jobs]
    groups, alone = plan_groups(typed)
    status: dict[int, int] = {}
    for i, reason in alone.items():
        log.warning("job %s runs alone: %s", jobs[i][1], reason)
    for group in groups:
        members = [(typed[i], Path(jobs[i][1])) for i in group]
        log.warning("fusing %d jobs into one computation", len(members))
        for i in group:
            from omegaconf import OmegaConf

            run_dir = Path(jobs[i][1])
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(jobs[i][0], resolve=True))
        try:
            fused = None
            while fused is None and group:
                try:
                    fused = FusedGroup(members, workers=workers)
                except Unfusable as err:
                    for k, reason in err.reasons.items():
                        log.warning("job %s runs alone: %s", members[k][1], reason)
                        alone[group[k]] = reason
                    group = [i for k, i in enumerate(group) if k not in err.reasons]
                    members = [m for k, m in enumerate(members) if k not in err.reasons]
            if fused is not None:
                fused.run()
            for i in group:
                status[i] = 0
        except Exception as err:
            # a fault of the fused engine must not cost the sweep its jobs: each runs alone
            log.exception(
                "fused group of %d jobs failed (%s: %s); running its jobs alone",
                len(group),
                type(err).__name__,
                err,
            )
            for i in group:
                if on_group_failure == "fail":
                    status[i] = 1
                    continue
                set_aside_partial(Path(jobs[i][1]))
                alone[i] = "its fused group failed"
    for i in alone:
        status[i] = run_alone(jobs[i][0], Path(jobs[i][1]))
    return status
