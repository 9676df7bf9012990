"""``engine=deployment``: submit the run to a running Flower federation (Deployment Engine).

A SuperLink and one SuperNode per client must already be running; each SuperNode states the
partition it serves with ``--node-config "partition-id=<i> num-partitions=<N>"``. This module
holds the ServerApp and ClientApp that Flower loads in its own processes (``flwr-serverapp``
on the SuperLink machine, one ``flwr-clientapp`` per message on the SuperNodes):

- ``server_app`` / ``client_app`` read the resolved fedbgmd config from
  ``context.run_config["fedbgmd-config"]`` (the whole YAML as one string: run-config values
  must be scalars) and the run folder from ``context.run_config["run-dir"]``, then delegate
  to :class:`fedbgmd.server.ServerRun` and :func:`fedbgmd.clients.honest.runtime_for`.
- :func:`run_deployment` writes a minimal Flower app folder (just ``pyproject.toml`` pointing
  at this module) and a private ``$FLWR_HOME/config.toml`` with the SuperLink address into a
  temporary folder, then runs ``flwr run <app> fedbgmd --run-config <toml> --stream``.
  ``flwr run`` exits 0 even when the run failed, so success is read from
  ``run_dir/summary.json``, which the ServerApp writes.

The ServerApp writes the run folder on the machine that runs the SuperLink: run ``fedbgmd``
there (or give ``hydra.run.dir`` a path on a file system both machines share). fedbgmd must
be installed on every machine (the app folder carries no code) and the data set must be
readable by every SuperNode.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

CONFIG_KEY = "fedbgmd-config"
RUN_DIR_KEY = "run-dir"
CONNECTION = "fedbgmd"  # the SuperLink connection name written into $FLWR_HOME/config.toml

PYPROJECT = """\
[project]
name = "fedbgmd-run"
version = "1.0.0"
description = "A fedbgmd run (the code is the installed fedbgmd package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedbgmd"

[tool.flwr.app.components]
serverapp = "fedbgmd.deploy:server_app"
clientapp = "fedbgmd.deploy:client_app"

[tool.flwr.app.config]
{config_key} = ""
{run_dir_key} = ""
"""


# ---------------------------------------------------------------- the apps (Flower's processes)
@lru_cache(maxsize=2)
def config_from_text(text: str) -> Any:
    """The fedbgmd config shipped in the run config, as the typed Config."""
    from omegaconf import OmegaConf

    from fedbgmd.config import Config, to_typed

    if not text:
        raise ValueError(f"run config has no {CONFIG_KEY!r}: submit the run with engine=deployment")
    cfg = to_typed(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text)))
    if cfg.engine.num_threads is not None:
        import torch

        torch.set_num_threads(int(cfg.engine.num_threads))
    return cfg


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedbgmd.server import ServerRun

    cfg = config_from_text(str(context.run_config.get(CONFIG_KEY, "")))
    run_dir = str(context.run_config.get(RUN_DIR_KEY, ""))
    if not run_dir:
        raise ValueError(f"run config has no {RUN_DIR_KEY!r}")
    run = ServerRun(cfg, Path(run_dir))
    run.parallelism = cfg.num_clients  # every SuperNode trains at the same time
    run.run(grid)


client_app = ClientApp()


def _runtime(context: Context) -> Any:
    from fedbgmd.clients.honest import runtime_for

    text = str(context.run_config.get(CONFIG_KEY, ""))
    return runtime_for(config_from_text(text), key=text)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    return _runtime(context).train(msg, context)


@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    return _runtime(context).query(msg, context)


# ---------------------------------------------------------------- submitting a run (fedbgmd CLI)
def connection_toml(cfg: Any) -> str:
    """``$FLWR_HOME/config.toml`` naming the SuperLink (flwr 1.42 ``[superlink.<name>]``)."""
    import tomli_w

    e = cfg.engine
    conn: dict[str, Any] = {"address": str(e.superlink), "insecure": bool(e.insecure)}
    if e.root_certificates:
        conn["root-certificates"] = str(Path(e.root_certificates).expanduser().resolve())
    return tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})


def write_app(folder: Path, cfg: Any, run_dir: Path) -> tuple[Path, Path, Path]:
    """Write the app folder, FLWR_HOME and the run-config override file under ``folder``."""
    import tomli_w
    from omegaconf import OmegaConf

    app = folder / "app"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        PYPROJECT.format(config_key=CONFIG_KEY, run_dir_key=RUN_DIR_KEY), encoding="utf-8"
    )
    home = folder / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(connection_toml(cfg), encoding="utf-8")
    overrides = folder / "run-config.toml"
    overrides.write_text(
        tomli_w.dumps(
            {
                CONFIG_KEY: OmegaConf.to_yaml(cfg, resolve=True),
                RUN_DIR_KEY: str(run_dir),
            }
        ),
        encoding="utf-8",
    )
    return app, home, overrides


def _flwr_executable() -> str:
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.is_file() else (shutil.which("flwr") or "flwr")


def run_deployment(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Submit the run to the SuperLink ``cfg.engine.superlink`` and wait for it (at most
    ``cfg.engine.timeout_s``); return the run's summary, raise if it did not complete."""
    from fedbgmd.reporting.writer import read_summary

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedbgmd-deploy-") as tmp:
        app, home, overrides = write_app(Path(tmp), cfg, run_dir)
        env = dict(os.environ)
        env["FLWR_HOME"] = str(home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        flwr = _flwr_executable()
        cmd = [flwr, "run", str(app), CONNECTION, "--run-config", str(overrides), "--stream"]
        interrupt: KeyboardInterrupt | None = None
        try:
            output, code, timed_out = _run_streaming(cmd, env, float(cfg.engine.timeout_s))
        except _Stopped as stopped:  # SIGINT/SIGTERM here: stop the run there too
            output, code, timed_out, interrupt = stopped.output, -1, True, stopped.cause
        run_id = _run_id(output)
        if timed_out and run_id is not None:  # do not leave the run going on the federation
            subprocess.run(
                [flwr, "stop", run_id, CONNECTION],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=60,
                check=False,
            )
    tail = "\n".join(output.strip().splitlines()[-15:])
    if interrupt is not None:
        raise interrupt
    if timed_out:
        raise TimeoutError(
            f"the run did not finish within engine.timeout_s={cfg.engine.timeout_s}s "
            f"(run id {run_id}; stopped)"
        )
    lost = superlink_unreachable(str(cfg.engine.superlink))
    if run_id is None:
        raise RuntimeError(
            f"flwr run could not submit the run to {cfg.engine.superlink}"
            + (f" ({lost})" if lost else "")
            + f" (exit {code}):\n{tail}"
        )
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() or summary_path.stat().st_mtime < started - 1:
        if lost:  # the SuperLink went away during the run: that, not the folder, is the cause
            raise ConnectionError(f"run {run_id}: {lost}; flwr run exited {code}:\n{tail}")
        raise RuntimeError(
            f"run {run_id} wrote no summary.json into {run_dir} (the ServerApp writes it on "
            f"the SuperLink's machine: run fedbgmd there or on a shared file system); "
            f"flwr run exited {code}:\n{tail}"
        )
    summary = read_summary(run_dir)
    if summary.get("status") != "completed":
        raise RuntimeError(f"run {run_id} failed: {summary.get('error')}")
    return summary


def superlink_unreachable(address: str, timeout: float = 5.0) -> str | None:
    """None when something accepts connections at the SuperLink's ``host:port``, else why not
    (a connection lost mid-run then reads as such, not as a missing summary.json)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout):
            return None
    except (OSError, ValueError) as err:
        return f"the SuperLink at {address} is unreachable ({err})"


def _run_id(output: str) -> str | None:
    match = re.search(r"Successfully started run (\d+)", output)
    return match.group(1) if match else None


class _Stopped(Exception):
    def __init__(self, output: str, cause: KeyboardInterrupt) -> None:
        super().__init__(str(cause))
        self.output, self.cause = output, cause


def _run_streaming(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[str, int, bool]:
    """Run ``cmd``, echoing its output; return (output, exit code, timed out)."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    stopped: KeyboardInterrupt | None = None
    try:
        try:
            proc.wait(timeout=timeout)
        except KeyboardInterrupt as err:
            stopped = err
            raise subprocess.TimeoutExpired(cmd, timeout) from err
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    if stopped is not None:
        raise _Stopped("".join(lines), stopped)
    return "".join(lines), proc.returncode, timed_out


__all__ = ["client_app", "run_deployment", "server_app"]
