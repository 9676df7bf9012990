"""Run one federation into its folder and record its outcome, whichever engine runs it: the
single-run CLI, a resumed run, and a fused sweep's jobs that run alone all go through
:func:`run`. Engine layer: loads no Hydra (the config it gets is already composed)."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fedbgmd.config import plain
from fedbgmd.integrity import stop_error, stop_status

__all__ = [
    "EXIT_BAD_CONFIG",
    "EXIT_RUN_FAILED",
    "failed_jobs",
    "note_failed_job",
    "report_failure",
    "run",
]

log = logging.getLogger("fedbgmd")
EXIT_RUN_FAILED = 1
EXIT_BAD_CONFIG = 2
# the jobs of this process's sweep that failed (whichever launcher ran them): a sweep goes on
# past a failed job, and the CLI ends it with EXIT_RUN_FAILED and their list
_FAILED_JOBS: list[str] = []


def note_failed_job(run_dir: Path | str) -> None:
    """Record that the sweep job writing ``run_dir`` failed (its reason is in its summary.json)."""
    _FAILED_JOBS.append(str(run_dir))


def failed_jobs() -> list[str]:
    """The failed jobs noted so far, in the order they failed."""
    return list(_FAILED_JOBS)


def run(cfg: Any, run_dir: Path) -> int:
    """Run one federation into ``run_dir``; return the exit status."""
    from fedbgmd.engine import run_inprocess, run_ray_simulation
    from fedbgmd.reporting.writer import RunFolderInUseError, check_fresh_run_dir, read_summary

    if not cfg.resume:  # refused before config.yaml or a failure summary would overwrite its own
        try:
            check_fresh_run_dir(run_dir)
        except RunFolderInUseError as err:
            print(f"fedbgmd: {err}", file=sys.stderr)
            return EXIT_BAD_CONFIG
    _quiet_flower(cfg.engine.verbose)
    if cfg.engine.num_threads is not None:
        import torch

        # small models lose badly to thread oversubscription on busy machines
        torch.set_num_threads(int(cfg.engine.num_threads))
    t0 = time.time()
    engine = run_inprocess if cfg.engine.name == "inprocess" else run_ray_simulation
    if cfg.engine.name == "deployment":
        from fedbgmd.deploy import run_deployment

        engine = run_deployment
    try:
        _write_config(cfg, run_dir)
        engine(cfg, run_dir)
    except KeyboardInterrupt as err:  # SIGINT/SIGTERM: entry() turns it into the exit status
        _ensure_summary(run_dir, t0, stop_status(err), stop_error(err))
        raise
    except Exception as err:
        return report_failure(cfg, run_dir, err, since=t0)
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError):
        summary = {"status": "failed", "error": "no summary.json was written"}
    if summary.get("status") != "completed":
        return report_failure(cfg, run_dir, None)
    acc = summary.get("final_accuracy")
    acc_s = "n/a" if acc is None else f"{100 * acc:.2f}%"
    done = (
        f"done in {time.time() - t0:.1f}s; final test accuracy {acc_s} "
        f"(best {100 * (summary.get('best_accuracy') or 0):.2f}%); results in {run_dir}"
    )
    if summary.get("skipped_rounds"):
        done += f"; {summary['skipped_rounds']} round(s) skipped (see metrics.jsonl 'skipped')"
    log.info(done)
    print(f"fedbgmd: {done}")
    return 0


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every round at INFO and warns that run_simulation is deprecated (see engine)."""
    if verbose:
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _write_config(cfg: Any, run_dir: Path) -> None:
    from omegaconf import OmegaConf  # the config as composed (a DictConfig)

    from fedbgmd.reporting.writer import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _ensure_summary(run_dir: Path, since: float, status: str, error: str) -> None:
    """A summary.json for a run that stopped before its ServerApp wrote one (best effort)."""
    from fedbgmd.reporting.summary import utc_now_iso
    from fedbgmd.reporting.writer import SUMMARY_JSON, atomic_write_text, read_metrics

    path = run_dir / SUMMARY_JSON
    try:
        if path.is_file() and path.stat().st_mtime >= since:
            return  # the run recorded its own outcome
        rows = read_metrics(run_dir)
        summary = {
            "status": status,
            "error": error,
            "rounds": max((int(r["round"]) for r in rows if r.get("round") is not None), default=0),
            "finished_at": utc_now_iso(),
        }
        atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    except OSError as err:
        print(f"fedbgmd: could not write {path}: {err}", file=sys.stderr)


def report_failure(
    cfg: Any, run_dir: Path, err: BaseException | None, since: float | None = None
) -> int:
    """Make a failed run visible everywhere: summary.json (written here if the run failed before
    its server could write one, so reports list it and a re-run retries it), the traceback in the
    run folder's log and on stderr (Hydra's console handler), one closing line. Returns 1.
    ``since``: a summary.json older than this (an earlier segment's) is not this run's."""
    import traceback

    from fedbgmd.data import DatasetMissingError
    from fedbgmd.reporting.writer import read_summary, write_failure_summary

    try:
        summary = read_summary(run_dir)
        if since is not None and (run_dir / "summary.json").stat().st_mtime < since:
            summary = {}
    except (OSError, ValueError):
        summary = {}
    recorded = summary.get("error") if summary.get("status") == "failed" else None
    tb: str | None
    if err is not None:
        error = str(recorded or f"{type(err).__name__}: {err}")
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    else:
        error = str(recorded or "the run ended without a completed summary.json")
        tb = summary.get("traceback")
    if not summary:
        try:
            config = plain(cfg)
        except (TypeError, ValueError):  # not a config at all: the failure is still recorded
            config = {}
        write_failure_summary(run_dir, error, config, tb)
    if isinstance(err, DatasetMissingError):  # not a bug: the message says what to do (below)
        log.info("data set missing: %s", err)
    elif tb:
        log.error("run failed: %s\n%s", error, tb.rstrip())
    else:
        log.error("run failed: %s", error)
    print(f"fedbgmd: run failed: {error}", file=sys.stderr)
    return EXIT_RUN_FAILED
