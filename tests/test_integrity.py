"""Run integrity under faults (issue 17): resume continues the saved experiment, one run per
folder, stops by signal recorded, torn metric lines, full disks, late and lost deployment nodes.

Faults are injected deterministically: a signal is sent after the run printed a given round, a
lock is held by this process, a torn line is written by hand, /dev/full stands in for a full
disk, a fake grid and clock stand in for slow SuperNodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedbgmd.integrity import LOCK_FILE, lock_run_dir
from fedbgmd.reporting.writer import (
    RunFolderInUseError,
    RunWriter,
    read_metrics,
    read_metrics_jsonl,
)

SMOKE = ["experiment=smoke", "plots=false", "strategy.server_momentum=0.5"]
CLI = [sys.executable, "-c", "from fedbgmd.cli import entry; entry()"]


def fedbgmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def run_until(args: list[str], cwd: Path, round_no: int, sig: int) -> tuple[int, str]:
    """Start a run, send ``sig`` once it printed round ``round_no``; (exit status, stderr)."""
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(f"round {round_no:>4}/"):
            proc.send_signal(sig)
            break
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- signals + resume
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_is_recorded_as_an_interrupted_run(tmp_path, sig):
    run = tmp_path / "run"
    args = [*SMOKE, "num_rounds=1000", "checkpoint_every=2", f"hydra.run.dir={run}"]
    code, err = run_until(args, tmp_path, 3, sig)
    assert code == 128 + sig, err
    assert f"resume={run}" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert signal.Signals(sig).name in summary["error"]
    assert summary["checkpoint_round"] == 2
    assert summary["resume_command"] == f"fedbgmd resume={run}"
    rows = read_metrics(run)
    assert summary["rounds"] == rows[-1]["round"] >= 3
    # every line of both files is whole: as many jsonl rows as csv rows
    assert [r["round"] for r in read_metrics_jsonl(run)] == [r["round"] for r in rows]
    assert not (run / LOCK_FILE).exists()


def test_resume_continues_the_saved_experiment_in_its_folder_only(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [*SMOKE, "num_rounds=6", "checkpoint_every=2"]
    assert fedbgmd(*args, f"hydra.run.dir={full}", cwd=cwd).returncode == 0
    code, err = run_until([*args, f"hydra.run.dir={part}"], cwd, 3, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    proc = fedbgmd(f"resume={part}", cwd=cwd)  # as the README shows it: no other argument
    assert proc.returncode == 0, proc.stderr
    assert list(cwd.iterdir()) == []  # no stray outputs/<date>/<time>/.hydra
    a, b = read_metrics(full), read_metrics(part)
    assert [r["round"] for r in b] == list(range(7))
    assert [r["test_loss"] for r in b] == [r["test_loss"] for r in a]
    summary = json.loads((part / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 6
    assert summary["config"]["num_rounds"] == 6  # the saved setting, not the default 30
    first, second = summary["segments"]
    assert first["status"] == "interrupted" and first["resumed_after_round"] is None
    assert second["status"] == "completed" and second["resumed_after_round"] == 2
    assert second["last_round"] == 6
    assert summary["started_at"] == first["started_at"]
    assert summary["wall_time_s"] == pytest.approx(first["wall_time_s"] + second["wall_time_s"])


def test_resume_refuses_overrides_that_change_the_experiment(tmp_path):
    run = tmp_path / "run"
    proc = fedbgmd(
        *SMOKE, "num_rounds=2", "checkpoint_every=1", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    before = snapshot(run)
    for extra, named in [
        (["seed=7", "strategy=fedavg"], "seed=7 strategy=fedavg"),
        (["num_rounds=1"], "num_rounds=1 is fewer"),
    ]:
        proc = fedbgmd(f"resume={run}", *extra, cwd=tmp_path)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- one run per folder
@pytest.mark.parametrize("existing", [False, True])
def test_a_folder_in_use_is_refused_and_left_unchanged(tmp_path, existing):
    run = tmp_path / "run"
    if existing:  # checkpoint_last: something to resume, so the resume below meets the lock
        proc = fedbgmd(
            *SMOKE, "num_rounds=1", "checkpoint_last=true", f"hydra.run.dir={run}", cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
    with lock_run_dir(run):  # another run holds the folder (the race, made deterministic)
        before = snapshot(run)
        proc = fedbgmd(*SMOKE, "num_rounds=1", "seed=3", f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"process {os.getpid()}" in proc.stderr
        assert snapshot(run) == before  # .hydra/overrides.yaml included
        if existing:
            proc = fedbgmd(f"resume={run}", cwd=tmp_path)
            assert proc.returncode == 2 and "in use" in proc.stderr
    assert not (run / LOCK_FILE).exists()


def test_a_direct_caller_cannot_mix_a_new_run_into_a_folder_that_holds_one(tmp_path, capsys):
    # the rule is RunWriter's: callers of cli.run() and ServerRun meet it, not only the CLI's
    from hydra import compose, initialize_config_module

    from fedbgmd.cli import run
    from fedbgmd.config import register_configs
    from fedbgmd.server import ServerRun

    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*SMOKE, "num_rounds=1", "checkpoint_last=true"])
    folder = tmp_path / "run"
    assert run(cfg, folder) == 0
    before = snapshot(folder)
    with pytest.raises(RunFolderInUseError, match="already holds a run"):
        ServerRun(cfg, folder)
    capsys.readouterr()
    assert run(cfg, folder) == 2
    assert f"continue it with resume={folder}" in capsys.readouterr().err
    assert snapshot(folder) == before  # config.yaml and summary.json included
    cfg.resume, cfg.num_rounds = str(folder), 2  # what resumed_config gives: it appends
    assert run(cfg, folder) == 0
    assert [r["round"] for r in read_metrics(folder)] == [0, 1, 2]


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / LOCK_FILE).write_text(f"{dead.pid}\n")
    proc = fedbgmd(*SMOKE, "num_rounds=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"stale lock of process {dead.pid}" in proc.stderr
    assert not (run / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- torn lines
def test_a_torn_last_line_is_dropped_when_the_folder_is_reopened(tmp_path):
    writer = RunWriter(tmp_path)
    writer.log_rounds([{"round": 0, "test_accuracy": 0.1}, {"round": 1, "test_accuracy": 0.2}])
    with (tmp_path / "metrics.csv").open("a") as fh:
        fh.write("2,0.5,0.3")  # a crash mid-write: no newline
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 2, "test_acc')
    writer = RunWriter(tmp_path, resume=True)
    writer.log_round({"round": 2, "test_accuracy": 0.3})
    assert [(r["round"], r["test_accuracy"]) for r in read_metrics(tmp_path)] == [
        (0, 0.1),
        (1, 0.2),
        (2, 0.3),
    ]
    assert [r["round"] for r in read_metrics_jsonl(tmp_path)] == [0, 1, 2]


def test_resume_after_a_torn_line_keeps_every_round(tmp_path):
    run = tmp_path / "run"
    proc = fedbgmd(
        *SMOKE, "num_rounds=2", "checkpoint_every=1", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    with (run / "metrics.csv").open("a") as fh:
        fh.write("3,1.5,0.8")  # round 3 cut short, after the checkpoint round
    proc = fedbgmd(f"resume={run}", "num_rounds=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["round"] for r in read_metrics(run)] == [0, 1, 2, 3]
    assert [r["round"] for r in read_metrics_jsonl(run)] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- full disks
def test_a_full_disk_names_the_file_and_leaves_no_partial_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt.tmp").symlink_to("/dev/full")  # every write there: ENOSPC
    proc = fedbgmd(
        *SMOKE, "num_rounds=2", "checkpoint_every=1", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert proc.returncode == 1
    assert "No space left on device" in proc.stderr and "checkpoint.pt.tmp" in proc.stderr
    assert not os.path.lexists(run / "checkpoint.pt.tmp")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "checkpoint.pt.tmp" in summary["error"]


def test_a_full_disk_while_logging_names_the_file(tmp_path):
    writer = RunWriter(tmp_path)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(OSError, match=r"metrics\.jsonl") as info:
        writer.log_round({"round": 0})
    assert info.value.errno == 28


# ----------------------------------------------------------------------------- deployment
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SlowNodes:
    """Nodes 1 and 2 are up at once; node 3 registers 5 s later; each ClientApp needs
    ``start_s`` seconds to answer (a fresh process importing torch); node 4 never comes."""

    def __init__(self, clock: FakeClock, start_s: float = 10.0) -> None:
        self.clock, self.start_s = clock, start_s
        self.timeouts: list[float] = []

    def get_node_ids(self):
        return [1, 2, 3] if self.clock.now >= 5 else [1, 2]

    def send_and_receive(self, msgs, timeout=None):
        self.timeouts.append(timeout)
        self.clock.now += min(timeout, self.start_s)
        if timeout < self.start_s:
            return []
        out = []
        for m in msgs:
            node = m.metadata.dst_node_id
            reply = Message(
                RecordDict({"node": MetricRecord({"partition-id": node - 1})}), reply_to=m
            )
            reply.metadata.__dict__["_src_node_id"] = node
            out.append(reply)
        return out


def test_discovery_waits_for_late_and_slow_nodes_within_the_round_timeout(monkeypatch):
    import fedbgmd.server as server
    from fedbgmd.engine import set_server_identity

    set_server_identity()  # Flower's Message needs a run id, as on the ServerApp
    clock = FakeClock()
    monkeypatch.setattr(server, "time", clock)
    grid = SlowNodes(clock)
    mapping = server.discover_nodes(grid, num_clients=4, timeout=30.0)
    assert mapping == {1: 0, 2: 1, 3: 2}  # the late node answered; node 4 never came
    assert server.missing_partitions(mapping, 4) == [3]
    assert min(grid.timeouts) >= grid.start_s  # no query shorter than a ClientApp's start
    assert clock.now >= 30.0  # it waited the round timeout for the missing one, then went on


def test_a_lost_superlink_is_named(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    import fedbgmd.deploy as deploy
    from fedbgmd.config import register_configs

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        cfg = compose(
            "config",
            ["experiment=smoke", "engine=deployment", f"engine.superlink=127.0.0.1:{port}"],
        )
    output = "Successfully started run 7\nlost connection\n"  # started, then the SuperLink died
    monkeypatch.setattr(deploy, "_run_streaming", lambda *a: (output, 1, False))
    with pytest.raises(ConnectionError, match=f"SuperLink at 127.0.0.1:{port} is unreachable"):
        deploy.run_deployment(cfg, tmp_path / "run")


# ----------------------------------------------------------------------------- fused sweeps
def test_a_fused_group_stopped_by_a_signal_records_interrupted(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    import fedbgmd.fused as fused
    from fedbgmd.config import register_configs
    from fedbgmd.integrity import RunInterrupted

    # what fuses (tests/test_fused.py): batched clients, one local step, unweighted
    FUSABLE = [*SMOKE, "num_rounds=4", "progress=false", "client.local_steps=1"]
    FUSABLE += ["num_clients=8", "engine.batched=true", "strategy.weighted=false"]
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        cfgs = [compose("config", [*FUSABLE, f"client.optimizer.lr={lr}"]) for lr in (0.1, 0.05)]
    real_round = fused.FusedGroup._round

    def round_then_sigterm(self, rnd, plan, t0):
        if rnd == 3:
            raise RunInterrupted(signal.SIGTERM)
        return real_round(self, rnd, plan, t0)

    monkeypatch.setattr(fused.FusedGroup, "_round", round_then_sigterm)
    jobs = [(cfg, tmp_path / f"job{k}") for k, cfg in enumerate(cfgs)]
    with pytest.raises(RunInterrupted):
        fused.run_jobs(jobs)
    for _, run_dir in jobs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
        assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]
