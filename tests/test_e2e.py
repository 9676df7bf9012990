"""End-to-end runs through the CLI: in-process engine (fast) and Flower's Ray simulation (slow)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedbgmd.reporting.writer import METRIC_COLUMNS, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def fedbgmd(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    return subprocess.run(
        [sys.executable, "-c", "from fedbgmd.cli import entry; entry()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def check_run_folder(run: Path, rounds: int) -> dict:
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.jsonl",
        "summary.json",
        "accuracy.png",
        "loss.png",
    ):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["round"] for r in rows] == list(range(rounds + 1))  # round 0 = initial model
    assert set(METRIC_COLUMNS) <= set(rows[0])
    assert all(r["test_accuracy"] is not None for r in rows)
    assert all(r["bytes_up"] > 0 and r["agg_time_s"] >= 0 for r in rows[1:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == rounds
    assert summary["final_accuracy"] == rows[-1]["test_accuracy"]
    assert {"torch", "flwr"} <= set(summary["versions"])
    return summary


def test_inprocess_run_learns_and_writes_the_result_folder(tmp_path):
    run = tmp_path / "run"
    proc = fedbgmd("experiment=smoke", "num_rounds=4", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "final test accuracy" in proc.stdout and str(run) in proc.stdout
    assert len(re.findall(r"^round +\d+/4", proc.stdout, re.M)) == 5  # a progress line per round
    summary = check_run_folder(run, 4)
    rows = read_metrics(run)
    assert summary["final_accuracy"] > rows[0]["test_accuracy"] + 0.2  # it learned
    assert all(r["agg_converged"] == 1 for r in rows[1:])
    assert all(0 < r["relative_residual"] < 1 for r in rows[1:])


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["nonfinite", "malformed"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedbgmd", "cm"])
def test_nan_and_malformed_attackers_never_stop_or_poison_a_run(tmp_path, strategy, attack):
    run = tmp_path / "run"
    proc = fedbgmd(
        "experiment=smoke",
        f"strategy={strategy}",
        f"attack={attack}",
        "attack.fraction=0.4",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_metrics(run)
    assert all(r["replies_rejected"] == 2 and r["replies_accepted"] == 3 for r in rows[1:])
    assert rows[-1]["test_accuracy"] > 0.5


@pytest.mark.slow
@pytest.mark.ray
def test_ray_simulation_gives_the_same_metrics_as_the_inprocess_engine(tmp_path):
    common = [
        "experiment=smoke",
        "num_clients=4",
        "num_rounds=2",
        "attack=bit_flip",
        "attack.fraction=0.25",
    ]
    ray_run, inproc_run = tmp_path / "ray", tmp_path / "inproc"
    proc = fedbgmd(*common, "engine=simulation", f"hydra.run.dir={ray_run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    summary = check_run_folder(ray_run, 2)
    assert len(summary["byzantine_ids"]) == 1
    proc = fedbgmd(*common, "engine=inprocess", f"hydra.run.dir={inproc_run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a, b = read_metrics(ray_run), read_metrics(inproc_run)
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    # losses agree to float32 summation order (Ray actors run torch with 1 thread, this process 2)
    assert [r["test_loss"] for r in a] == pytest.approx([r["test_loss"] for r in b], rel=1e-5)
    # no Ray process is left behind (actors take a moment to exit after ray.shutdown)
    for _ in range(30):
        left = subprocess.run(
            ["pgrep", "-f", "ray::|raylet|gcs_server"], capture_output=True, text=True
        )
        if not left.stdout.strip():
            break
        time.sleep(0.5)
    assert left.stdout.strip() == ""


def test_missing_data_set_fails_with_where_it_looked(tmp_path):
    run = tmp_path / "run"
    proc = fedbgmd(
        "experiment=smoke",
        "data=fashion_mnist",
        "model=logreg",
        f"data.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "nowhere" in proc.stderr and "dataset-fashion-mnist" in proc.stderr
    assert "Traceback" not in proc.stderr


def readme_plugin_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- plugin-commands -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README lost its plug-in example commands"
    return [line for line in block.group(1).splitlines() if line.startswith("PYTHONPATH=")]


def test_readme_plugin_example_code_is_the_tested_file():
    text = (ROOT / "README.md").read_text()
    code = (ROOT / "docs" / "examples" / "my_plugins.py").read_text()
    assert code.strip() in text


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", readme_plugin_commands() if (ROOT / "README.md").exists() else []
)
def test_readme_plugin_commands_run_end_to_end(tmp_path, command):
    env_part, _, rest = command.partition(" ")
    args = shlex.split(rest)[1:]  # drop the leading "fedbgmd"
    run = tmp_path / "run"
    proc = fedbgmd(
        *args,
        f"hydra.run.dir={run}",
        cwd=ROOT,
        # the example folder first, the caller's path kept (it may hold the package)
        env={
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / env_part.split("=", 1)[1]), os.environ.get("PYTHONPATH", "")]
            )
        },
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_accuracy"] > 0.5


def test_resume_from_a_checkpoint_gives_the_uninterrupted_metrics(tmp_path):
    common = [
        "experiment=smoke",
        "strategy.server_momentum=0.5",
        "attack=bit_flip",
        "attack.fraction=0.2",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert fedbgmd(*common, "num_rounds=4", f"hydra.run.dir={full}", cwd=tmp_path).returncode == 0
    proc = fedbgmd(
        *common, "num_rounds=2", "checkpoint_every=1", f"hydra.run.dir={part}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert (part / "checkpoint.pt").is_file()
    # the saved config is the experiment: only continuation keys (more rounds) go with resume
    proc = fedbgmd(f"resume={part}", "num_rounds=4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a, b = read_metrics(full), read_metrics(part)
    assert [r["round"] for r in b] == [0, 1, 2, 3, 4]
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    assert [r["test_loss"] for r in a] == [r["test_loss"] for r in b]
    assert json.loads((part / "summary.json").read_text())["rounds"] == 4


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    proc = fedbgmd("experiment=smoke", f"resume={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "checkpoint.pt" in proc.stderr


def _diverging_run(tmp_path, *overrides):
    """FedAvg under 40% bit flips x1e30 on the smoke task: the model blows up in a round or two."""
    run = tmp_path / "run"
    proc = fedbgmd(
        "experiment=smoke",
        "strategy=fedavg",
        "attack=bit_flip",
        "attack.fraction=0.4",
        "attack.params.scale=1e30",
        *overrides,
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((run / "summary.json").read_text()), read_metrics(run)


def test_a_diverged_model_is_reported(tmp_path):
    proc, summary, rows = _diverging_run(tmp_path, "num_rounds=5", "eval_every=10")
    assert "diverged" in proc.stdout + proc.stderr
    assert summary["diverged_at"] is not None
    # the run stops after the first NaN/Inf model (later rounds could only reject every reply)
    # and that round is evaluated even though eval_every would skip it
    assert summary["stopped_early"].startswith(f"round {summary['diverged_at']}:")
    assert rows[-1]["round"] == summary["diverged_at"] < 5
    assert rows[-1]["test_accuracy"] is not None


def test_stop_on_divergence_false_runs_every_round(tmp_path):
    _, summary, rows = _diverging_run(tmp_path, "num_rounds=3", "stop_on_divergence=false")
    assert summary["diverged_at"] is not None and summary["stopped_early"] is None
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
