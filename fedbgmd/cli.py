"""Command line: ``fedbgmd [hydra overrides]`` runs a federation; ``fedbgmd report DIR`` a report.

Exit status: 0 success, 1 the run failed (the reason is printed and in summary.json),
2 bad configuration (one message naming the key(s), no traceback) or a run folder that is
in use or already holds a run (nothing written), 128 + N stopped by signal N (130 SIGINT,
143 SIGTERM; summary.json says "interrupted" and how to resume).

The run folder is locked (fedbgmd.integrity) before anything is written into it: by
:func:`entry` before Hydra writes ``.hydra/`` for a single run, by the job for a sweep's jobs.
``fedbgmd resume=DIR`` runs without Hydra: the saved config, only DIR written.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedbgmd.config import Config, ConfigError, register_configs, validate
from fedbgmd.integrity import (
    RunDirLocked,
    RunLock,
    interrupt_signal,
    lock_run_dir,
    stop_error,
    stop_on_signals,
    stop_status,
)

CONFIG_MODULE = "fedbgmd.conf"
EXIT_RUN_FAILED = 1
EXIT_BAD_CONFIG = 2
# what ``resume=DIR`` may change: nothing that alters the experiment's results (num_rounds only
# upwards: more rounds of the same run)
CONTINUATION_KEYS = (
    "num_rounds",
    "checkpoint_every",
    "progress",
    "plots",
    "engine.verbose",
    "engine.num_threads",
    "engine.round_timeout_s",
    "engine.timeout_s",
    "engine.superlink",
)
_LOCK: RunLock | None = None  # the run folder this process holds (single runs, resume)


def check_config(cfg: Any) -> None:
    """Schema-level and cross-field checks plus constructing every plug-in once."""
    from fedbgmd.components import check_components

    validate(cfg)
    check_components(cfg)


def run(cfg: Any, run_dir: Path) -> int:
    """Run one federation into ``run_dir``; return the exit status."""
    from fedbgmd.data import DatasetMissingError
    from fedbgmd.engine import run_inprocess, run_ray_simulation
    from fedbgmd.results import read_summary

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
    except DatasetMissingError as err:
        print(f"fedbgmd: data set missing: {err}", file=sys.stderr)
        _ensure_summary(run_dir, t0, "failed", stop_error(err))
        return EXIT_RUN_FAILED
    except Exception as err:
        print(f"fedbgmd: run failed: {type(err).__name__}: {err}", file=sys.stderr)
        _ensure_summary(run_dir, t0, "failed", stop_error(err))
        return EXIT_RUN_FAILED
    except KeyboardInterrupt as err:  # SIGINT/SIGTERM: entry() turns it into the exit status
        _ensure_summary(run_dir, t0, stop_status(err), stop_error(err))
        raise
    try:
        summary = read_summary(run_dir)
    except (OSError, ValueError):
        summary = {"status": "failed", "error": "no summary.json was written"}
    if summary.get("status") != "completed":
        print(f"fedbgmd: run failed: {summary.get('error')}", file=sys.stderr)
        return EXIT_RUN_FAILED
    acc = summary.get("final_accuracy")
    acc_s = "n/a" if acc is None else f"{100 * acc:.2f}%"
    print(
        f"fedbgmd: done in {time.time() - t0:.1f}s; final test accuracy {acc_s} "
        f"(best {100 * (summary.get('best_accuracy') or 0):.2f}%); results in {run_dir}"
    )
    return 0


def _write_config(cfg: Any, run_dir: Path) -> None:
    from fedbgmd.results import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def _ensure_summary(run_dir: Path, since: float, status: str, error: str) -> None:
    """A summary.json for a run that stopped before its ServerApp wrote one (best effort)."""
    from fedbgmd.results import SUMMARY_JSON, atomic_write_text, read_metrics, utc_now_iso

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


def resumed_config(args: list[str]) -> tuple[Any, Path]:
    """The saved config of the run folder ``resume=DIR`` in ``args`` (it wins: the continued run
    is the same experiment) with the CONTINUATION_KEYS given in ``args``; any other override
    raises ConfigError naming it, as does ``num_rounds`` below the saved value."""
    from omegaconf.errors import OmegaConfBaseException

    run_dir, given, refused = None, [], []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key == "resume" and sep:
            run_dir = Path(value.strip("'\"")).absolute()
        elif sep and key in CONTINUATION_KEYS:
            given.append(arg)
        else:
            refused.append(arg)
    if run_dir is None:
        raise ConfigError(["resume=DIR: no run folder given"])
    saved_path = run_dir / "config.yaml"
    if not (run_dir / "checkpoint.pt").is_file() or not saved_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt and config.yaml to resume from")
    if refused:
        raise ConfigError(
            [
                f"resume continues the experiment saved in {run_dir / 'config.yaml'}; "
                f"refusing what would change it: {' '.join(refused)} (a resume takes only "
                f"{', '.join(CONTINUATION_KEYS)}; num_rounds no fewer than saved)"
            ]
        )
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved_path))
    try:
        cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(given))
    except OmegaConfBaseException as err:
        raise ConfigError([f"{explain(err, given)}"]) from err
    if cfg.num_rounds < saved.num_rounds:
        raise ConfigError(
            [f"num_rounds={cfg.num_rounds} is fewer than the saved run's {saved.num_rounds}"]
        )
    cfg.resume = str(run_dir)
    check_config(cfg)
    return cfg, run_dir


def resume_main(args: list[str]) -> int:
    """``fedbgmd resume=DIR [num_rounds=M ...]``: continue that run in DIR (and only there)."""
    try:
        cfg, run_dir = resumed_config(args)
    except (OSError, ConfigError) as err:
        print(f"fedbgmd: cannot resume: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    status = _claim(run_dir, fresh=False, sweep=False)
    if status is not None:
        return status
    # Hydra is not run (it would write .hydra/ and a log elsewhere): fedbgmd's warnings to stderr
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s][%(name)s] %(message)s")
    return run(cfg, run_dir)


def _claim(run_dir: Path, fresh: bool, sweep: bool) -> int | None:
    """Lock ``run_dir`` for this process (``_LOCK``); a fresh run also refuses a folder that
    already holds a run. None when the run may go on, else the exit status (0: a sweep skips
    this job)."""
    global _LOCK
    try:
        lock = lock_run_dir(run_dir)
    except RunDirLocked as err:
        print(f"fedbgmd: {err}; not starting a second run there", file=sys.stderr)
        return 0 if sweep else EXIT_BAD_CONFIG
    except OSError as err:
        print(f"fedbgmd: run failed: {err}", file=sys.stderr)
        return EXIT_RUN_FAILED
    held = [f for f in ("metrics.csv", "summary.json") if (run_dir / f).exists()]
    if fresh and held:
        lock.release()
        # a new run would append its rounds to that run's metrics.csv (resume's mechanism) and
        # its summary would mix both
        print(
            f"fedbgmd: {run_dir} already holds a run ({', '.join(held)}); not mixing a new run "
            f"into it. Choose another hydra.run.dir / hydra.sweep.dir, move that folder away, "
            f"or continue it with resume={run_dir}"
            + ("; skipping this job of the sweep" if sweep else ""),
            file=sys.stderr,
        )
        return 0 if sweep else EXIT_BAD_CONFIG
    _LOCK = lock
    return None


def _release() -> None:
    global _LOCK
    if _LOCK is not None:
        _LOCK.release()
        _LOCK = None


def _pinned_run_dir(args: list[str]) -> tuple[Path | None, list[str]]:
    """The folder a single run will write (Hydra's ``hydra.run.dir``, resolved now) and ``args``
    pinning it, so the lock is taken on the folder Hydra then uses (``${now:...}`` resolved
    once). None when it cannot be known before Hydra runs (a sweep, a runtime interpolation):
    the job locks it itself."""
    from hydra import compose, initialize_config_module
    from hydra.core.utils import setup_globals

    if any(a.lstrip("+~").startswith(("hydra.mode", "hydra.sweep")) for a in args):
        return None, args
    setup_globals()  # the ${now:} resolver
    overrides = [a for a in args if "=" in a or a.startswith("~")]
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            composed = compose("config", overrides=overrides, return_hydra_config=True)
        run_dir = Path(str(composed.hydra.run.dir)).absolute()
    except Exception:  # e.g. ${hydra.job.name}: known only inside Hydra's run
        return None, args
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    kept = [a for a in args if not a.lstrip("+").startswith("hydra.run.dir=")]
    return run_dir, [*kept, f"hydra.run.dir='{quoted}'"]


def _interrupted(err: KeyboardInterrupt) -> int:
    """Say how the run stopped and how to continue it; the exit status 128 + signal number."""
    from fedbgmd.server import CHECKPOINT

    signum = interrupt_signal(err)
    text = f"fedbgmd: interrupted by {signal.Signals(signum).name}"
    if _LOCK is not None:
        run_dir = _LOCK.run_dir
        text += f"; the stop is recorded in {run_dir / 'summary.json'}"
        if (run_dir / CHECKPOINT).is_file():
            text += f"; continue it with: fedbgmd resume={run_dir}"
        else:
            text += " (no checkpoint to resume from: set checkpoint_every=N to have one)"
    print(text, file=sys.stderr)
    return 128 + signum


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every round at INFO and warns that run_simulation is deprecated (see engine)."""
    if verbose:
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@hydra.main(version_base="1.3", config_path="pkg://fedbgmd.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        check_config(cfg)
    except ConfigError as err:
        print(f"fedbgmd: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.resume:  # entry() runs resume=DIR itself; here it came from a config file
        print("fedbgmd: give resume=DIR on the command line, alone", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    mode = HydraConfig.get().mode
    sweep = mode is not None and mode.name == "MULTIRUN"
    if _LOCK is None or _LOCK.run_dir != run_dir.absolute():  # a sweep's job, or not pinned
        claimed = _claim(run_dir, fresh=True, sweep=sweep)
        if claimed is not None:
            if sweep:
                return
            sys.exit(claimed)
    try:
        status = run(cfg, run_dir)
    finally:
        if sweep:
            _release()
    if status and not sweep:
        sys.exit(status)
    if status:  # in a sweep one failing job is logged and does not stop the rest
        print(f"fedbgmd: job {run_dir} failed; continuing the sweep", file=sys.stderr)


def _precheck(overrides: list[str]) -> int | None:
    """Compose the config before Hydra runs, so a bad override exits 2 with one clear line."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    run_overrides = [
        o
        for o in overrides
        if not o.lstrip("~+").startswith("hydra.") and ("=" in o or o.startswith("~"))
    ]
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = compose("config", overrides=run_overrides)
        check_config(cfg)
    except ConfigError as err:
        print(f"fedbgmd: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        print(f"fedbgmd: invalid configuration: {explain(err, run_overrides)}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return None


def explain(err: BaseException, overrides: list[str]) -> str:
    """One readable message for a Hydra/OmegaConf composition error: the key and what is valid."""
    import difflib
    import re

    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0] if lines else type(err).__name__
    options = re.search(r"Available options in '([^']+)':(.*)", text, re.S)
    if options:
        listing = options.group(2).split("Config search path")[0]
        names = ", ".join(
            o for o in (t.strip() for t in listing.split()) if o and not o.startswith("base_")
        )
        return f"{head} (valid {options.group(1)} options: {names})"
    cause = err.__cause__ or err.__context__
    key = getattr(cause, "full_key", None)
    if cause is not None and key:
        detail = str(cause).splitlines()[0]
        parent, _, leaf = str(key).rpartition(".")
        valid = _keys_at(parent)
        hint = ""
        if valid and leaf not in valid:
            close = difflib.get_close_matches(leaf, valid, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            hint += f" (keys at {parent or 'top level'}: {', '.join(sorted(valid))})"
        return f"{key}: {detail}{hint}"
    return head


def _keys_at(path: str) -> list[str]:
    """Keys of the default config at ``path`` ("" = top level), for suggestions."""
    from hydra import compose, initialize_config_module

    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            node = compose("config")
        for part in [p for p in path.split(".") if p]:
            node = node[part]
        return [str(k) for k in node.keys()]
    except Exception:  # suggestions are best effort
        return []


def entry(argv: list[str] | None = None) -> None:
    """Console script ``fedbgmd``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "report":
        from fedbgmd import report

        sys.exit(report.main(args[1:]))
    register_configs()
    from fedbgmd.fused_launcher import register_launcher

    register_launcher()  # hydra/launcher=fused
    stop_on_signals()  # SIGTERM as SIGINT: the run records "interrupted" and exits 128 + N
    try:
        if any(a.startswith("resume=") for a in args):
            sys.exit(resume_main(args))
        # Any Hydra flag (--multirun, --help, --cfg, --config-dir, ...) changes what is composed
        # or run: Hydra handles those itself; the job checks its config (exit 2 on a bad value)
        # and locks its folder.
        if not any(a.startswith("-") for a in args):
            status = _precheck(args)
            if status is not None:
                sys.exit(status)
            run_dir, args = _pinned_run_dir(args)
            if run_dir is not None:  # locked before Hydra writes .hydra/ there
                status = _claim(run_dir, fresh=True, sweep=False)
                if status is not None:
                    sys.exit(status)
        sys.argv = [sys.argv[0], *args]
        _hydra_main()
    except KeyboardInterrupt as err:
        sys.exit(_interrupted(err))
    finally:
        _release()
