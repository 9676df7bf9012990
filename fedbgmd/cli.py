"""Command line: ``fedbgmd [hydra overrides]`` runs a federation; ``fedbgmd report DIR`` a report.

Exit status: 0 success, 1 the run failed (the reason is printed and in summary.json),
2 bad configuration (one message naming the key(s), no traceback).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedbgmd.config import Config, ConfigError, register_configs, validate

CONFIG_MODULE = "fedbgmd.conf"
EXIT_RUN_FAILED = 1
EXIT_BAD_CONFIG = 2


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
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    t0 = time.time()
    engine = run_inprocess if cfg.engine.name == "inprocess" else run_ray_simulation
    if cfg.engine.name == "deployment":
        from fedbgmd.deploy import run_deployment

        engine = run_deployment
    try:
        engine(cfg, run_dir)
    except DatasetMissingError as err:
        print(f"fedbgmd: data set missing: {err}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except Exception as err:
        print(f"fedbgmd: run failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_RUN_FAILED
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


def resumed_config(cfg: Any) -> tuple[Any, Path]:
    """The saved config of the run folder ``cfg.resume`` (its choices win, so the continued run
    is the same run); only ``num_rounds`` may be raised from the command line."""
    run_dir = Path(cfg.resume)
    saved_path = run_dir / "config.yaml"
    if not (run_dir / "checkpoint.pt").is_file() or not saved_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.pt and config.yaml to resume from")
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved_path))
    saved.num_rounds = max(int(saved.num_rounds), int(cfg.num_rounds))
    saved.resume = str(run_dir)
    check_config(saved)
    return saved, run_dir


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
    if cfg.resume:
        try:
            cfg, run_dir = resumed_config(cfg)
        except (OSError, ConfigError) as err:
            print(f"fedbgmd: cannot resume: {err}", file=sys.stderr)
            sys.exit(EXIT_BAD_CONFIG)
    mode = HydraConfig.get().mode
    sweep = mode is not None and mode.name == "MULTIRUN"
    held = [f for f in ("metrics.csv", "summary.json") if (run_dir / f).exists()]
    if not cfg.resume and held:
        # a new run would append its rounds to that run's metrics.csv (resume's mechanism) and
        # its summary would mix both
        print(
            f"fedbgmd: {run_dir} already holds a run ({', '.join(held)}); not mixing a new run "
            f"into it. Choose another hydra.run.dir / hydra.sweep.dir, move that folder away, "
            f"or continue it with resume={run_dir}"
            + ("; skipping this job of the sweep" if sweep else ""),
            file=sys.stderr,
        )
        if sweep:
            return
        sys.exit(EXIT_BAD_CONFIG)
    status = run(cfg, run_dir)
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
    # Any Hydra flag (--multirun, --help, --cfg, --config-dir, ...) changes what is composed or
    # run: Hydra handles those itself; the job still checks its config (exit 2 on a bad value).
    if not any(a.startswith("-") for a in args):
        status = _precheck(args)
        if status is not None:
            sys.exit(status)
    sys.argv = [sys.argv[0], *args]
    _hydra_main()
