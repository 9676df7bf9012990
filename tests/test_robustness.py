"""Evidence that the defences work: end-to-end CLI runs on the synthetic task, in-process engine.

Each end-to-end group is one Hydra multirun (``-m``) in one subprocess, so the file pays the
interpreter start once per group; most of a short job's time is its three per-run plots.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

from fedbgmd.cli import check_config
from fedbgmd.config import register_configs
from fedbgmd.reporting.writer import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
SEEDS = (0, 1)

# A task where accuracy plateaus around 93 % (10 classes), reached in ~6 rounds at lr 0.3.
HARD_TASK = (
    "experiment=smoke",
    "num_clients=10",
    "num_rounds=8",
    "data.num_classes=10",
    "client.optimizer.lr=0.3",
    "progress=false",
)


def fedbgmd(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from fedbgmd.cli import entry; entry()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=dict(os.environ),
    )


def multirun(sweep_dir: Path, *overrides: str) -> dict[tuple[str, ...], dict]:
    """Run a sweep; return {job overrides (sorted key=value, no fixed ones): summary + path}."""
    proc = fedbgmd("-m", *overrides, f"hydra.sweep.dir={sweep_dir}", cwd=sweep_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing the sweep" not in proc.stderr, proc.stderr[-3000:]  # a job failed
    jobs = {}
    for job in sorted(p for p in sweep_dir.iterdir() if p.name.isdigit()):
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed", (job, summary.get("error"))
        summary["path"] = job
        choice = dict(
            o.split("=", 1) for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text())
        )
        jobs[(choice["strategy"], choice["attack"], choice["seed"])] = summary
    return jobs


# ---------------------------------------------------------------------------------------------
# bit flip, ψ = 0.3: FedAvg collapses, the robust aggregators hold


@pytest.fixture(scope="module")
def bit_flip_runs(tmp_path_factory) -> dict:
    """fedavg/fedbgmd (the folder the report test reads) and cm/gm, clean and ψ = 0.3 bit flip."""
    root = tmp_path_factory.mktemp("bit_flip")
    common = (*HARD_TASK, "attack=none,bit_flip", "attack.fraction=0.3", "seed=0,1")
    main = multirun(root / "main", *common, "strategy=fedavg,fedbgmd")
    more = multirun(root / "more", *common, "strategy=cm,gm")
    assert len(main) == len(more) == 8
    return {"dir": root / "main", "jobs": {**main, **more}}


def final(runs: dict, strategy: str, attack: str, seed: int) -> float:
    return runs["jobs"][(strategy, attack, str(seed))]["final_accuracy"]


@pytest.mark.slow
def test_fedavg_collapses_under_bit_flip(bit_flip_runs):
    for seed in SEEDS:
        summary = bit_flip_runs["jobs"][("fedavg", "bit_flip", str(seed))]
        assert len(summary["byzantine_ids"]) == 3  # ⌊0.3 · 10⌋
        clean = final(bit_flip_runs, "fedavg", "none", seed)
        attacked = final(bit_flip_runs, "fedavg", "bit_flip", seed)
        assert clean > 0.8, f"seed {seed}: clean FedAvg only reached {clean:.3f}"
        # chance is 0.10 with 10 classes; measured 0.07-0.09
        assert attacked < 0.25, f"seed {seed}: attacked FedAvg kept {attacked:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedbgmd", "cm", "gm"])
def test_robust_strategies_hold_under_bit_flip(bit_flip_runs, strategy):
    clean = [final(bit_flip_runs, strategy, "none", s) for s in SEEDS]
    attacked = [final(bit_flip_runs, strategy, "bit_flip", s) for s in SEEDS]
    # measured drops: fedbgmd 0.0-0.4, gm 1.4, cm 1.8-2.6 points; plateau ~92-95 %
    assert statistics.mean(clean) > 0.85, clean
    assert statistics.mean(attacked) >= statistics.mean(clean) - 0.05, (clean, attacked)
    for c, a in zip(clean, attacked):
        assert a >= c - 0.08, (clean, attacked)


# ---------------------------------------------------------------------------------------------
# NaN and malformed replies: every strategy preset rejects them and keeps learning


@pytest.fixture(scope="module")
def defence_runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("defences")
    # 10 clients, ψ = 0.2: 2 attackers, 8 accepted replies >= 4f + 3 = 7 for Bulyan (f = 1)
    return multirun(
        root / "sweep",
        "experiment=smoke",
        "num_clients=10",
        "num_rounds=2",
        "progress=false",
        "attack=nonfinite,malformed",
        "attack.fraction=0.2",
        "seed=0",
        "strategy=" + ",".join(STRATEGIES),
    )


def test_every_strategy_preset_is_covered():
    assert {"fedavg", "fedbgmd", "cm", "gm", "krum", "bulyan"} <= set(STRATEGIES)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["nonfinite", "malformed"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invalid_replies_are_rejected_by_every_strategy(defence_runs, strategy, attack):
    summary = defence_runs[(strategy, attack, "0")]
    assert len(summary["byzantine_ids"]) == 2
    rows = read_metrics(summary["path"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["replies_rejected"] == 2 and r["replies_accepted"] == 8, r
        assert r["test_accuracy"] is not None
    assert summary["final_accuracy"] > 0.7  # 4 classes: chance 0.25; measured 0.98


# ---------------------------------------------------------------------------------------------
# multirun sweep -> fedbgmd report


@pytest.mark.slow
def test_sweep_report_has_one_row_per_setting_with_mean_and_std(bit_flip_runs, tmp_path):
    sweep = bit_flip_runs["dir"]  # fedavg,fedbgmd x none,bit_flip x seed 0,1
    out = tmp_path / "report"
    proc = fedbgmd("report", str(sweep), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    md, csv_path = out / "report.md", out / "report.csv"
    assert md.is_file() and csv_path.is_file()
    for name in ("compare_accuracy_round.png", "compare_accuracy_time.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4
    assert {(r["strategy"], r["attack"]) for r in rows} == set(
        itertools.product(["fedavg", "fedbgmd"], ["none", "bit_flip"])
    )
    for r in rows:
        assert r["n_completed"] == "2" and r["n_failed"] == "0"
        assert sorted(r["seeds"].split()) == ["0", "1"]
        accs = [100 * final(bit_flip_runs, r["strategy"], r["attack"], s) for s in SEEDS]
        assert float(r["final_acc_mean"]) == pytest.approx(statistics.mean(accs))
        assert float(r["final_acc_std"]) == pytest.approx(statistics.stdev(accs))  # ddof=1
    by = {(r["strategy"], r["attack"]): float(r["final_acc_mean"]) for r in rows}
    assert by[("fedavg", "bit_flip")] < 25 < 85 < by[("fedbgmd", "bit_flip")]

    text = md.read_text()
    table = text.split("## Results per setting", 1)[1].split("\n## ", 1)[0]
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and "±" in ln]
    assert len(body) == 4
    for r in rows:
        cell = f"{float(r['final_acc_mean']):.2f} ± {float(r['final_acc_std']):.2f}"
        assert any(cell in ln and r["strategy"] in ln and r["attack"] in ln for ln in body)
    assert "compare_accuracy_round.png" in text


# ---------------------------------------------------------------------------------------------
# the sweep presets: every point of their grid is a valid configuration


@pytest.mark.parametrize("preset", ["sweep_attacks", "sweep_fmnist"])
def test_sweep_preset_grid_is_the_attack_grid_and_valid(preset):
    raw = yaml.safe_load((CONF / "experiment" / f"{preset}.yaml").read_text())
    grid = {k: str(v).split(",") for k, v in raw["hydra"]["sweeper"]["params"].items()}
    assert grid == {
        "strategy": ["fedavg", "cm", "gm", "fedbgmd"],
        "attack": ["none", "bit_flip", "gaussian", "feature_noise"],
        "attack.fraction": ["0.2", "0.4"],
        "seed": ["0", "1", "2"],
    }
    # only the attack axes have cross-field rules; strategies are checked by test_config
    seedless = {"strategy": ["fedbgmd"], **{k: grid[k] for k in ("attack", "attack.fraction")}}
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        for combo in itertools.product(*seedless.values()):
            overrides = [f"{k}={v}" for k, v in zip(seedless, combo)]
            cfg = compose("config", overrides=[f"experiment={preset}", *overrides])
            check_config(cfg)
            assert cfg.engine.name == "inprocess"
            assert [cfg.strategy.name, cfg.attack.fraction] == [combo[0], float(combo[2])]
