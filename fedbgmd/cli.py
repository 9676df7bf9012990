"""Command line: ``fedbgmd [hydra overrides]`` runs a federation; ``fedbgmd report DIR`` a report.

Exit status: 0 success, 1 the run failed (the reason is printed and in summary.json; a sweep
runs every job and exits 1 when any failed, listing them),
2 bad configuration (one message naming the key(s), no traceback) or a run folder that is
in use or already holds a run (nothing written), 128 + N stopped by signal N (130 SIGINT,
143 SIGTERM; summary.json says "interrupted" and how to resume).

The run folder is locked (fedbgmd.integrity) before anything is written into it: by
:func:`entry` before Hydra writes ``.hydra/`` for a single run, by the job for a sweep's jobs.
``fedbgmd resume=DIR`` runs without Hydra: the saved config, only DIR written.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedbgmd.checks import check_config
from fedbgmd.config import Config, ConfigError, drop_pre_flower_datasets_keys, register_configs
from fedbgmd.integrity import (
    RunDirLocked,
    RunLock,
    interrupt_signal,
    lock_run_dir,
    stop_on_signals,
)
from fedbgmd.reporting.writer import RunFolderInUseError, check_fresh_run_dir
from fedbgmd.runner import (
    EXIT_BAD_CONFIG,
    EXIT_RUN_FAILED,
    failed_jobs,
    note_failed_job,
    report_failure,
    run,
)

__all__ = ["check_config", "entry", "explain", "report_failure", "run"]

log = logging.getLogger("fedbgmd")
CONFIG_MODULE = "fedbgmd.conf"
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
    raw = OmegaConf.load(saved_path)
    drop_pre_flower_datasets_keys(raw)
    saved = OmegaConf.merge(OmegaConf.structured(Config), raw)
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
    if fresh:
        try:  # RunWriter's rule, asked before anything (.hydra/, config.yaml) is written there
            check_fresh_run_dir(run_dir)
        except RunFolderInUseError as err:
            if not _retry_failed(run_dir):
                lock.release()
                skip = "; skipping this job of the sweep" if sweep else ""
                print(f"fedbgmd: {err}{skip}", file=sys.stderr)
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
        note_failed_job(run_dir)
        print(f"fedbgmd: job {run_dir} failed; continuing the sweep", file=sys.stderr)


def _retry_failed(run_dir: Path) -> bool:
    """A run that failed and left nothing to resume from is run again: its partial files are
    set aside (``*.interrupted``), as the fused launcher does. True when so."""
    from fedbgmd.reporting.writer import read_summary

    try:
        failed = read_summary(run_dir).get("status") == "failed"
    except (OSError, ValueError):
        return False
    if not failed or (run_dir / "checkpoint.pt").is_file():
        return False
    from fedbgmd.fused import set_aside_partial

    set_aside_partial(run_dir)
    print(f"fedbgmd: {run_dir} holds a failed run; running it again", file=sys.stderr)
    return True


def _run_overrides(overrides: list[str]) -> list[str]:
    """The overrides that shape the job's config (not hydra.*, not flags)."""
    return [
        o
        for o in overrides
        if not o.lstrip("~+").startswith("hydra.") and ("=" in o or o.startswith("~"))
    ]


def _config_problem(run_overrides: list[str]) -> str | None:
    """Compose one job's config and check it: None, or the one message a bad value gets.

    Must be called inside ``initialize_config_module`` (a sweep composes every job in one)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        check_config(compose("config", overrides=run_overrides))
    except ConfigError as err:
        return str(err)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        return f"invalid configuration: {explain(err, run_overrides)}"
    return None


def _precheck(overrides: list[str]) -> int | None:
    """Compose the config before Hydra runs, so a bad override exits 2 with one clear line."""
    from hydra import initialize_config_module

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        problem = _config_problem(_run_overrides(overrides))
    if problem is None:
        return None
    print(f"fedbgmd: {problem}", file=sys.stderr)
    return EXIT_BAD_CONFIG


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs ``fedbgmd -m <overrides>`` runs, as Hydra's basic sweeper expands them (the
    sweeper.params of a preset first, then the command line's; the cartesian product)."""
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override() and o.input_line]
    master = compose("config", overrides=_run_overrides(fixed), return_hydra_config=True)
    params = master.hydra.sweeper.get("params") or {}
    preset = [f"{k}={v}" for k, v in params.items()]
    batches = BasicSweeper.split_arguments(parser.parse_overrides(preset + overrides), None)
    return [list(job) for batch in batches for job in batch]


def _precheck_sweep(overrides: list[str]) -> int | None:
    """Compose and check every job of a sweep before the first runs (Hydra's basic launcher
    would run job 0 and only then find job 1 invalid): any bad job exits 2, nothing started."""
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    problems: list[str] = []
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        try:
            jobs = sweep_jobs(overrides)
        except (HydraException, OmegaConfBaseException, ValueError) as err:
            jobs, problems = [], [f"invalid configuration: {explain(err, overrides)}"]
        for k, job in enumerate(jobs):
            problem = _config_problem(_run_overrides(job))
            if problem is not None:
                problems.append(f"job {k} ({' '.join(_run_overrides(job))}): {problem}")
    if not problems:
        return None
    print("fedbgmd: no job of the sweep was started:", file=sys.stderr)
    for problem in problems:
        print(f"fedbgmd: {problem}", file=sys.stderr)
    return EXIT_BAD_CONFIG


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
    renamed = _renamed(err, overrides)
    if renamed:
        return renamed
    cause = err.__cause__ or err.__context__
    key = getattr(cause, "full_key", None)
    if cause is not None and key:
        detail = str(cause).splitlines()[0]
        parent, _, leaf = str(key).rpartition(".")
        valid = _keys_at(parent, overrides)
        hint = ""
        if valid and leaf not in valid:
            close = difflib.get_close_matches(leaf, valid, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            hint += f" (keys at {parent or 'top level'}: {', '.join(sorted(valid))})"
        return f"{key}: {detail}{hint}"
    return head


def _renamed(err: BaseException, overrides: list[str]) -> str | None:
    """The new spelling when the composition failed on an old one: a renamed attack (``attack=
    nan``, which YAML even reads as a float), a renamed key (config.RENAMED_KEYS) or plug-in
    parameter (the registries' rename_param). None when nothing renamed is involved."""
    from fedbgmd.attacks import ATTACKS
    from fedbgmd.config import RENAMED_KEYS
    from fedbgmd.core import AGGREGATORS

    for arg in overrides:
        group, _, value = arg.lstrip("+").partition("=")
        new = ATTACKS.renamed_to(value) if group == "attack" else None
        if new:
            return f"attack={value}: the attack was renamed {new!r} (attack={new})"
    cause = err.__cause__ or err.__context__
    key = str(getattr(cause, "full_key", "") or "")
    if key in RENAMED_KEYS:
        return f"{key}: renamed; use {RENAMED_KEYS[key]}"
    parent, _, leaf = key.rpartition(".")
    registry = {"strategy.aggregator.params": AGGREGATORS, "attack.params": ATTACKS}.get(parent)
    moved = registry.renamed_param(leaf) if registry is not None else {}
    if moved:
        uses = "; ".join(f"{new} ({name})" for name, new in moved.items())
        return f"{key}: renamed; use {parent}.{uses}"
    return None


def _keys_at(path: str, overrides: list[str] | None = None) -> list[str]:
    """Keys valid at ``path`` ("" = top level) of the config the other ``overrides`` choose, for
    suggestions: a plug-in's params map offers that plug-in's own parameters (ctm's trim, not
    the default strategy's GM eps/max_iter)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from fedbgmd.checks import plugin_params

    # compose without the overrides at path (one of them is the bad key)
    others = [o for o in overrides or [] if o.lstrip("~+").split("=")[0].rpartition(".")[0] != path]
    try:
        if GlobalHydra.instance().is_initialized():  # inside a precheck's composition
            cfg = compose("config", overrides=others)
        else:
            with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
                cfg = compose("config", overrides=others)
        own = plugin_params(cfg, path)
        if own is not None:
            return own
        node = cfg
        for part in [p for p in path.split(".") if p]:
            node = node[part]
        return [str(k) for k in node.keys()]
    except Exception:  # suggestions are best effort
        return []


def _precheck_args(args: list[str]) -> int | None:
    """Check the config(s) a command line would run before Hydra starts anything. Other Hydra
    flags (--cfg, --config-dir, ...) change what is composed: Hydra handles those itself, and
    each job still checks its config (exit 2 on a bad value)."""
    flags = [a for a in args if a.startswith("-")]
    if not flags:
        return _precheck(args)
    if set(flags) <= {"-m", "--multirun"}:
        overrides = [a for a in args if not a.startswith("-")]
        if any(o.replace(" ", "") == "hydra/launcher=fused" for o in overrides):
            return None  # the fused launcher composes and checks every job first itself
        return _precheck_sweep(overrides)
    return None


USAGE = """\
fedbgmd {version}: Byzantine-robust federated learning simulations (FL-BGMD and its baselines)
on Flower, PyTorch and Hydra. A run trains a model with num_clients clients, some of them
Byzantine, and writes its own folder: config.yaml, metrics.csv/.jsonl, summary.json, plots.

Usage:
  fedbgmd [KEY=VALUE | GROUP=OPTION ...]         one run (outputs/<date>/<time>)
  fedbgmd -m [KEY=A,B ...]                       a sweep: every combination, each in a folder
  fedbgmd report SWEEP_DIR [--help]              tables and plots over the runs below a folder
  fedbgmd resume=RUN_DIR [num_rounds=N]          continue a run saved with checkpoint_every
                                                 or checkpoint_last
  fedbgmd --version                              fedbgmd's version and torch/flwr/hydra's

Config groups (GROUP=OPTION; every key of a group is KEY=VALUE, e.g. attack.fraction=0.3):
{groups}

Examples:
  fedbgmd experiment=smoke                                   # seconds, synthetic data, no Ray
  fedbgmd strategy=cm attack=alie attack.fraction=0.3 seed=1 # Fashion-MNIST, 30 rounds
  fedbgmd -m experiment=smoke strategy=fedavg,cm,fedbgmd seed=0,1 && fedbgmd report multirun

Exit status: 0 done, 1 the run failed (reason printed, in summary.json and the run's cli.log;
a sweep: any job failed, all listed at the end),
2 bad configuration (nothing ran). `fedbgmd --cfg job [overrides]` prints the composed config.
"""

GROUPS = ("data", "model", "strategy", "attack", "client", "engine", "experiment")


def config_groups() -> list[tuple[str, list[str]]]:
    """(group, its options) from the packaged presets (the schemas are not options)."""
    from importlib.resources import files

    conf = files(CONFIG_MODULE)
    return [
        (
            g,
            sorted(
                f.name[: -len(".yaml")]
                for f in conf.joinpath(g).iterdir()
                if f.name.endswith(".yaml")
            ),
        )
        for g in GROUPS
    ]


def usage() -> str:
    import textwrap

    from fedbgmd import __version__

    width = max(len(g) for g in GROUPS) + 1
    groups = "\n".join(
        textwrap.fill(
            ", ".join(opts),
            width=96,
            initial_indent=f"  {g + ':':<{width}} ",
            subsequent_indent=" " * (width + 3),
        )
        for g, opts in config_groups()
    )
    return USAGE.format(version=__version__, groups=groups)


def versions() -> str:
    """``fedbgmd --version``: fedbgmd and the libraries whose versions change results."""
    from fedbgmd import __version__
    from fedbgmd.reporting.summary import environment_versions

    v = environment_versions()
    hydra_version = getattr(hydra, "__version__", None)
    commit = f" ({v['fedbgmd_commit']})" if v.get("fedbgmd_commit") else ""
    return (
        f"fedbgmd {__version__}{commit}\n"
        f"torch {v['torch']}, flwr {v['flwr']}, hydra-core {hydra_version}, "
        f"python {v['python']}"
    )


def _identity(args: list[str]) -> bool:
    """--help and --version are fedbgmd's (Hydra's own flags follow its usage). True: handled."""
    if "--version" in args:
        print(versions())
        return True
    if "--help" in args or "-h" in args:
        print(usage())
        print("Hydra's flags (fedbgmd runs on Hydra; its own help: fedbgmd --hydra-help):")
        print("  -m/--multirun  --cfg job|hydra|all  --resolve  --config-dir DIR  -cn NAME")
        print("  --info [all|config|defaults|...]  --shell-completion  hydra.run.dir=DIR ...")
        return True
    return False


def entry(argv: list[str] | None = None) -> None:
    """Console script ``fedbgmd``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if _identity(args):
        return
    if args and args[0] == "report":
        from fedbgmd.reporting import report

        sys.exit(report.main(args[1:]))
    register_configs()
    from fedbgmd.fused.launcher import register_launcher

    register_launcher()  # hydra/launcher=fused
    stop_on_signals()  # SIGTERM as SIGINT: the run records "interrupted" and exits 128 + N
    try:
        if any(a.startswith("resume=") for a in args):
            sys.exit(resume_main(args))
        # Any Hydra flag (--multirun, --help, --cfg, --config-dir, ...) changes what is composed
        # or run: Hydra handles those itself; the job checks its config (exit 2 on a bad value)
        # and locks its folder.
        status = _precheck_args(args)  # every job of a sweep too, before any runs
        if status is not None:
            sys.exit(status)
        if not any(a.startswith("-") for a in args):
            run_dir, args = _pinned_run_dir(args)
            if run_dir is not None:  # locked before Hydra writes .hydra/ there
                status = _claim(run_dir, fresh=True, sweep=False)
                if status is not None:
                    sys.exit(status)
        sys.argv = [sys.argv[0], *args]
        _hydra_main()
        failed = failed_jobs()
        if failed:  # the sweep ran every job; it did not succeed as a whole
            print(
                f"fedbgmd: the sweep finished with {len(failed)} failed job(s) (each folder's "
                f"summary.json says why): {', '.join(failed)}",
                file=sys.stderr,
            )
            sys.exit(EXIT_RUN_FAILED)
    except KeyboardInterrupt as err:
        sys.exit(_interrupted(err))
    finally:
        _release()
