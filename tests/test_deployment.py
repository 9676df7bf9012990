"""engine=deployment end to end: a SuperLink and 3 SuperNodes on 127.0.0.1, a run submitted
through the fedbgmd CLI (``flwr run``), the run folder checked, every process stopped.

Slow (~1-3 min on 2 cores): each message starts a ``flwr-clientapp`` process that imports torch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbgmd.reporting.writer import read_metrics

BIN = Path(sys.executable).parent
NUM_NODES = 3


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode} before listening"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process visible in /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if state != "Z":
            out[int(entry.name)] = (ppid, cmd)
    return out


def ours(roots: list[int], markers: list[str]) -> set[int]:
    """Descendants of ``roots`` plus any process whose command line names one of our ports
    (Flower starts SuperExec and the app processes in sessions of their own)."""
    procs = _processes()
    found = {p for p in roots if p in procs}
    pattern = re.compile("|".join(rf"(?<![\d.]){re.escape(m)}(?!\d)" for m in markers))
    found |= {p for p, (_, cmd) in procs.items() if pattern.search(cmd)}
    grew = True
    while grew:
        kids = {p for p, (pp, _) in procs.items() if pp in found} - found
        found |= kids
        grew = bool(kids)
    found.discard(os.getpid())
    return found


def stop_all(started: list[subprocess.Popen], markers: list[str]) -> set[int]:
    """terminate, wait, kill: process groups first, then every straggler; returns survivors."""
    roots = [p.pid for p in started]
    for pid in ours(roots, markers):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 15
    for proc in started:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while ours(roots, markers) and time.monotonic() < deadline:
        time.sleep(0.3)
    for pid in ours(roots, markers):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(1)
    return ours(roots, markers)


def test_app_folder_and_connection_are_valid_for_flwr(tmp_path: Path, monkeypatch) -> None:
    """Fast: Flower's own validators accept the generated app and SuperLink connection."""
    import tomli
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.common.config import validate_config
    from hydra import compose, initialize_config_module

    from fedbgmd.config import register_configs
    from fedbgmd.deploy import CONFIG_KEY, CONNECTION, RUN_DIR_KEY, config_from_text, write_app

    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        cfg = compose(
            "config",
            ["experiment=smoke", "engine=deployment", "engine.superlink=10.0.0.5:9000"],
        )
    app, home, overrides = write_app(tmp_path / "t", cfg, tmp_path / "run")
    pyproject = tomli.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=app)
    assert ok, errors
    assert set(pyproject["tool"]["flwr"]["app"]["config"]) == {CONFIG_KEY, RUN_DIR_KEY}
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection(CONNECTION)
    assert conn.address == "10.0.0.5:9000" and conn.insecure
    values = tomli.loads(overrides.read_text())
    assert values[RUN_DIR_KEY] == str(tmp_path / "run")
    shipped = config_from_text(values[CONFIG_KEY])
    assert shipped.engine.name == "deployment" and shipped.num_clients == cfg.num_clients


@pytest.mark.slow
@pytest.mark.deployment
def test_deployment_engine_end_to_end(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),  # never the user's ~/.flwr
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    link_port, *node_ports = free_ports(1 + NUM_NODES)
    markers = [f"127.0.0.1:{p}" for p in (link_port, *node_ports)]
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches its children
        )
        log.close()
        started.append(proc)
        return proc

    def logs_tail() -> str:
        return "\n".join(
            f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:])
            for f in sorted(logs.iterdir())
        )

    run = tmp_path / "run"
    try:
        link = start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--database",
                str(tmp_path / "superlink.db"),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(link_port, link)
        for i, port in enumerate(node_ports):
            start(
                f"supernode{i}",
                [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={i} num-partitions={NUM_NODES}",
                ],
            )
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                "from fedbgmd.cli import entry; entry()",
                "experiment=smoke",
                "engine=deployment",
                f"engine.superlink=127.0.0.1:{link_port}",
                "engine.timeout_s=600",
                "engine.round_timeout_s=300",
                f"num_clients={NUM_NODES}",
                "num_rounds=2",
                "attack=bit_flip",
                "attack.fraction=0.34",
                "model=logreg",
                f"hydra.run.dir={run}",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=700,
        )
        detail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n{logs_tail()}"
        assert proc.returncode == 0, detail
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed", detail
        assert len(summary["byzantine_ids"]) == 1
        assert summary["config"]["engine"]["name"] == "deployment"
        rows = read_metrics(run)
        assert [int(r["round"]) for r in rows] == [0, 1, 2]
        assert rows[-1]["test_accuracy"] is not None
        assert all(int(r["replies_accepted"]) == NUM_NODES for r in rows[1:]), rows
    finally:
        left = stop_all(started, markers)
    assert not left, f"processes left running: {sorted(left)}"
