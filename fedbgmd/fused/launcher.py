"""``hydra/launcher=fused``: a Hydra launcher that runs a sweep's jobs as fused groups.

``fedbgmd -m <sweep overrides> hydra/launcher=fused`` composes and validates every job as Hydra's
basic launcher does (same run folders ``hydra.sweep.dir/hydra.sweep.subdir`` with their
``.hydra/`` files), then hands all jobs at once to :func:`fedbgmd.fused.run_jobs`, which advances
the jobs that can go in lockstep as one batched computation and runs the others alone.

Re-running an interrupted sweep continues it: a job whose folder holds a completed
``summary.json`` is skipped; a job left without one (interrupted, or failed) is run again from its
start, its partial metrics moved aside to ``metrics.csv.interrupted``/``.jsonl.interrupted``.

Hydra only instantiates launchers whose class lives in the ``hydra_plugins`` package; fedbgmd's
top-level layout is fixed, so :func:`register_launcher` registers the class under that module
name with Hydra's plugin registry (``Plugins.register``) and stores its config node, before Hydra
composes. ``fedbgmd`` (the CLI) calls it.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, _save_config, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from fedbgmd.runner import note_failed_job

log = logging.getLogger("fedbgmd")

PLUGIN_MODULE = "hydra_plugins.fedbgmd_fused"


@dataclass
class FusedLauncherConf:
    _target_: str = f"{PLUGIN_MODULE}.FusedLauncher"
    # processes that plan mini-batches and data-attack batches ahead of the device (0: inline;
    # null: the CPUs but two on a GPU, at most 16, and 0 on a CPU device)
    workers: int | None = None
    # a fused group that fails: "alone" runs its jobs alone, "fail" records them as failed
    on_group_failure: str = "alone"


class FusedLauncher(Launcher):
    """Runs all jobs of a sweep through :func:`fedbgmd.fused.run_jobs` (see the module doc)."""

    def __init__(self, workers: int | None = None, on_group_failure: str = "alone") -> None:
        super().__init__()
        self.workers = None if workers is None else int(workers)
        self.on_group_failure = on_group_failure
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        _memoize_sweep_configs(hydra_context)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from fedbgmd.checks import check_config
        from fedbgmd.config import ConfigError
        from fedbgmd.fused import run_jobs
        from fedbgmd.integrity import RunDirLocked, RunLock, lock_run_dir

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        # compose and check every job before any runs: a bad value stops the sweep at once
        prepared: list[tuple[list[str], DictConfig, DictConfig, Path]] = []
        problems: list[str] = []
        for k, overrides in enumerate(job_overrides):
            idx = initial_job_idx + k
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            HydraConfig.instance().set_config(sweep_config)
            out = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
                sweep_config.hydra.runtime.output_dir = str(out.absolute())
            task_cfg = copy.deepcopy(sweep_config)
            with read_write(task_cfg), open_dict(task_cfg):
                del task_cfg["hydra"]
            try:
                check_config(task_cfg)
            except ConfigError as err:
                problems.append(f"job {idx} ({' '.join(overrides)}): {err}")
            other = _other_job_in(out, list(overrides))
            if other is not None:
                problems.append(
                    f"job {idx} ({' '.join(overrides)}): {out} holds the run of another job "
                    f"({' '.join(other)}); the sweep was extended or reordered since it wrote "
                    "there, so its job numbers no longer match. Use a new hydra.sweep.dir"
                )
            prepared.append((list(overrides), sweep_config, task_cfg, out))
        if problems:
            print("fedbgmd: " + "\n".join(problems), file=sys.stderr)
            sys.exit(2)
        jobs: list[tuple[Any, Path]] = []
        positions: list[int] = []
        skipped: set[int] = set()
        locks: list[RunLock] = []
        try:
            for k, (overrides, sweep_config, task_cfg, out) in enumerate(prepared):
                # locked before anything is written there; a folder in use is left alone
                try:
                    locks.append(lock_run_dir(out))
                except (RunDirLocked, OSError) as err:
                    print(f"fedbgmd: {err}; skipping this job", file=sys.stderr)
                    skipped.add(k)
                    continue
                if self._prepare(k, overrides, sweep_config, task_cfg, out, skipped):
                    jobs.append((task_cfg, out))
                    positions.append(k)
            status = (
                run_jobs(jobs, workers=self.workers, on_group_failure=self.on_group_failure)
                if jobs
                else {}
            )
        finally:
            for lock in locks:
                lock.release()
        results: list[JobReturn] = []
        by_position = {k: status.get(j, 1) for j, k in enumerate(positions)}
        for k, (overrides, sweep_config, task_cfg, _out) in enumerate(prepared):
            ret = JobReturn(
                overrides=overrides,
                cfg=task_cfg,
                hydra_cfg=sweep_config,
                working_dir=os.getcwd(),
                task_name=str(sweep_config.hydra.job.name),
                status=JobStatus.COMPLETED,
                _return_value=0 if k in skipped else by_position.get(k, 1),
            )
            results.append(ret)
        for k, s in by_position.items():
            if s:
                note_failed_job(prepared[k][3])  # the CLI exits 1 after the sweep, listing them
        return results

    @staticmethod
    def _prepare(
        k: int,
        overrides: list[str],
        sweep_config: DictConfig,
        task_cfg: DictConfig,
        out: Path,
        skipped: set[int],
    ) -> bool:
        """Write a job's .hydra/ files as Hydra's launcher does; False (and ``k`` in
        ``skipped``) when its folder already holds a completed run."""
        from fedbgmd.fused import set_aside_partial
        from fedbgmd.reporting.writer import read_summary

        try:
            done = read_summary(out).get("status") == "completed"
        except (OSError, ValueError):
            done = False
        if done:
            print(f"fedbgmd: {out} already holds a completed run; skipping it", file=sys.stderr)
            skipped.add(k)
            return False
        set_aside_partial(out)
        hydra_dir = out / str(sweep_config.hydra.output_subdir)
        hydra_dir.mkdir(parents=True, exist_ok=True)
        _save_config(task_cfg, "config.yaml", hydra_dir)
        _save_config(sweep_config, "hydra.yaml", hydra_dir)
        _save_config(OmegaConf.create(overrides), "overrides.yaml", hydra_dir)  # type: ignore[arg-type]
        return True


def _other_job_in(out: Path, overrides: list[str]) -> list[str] | None:
    """The overrides of the job whose run ``out`` holds, when they are not ``overrides``
    (Hydra numbers a sweep's jobs by position: a re-run with more values shifts them)."""
    saved = out / ".hydra" / "overrides.yaml"
    if not (saved.is_file() and any((out / f).exists() for f in ("metrics.csv", "summary.json"))):
        return None
    try:
        previous = [str(o) for o in OmegaConf.load(saved)]
    except Exception:  # unreadable: nothing to compare with, the run is redone as partial
        return None
    return None if previous == overrides else previous


def _memoize_sweep_configs(hydra_context: HydraContext) -> None:
    """Compose each job once, not twice: Hydra's basic sweeper composes every job of a batch to
    check it (validate_batch_is_legal) and drops the result, then the launcher composes it again
    (~0.15 s a job here; half of a 132-job sweep's ~40 s start). The loader is shared by sweeper
    and launcher, so its answers are kept for the launcher, each handed out once."""
    loader: Any = hydra_context.config_loader
    if getattr(loader, "_fedbgmd_memo", None) is not None:
        return
    memo: dict[tuple[str, ...], DictConfig] = {}
    compose = loader.load_sweep_config

    def load_sweep_config(master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = tuple(sweep_overrides)
        if key in memo:
            return memo.pop(key)
        cfg = compose(master_config, sweep_overrides)
        memo[key] = copy.deepcopy(cfg)
        return cfg

    loader.load_sweep_config = load_sweep_config
    loader._fedbgmd_memo = memo


_REGISTERED = False


def register_launcher() -> None:
    """Make ``hydra/launcher=fused`` available (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import importlib
    import types

    from hydra.core.plugins import Plugins

    registry = Plugins.instance()  # scans the installed hydra_plugins first
    # the name Hydra's plugin check requires, importable for its target lookup
    FusedLauncher.__module__ = PLUGIN_MODULE
    try:
        importlib.import_module("hydra_plugins")
    except ImportError:  # no other Hydra plugin installed: an empty namespace stands in
        parent = types.ModuleType("hydra_plugins")
        parent.__path__ = []
        sys.modules["hydra_plugins"] = parent
    module = types.ModuleType(PLUGIN_MODULE, "fedbgmd's fused launcher (fedbgmd.fused.launcher)")
    module.FusedLauncher = FusedLauncher  # type: ignore[attr-defined]
    module.FusedLauncherConf = FusedLauncherConf  # type: ignore[attr-defined]
    sys.modules[PLUGIN_MODULE] = module
    registry.register(FusedLauncher)
    ConfigStore.instance().store(
        group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="fedbgmd"
    )
    _REGISTERED = True
