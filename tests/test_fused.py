"""Fused sweeps: every fused job equals the same job run alone on the in-process engine.

Reference: the single-run path (``fedbgmd.cli.run`` with ``engine=inprocess``, batched clients),
which the rest of the suite checks against the papers and brute force. The fused group computes
the same rounds with batched kernels (nested vmap over runs x clients, bmm instead of mv, a
chunked float64 Gram sum), so on models without dropout (the smoke preset's mlp) the metrics
agree to float32 rounding: relative 1e-4 on losses and memory norms, 1e-5 absolute on the
relative residual, accuracies within one test sample, and identical counters (GM iterations,
accepted/rejected replies, rejection reasons). Dropout masks differ by design (see
fedbgmd.fused), so the CNN is not compared here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from fedbgmd import fused
from fedbgmd.cli import check_config
from fedbgmd.cli import run as run_alone
from fedbgmd.config import register_configs
from fedbgmd.fused import fuse_reason, plan_groups, run_jobs
from fedbgmd.reporting.writer import read_metrics, read_metrics_jsonl, read_summary
from fedbgmd.strategies import RobustStrategy

BASE = [
    "experiment=smoke",
    "client.local_steps=1",
    "num_clients=8",
    "num_rounds=4",
    "plots=false",
    "progress=false",
    "engine.batched=true",
    "strategy.weighted=false",
]


def cfg_for(*overrides: str):
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, *overrides])
    check_config(cfg)
    return cfg


def _close(a: float | None, b: float | None, rel: float, abs_: float = 0.0) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= max(abs_, rel * max(abs(a), abs(b)))


def assert_same_run(fused: Path, alone: Path) -> None:
    a, b = read_metrics_jsonl(fused), read_metrics_jsonl(alone)
    assert [r["round"] for r in a] == [r["round"] for r in b]
    n_test = 500  # the synthetic preset's test set
    for ra, rb in zip(a, b):
        where = f"round {ra['round']}"
        for key in ("test_loss", "train_loss", "memory_norm"):
            assert _close(ra[key], rb[key], rel=1e-4, abs_=1e-7), (where, key, ra[key], rb[key])
        assert _close(ra["relative_residual"], rb["relative_residual"], rel=0, abs_=1e-5), where
        acc_a, acc_b = ra["test_accuracy"], rb["test_accuracy"]
        assert (acc_a is None) == (acc_b is None), where
        if acc_a is not None:
            assert abs(acc_a - acc_b) <= 1.0 / n_test + 1e-12, (where, acc_a, acc_b)
        for key in ("agg_iterations", "agg_converged", "replies_accepted", "replies_rejected"):
            assert ra[key] == rb[key], (where, key, ra[key], rb[key])
        assert (ra["rejections"] or {}) == (rb["rejections"] or {}), where
        assert (ra["lr"] is None and rb["lr"] is None) or _close(ra["lr"], rb["lr"], rel=1e-12)
    sa, sb = read_summary(fused), read_summary(alone)
    assert sa.get("engine") == "fused", "the job ran alone: its fused group failed"
    assert sa["status"] == sb["status"] == "completed"
    assert sa["diverged_at"] == sb["diverged_at"]
    assert sa["byzantine_ids"] == sb["byzantine_ids"]
    assert sa["setting"] == sb["setting"]


VARIANTS = {
    "fedavg": ["strategy=fedavg"],
    "fedavg_weighted": ["strategy=fedavg", "strategy.weighted=true"],
    "cm_bitflip": ["strategy=cm", "attack=bit_flip", "attack.fraction=0.25"],
    "gm_gaussian": ["strategy=gm", "attack=gaussian", "attack.fraction=0.25"],
    "bgmd_gaussian_on_gradient": [
        "strategy=fedbgmd",
        "attack=gaussian",
        "+attack.params.on=gradient",
        "attack.fraction=0.25",
    ],
    "bgmd_topk_impulse": [
        "strategy=fedbgmd",
        "strategy.block.selector=topk",
        "attack=impulse",
        "attack.fraction=0.25",
    ],
    "bgmd_sample_mean_featnoise": [
        "strategy=fedbgmd",
        "strategy.block.memory=mean",
        "strategy.block.beta=0.2",
        "attack=feature_noise",
        "attack.fraction=0.25",
    ],
    "bgmd_nomemory_labelflip_momentum": [
        "strategy=fedbgmd",
        "strategy.block.memory=none",
        "strategy.server_momentum=0.9",
        "strategy.server_nesterov=true",
        "attack=label_flip",
        "attack.fraction=0.25",
    ],
    "bgmd_partial_participation_backdoor": [
        "strategy=fedbgmd",
        "strategy.clients_per_round=5",
        "attack=backdoor",
        "attack.fraction=0.25",
    ],
    "krum_alie_omniscient": ["strategy=krum", "attack=alie_omniscient", "attack.fraction=0.25"],
    # IPM rows of norm 1e8·|mean| > max_update_norm: rejected as replies (fused and alone)
    "gm_ipm_omniscient_norm_rejected": [
        "strategy=gm",
        "strategy.max_update_norm=100",
        "attack=ipm_omniscient",
        "attack.params.epsilon=1e8",
        "attack.fraction=0.25",
    ],
    "block_cm_signflip": ["strategy=block_cm", "attack=sign_flip", "attack.fraction=0.25"],
    "gm_nan_rejected": ["strategy=gm", "attack=nonfinite", "attack.fraction=0.25"],
    "bgmd_nan_rejected": ["strategy=fedbgmd", "attack=nonfinite", "attack.fraction=0.25"],
    "ctm_client_momentum": ["strategy=ctm", "client.optimizer.momentum=0.9"],
    "gm_momentum_skipped_rounds": [
        "strategy=gm",
        "strategy.server_momentum=0.9",
        "strategy.clients_per_round=5",
        "strategy.min_replies=5",
        "attack=nonfinite",
        "attack.fraction=0.25",
        "num_rounds=8",
    ],
}


@pytest.mark.slow
def test_fused_jobs_equal_the_same_jobs_run_alone(tmp_path: Path, monkeypatch) -> None:
    """One fused sweep over strategies, block selectors and memories, update/data/omniscient
    attacks, rejected replies, partial participation, server and client momentum (all seed 0:
    the synthetic data depend on the seed); gradients and evaluation by chunks of runs."""
    monkeypatch.setattr("fedbgmd.fused.group.GRAD_RUNS", 5)  # where the round reads them
    monkeypatch.setattr("fedbgmd.fused.group.EVAL_RUNS", 3)
    names = list(VARIANTS)
    cfgs = [cfg_for(*VARIANTS[n]) for n in names]
    groups, alone = plan_groups(cfgs)
    # everything fuses: one group, one for the jobs sampling 5 of 8 clients a round (4 rounds),
    # one for the job of 8 rounds
    assert alone == {} and len(groups) == 3
    status = run_jobs([(c, tmp_path / f"fused-{n}") for n, c in zip(names, cfgs)])
    assert set(status.values()) == {0}
    for n, c in zip(names, cfgs):
        assert run_alone(c, tmp_path / f"alone-{n}") == 0
        assert_same_run(tmp_path / f"fused-{n}", tmp_path / f"alone-{n}")
    # each fused job logs its evaluated rounds and its outcome in its own cli.log
    logged = (tmp_path / f"fused-{names[0]}" / "cli.log").read_text().splitlines()
    assert any("test acc" in ln for ln in logged) and logged[-1].endswith(
        "completed (fused engine)"
    )
    # the rejected replies and skipped rounds really were exercised
    rows = read_metrics(tmp_path / "fused-gm_nan_rejected")
    assert sum(r["replies_rejected"] or 0 for r in rows) > 0
    for how in ("fused", "alone"):  # the omniscient rows met max_update_norm
        rows = read_metrics_jsonl(tmp_path / f"{how}-gm_ipm_omniscient_norm_rejected")
        trained = [r for r in rows if r.get("round")]  # round 0: the initial evaluation
        assert trained and all(r["rejections"] == {"norm_too_large": 2} for r in trained)
    rows = read_metrics_jsonl(tmp_path / "fused-gm_momentum_skipped_rounds")
    assert any(r.get("skipped") for r in rows) and not all(r.get("skipped") for r in rows[1:])


@pytest.mark.slow
def test_seeds_and_learning_rates_fuse_per_data_seed(tmp_path: Path) -> None:
    """Synthetic data depend on the seed (one group per seed); learning rates may differ."""
    cfgs = [
        cfg_for("strategy=fedbgmd", "seed=1", "attack=bit_flip", "attack.fraction=0.25"),
        cfg_for("strategy=gm", "seed=1", "client.optimizer.lr=0.05"),
        cfg_for("strategy=gm", "seed=2"),
    ]
    groups, alone = plan_groups(cfgs)
    assert sorted(map(sorted, groups)) == [[0, 1], [2]] and alone == {}
    run_jobs([(c, tmp_path / f"f{i}") for i, c in enumerate(cfgs)])
    for i, c in enumerate(cfgs):
        run_alone(c, tmp_path / f"a{i}")
        assert_same_run(tmp_path / f"f{i}", tmp_path / f"a{i}")


@pytest.mark.slow
def test_a_diverging_job_stops_alone(tmp_path: Path) -> None:
    """FedAvg under a huge bit flip overflows and stops; its group mate runs every round."""
    bad = cfg_for(
        "strategy=fedavg",
        "attack=bit_flip",
        "attack.fraction=0.375",
        "attack.params.scale=1e38",
        "num_rounds=6",
    )
    good = cfg_for("strategy=gm", "num_rounds=6")
    assert run_jobs([(bad, tmp_path / "bad"), (good, tmp_path / "good")]) == {0: 0, 1: 0}
    run_alone(bad, tmp_path / "bad-alone")
    fused, alone = read_summary(tmp_path / "bad"), read_summary(tmp_path / "bad-alone")
    assert fused["diverged_at"] is not None
    assert fused["diverged_at"] == alone["diverged_at"]
    assert fused["rounds"] == alone["rounds"] < 6
    assert read_summary(tmp_path / "good")["rounds"] == 6


class CustomStrategy(RobustStrategy):
    """A user's strategy class: the fused engine cannot know what it overrides."""


def test_jobs_that_cannot_fuse_say_why() -> None:
    cases = {
        "local_steps": (["client.local_steps=2"], "local_steps"),
        "adam": (["client=adam"], "optimizer"),
        "quantized": (["client.quantization.method=qsgd"], "quantized"),
        "message": (["attack=malformed", "attack.fraction=0.25"], "message attack"),
        "client_alie": (["attack=alie", "attack.fraction=0.25"], "extra local updates"),
        "strategy": (["strategy.target=tests.test_fused.CustomStrategy"], "custom strategy"),
    }
    for name, (overrides, words) in cases.items():
        reason = fuse_reason(cfg_for(*overrides))
        assert reason is not None and words in reason, (name, reason)
    assert fuse_reason(cfg_for()) is None


def test_groups_split_on_what_must_match() -> None:
    base = cfg_for()
    other_rounds = cfg_for("num_rounds=5")
    other_model = cfg_for("model=logreg")
    other_batch = cfg_for("client.batch_size=16")
    groups, alone = plan_groups([base, other_rounds, other_model, other_batch, cfg_for()])
    assert alone == {}
    assert sorted(map(sorted, groups)) == [[0, 4], [1], [2], [3]]


@pytest.mark.slow
def test_a_job_that_cannot_fuse_runs_alone_and_is_not_dropped(tmp_path: Path) -> None:
    fusable = cfg_for("strategy=gm")
    alone = cfg_for("strategy=gm", "client.local_steps=2")
    status = run_jobs([(fusable, tmp_path / "a"), (alone, tmp_path / "b")])
    assert status == {0: 0, 1: 0}
    assert read_summary(tmp_path / "a")["engine"] == "fused"
    assert read_summary(tmp_path / "b")["status"] == "completed"
    assert "engine" not in read_summary(tmp_path / "b")  # the in-process engine's summary


def _fedbgmd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = "from fedbgmd.cli import entry; entry()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_launcher_runs_a_sweep_and_resumes_it(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *BASE,
        "strategy=fedavg,gm",
        "attack=none,bit_flip",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=fused",
    ]
    first = _fedbgmd(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "fusing 4 jobs into one computation" in first.stdout + first.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        assert read_summary(job)["status"] == "completed"
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            assert (job / ".hydra" / name).is_file()
        assert len(read_metrics(job)) == 5  # rounds 0..4
    # an interrupted job (no summary) is run again; finished ones are skipped
    (jobs[1] / "summary.json").unlink()
    again = _fedbgmd(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already holds a completed run; skipping it") == 3
    assert "fusing 1 jobs into one computation" in again.stdout + again.stderr
    assert (jobs[1] / "metrics.csv.interrupted").is_file()
    assert len(read_metrics(jobs[1])) == 5
    assert read_summary(jobs[1])["status"] == "completed"


@pytest.mark.slow
def test_launcher_refuses_a_bad_job_before_running_any(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    res = _fedbgmd(
        "-m",
        *BASE,
        "attack=bit_flip",
        "attack.fraction=0.2,0.7",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=fused",
        cwd=tmp_path,
    )
    assert res.returncode == 2
    assert "attack.fraction" in res.stderr
    assert not any(p.name.isdigit() and (p / "metrics.csv").exists() for p in sweep.iterdir())


@pytest.mark.slow
def test_clients_smaller_than_a_batch_run_alone(tmp_path: Path, caplog) -> None:
    """12 samples per client < batch 32: the fused round has no padded batches, so the job runs
    alone (the in-process engine pads them) and the log says why."""
    cfg = cfg_for("strategy=gm", "data.num_train=100")
    with caplog.at_level("WARNING", logger="fedbgmd"):
        assert run_jobs([(cfg, tmp_path / "small")]) == {0: 0}
    assert "batch_size 32" in caplog.text
    summary = read_summary(tmp_path / "small")
    assert summary["status"] == "completed" and "engine" not in summary


cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_fused_on_cuda_equals_the_jobs_run_alone_on_cuda(tmp_path: Path) -> None:
    """The device path (planner copies, CUDA generators, batched GM in float64 on the GPU)."""
    names = ["cm_bitflip", "gm_gaussian", "bgmd_topk_impulse", "bgmd_nan_rejected"]
    cfgs = [cfg_for(*VARIANTS[n], "device=cuda") for n in names]
    assert set(run_jobs([(c, tmp_path / f"f-{n}") for n, c in zip(names, cfgs)]).values()) == {0}
    for n, c in zip(names, cfgs):
        assert run_alone(c, tmp_path / f"a-{n}") == 0
        assert_same_run(tmp_path / f"f-{n}", tmp_path / f"a-{n}")


@cuda
def test_fused_cnn_with_dropout_runs_on_cuda_with_planner_workers(tmp_path: Path) -> None:
    """The Table 2 model (dropout) through nested vmap on the GPU, planned by forked workers."""
    common = ["model=cnn", "data.image_shape=[1,28,28]", "device=cuda", "client.batch_size=16"]
    cfgs = [
        cfg_for(*common, "strategy=fedbgmd", "attack=backdoor", "attack.fraction=0.25"),
        cfg_for(*common, "strategy=gm", "attack=feature_noise", "attack.fraction=0.25"),
    ]
    assert run_jobs([(c, tmp_path / f"j{i}") for i, c in enumerate(cfgs)], workers=2) == {
        0: 0,
        1: 0,
    }
    for i in range(2):
        s = read_summary(tmp_path / f"j{i}")
        assert s["engine"] == "fused" and s["status"] == "completed"
        assert s["final_accuracy"] is not None


@pytest.mark.slow
def test_runs_with_other_gm_settings_keep_them(tmp_path: Path) -> None:
    """GM's eps/max_iter are per run: a max_iter=3 job batched beside max_iter=1000 jobs stops
    at 3 iterations, as alone (the batched solver is called once per setting)."""
    cfgs = [
        cfg_for("strategy=gm"),
        cfg_for("strategy=gm", "strategy.aggregator.params.max_iter=3"),
        cfg_for("strategy=fedbgmd", "strategy.aggregator.params.max_iter=3"),
        cfg_for("strategy=fedbgmd"),
    ]
    assert len(plan_groups(cfgs)[0]) == 1
    run_jobs([(c, tmp_path / f"f{i}") for i, c in enumerate(cfgs)])
    for i, c in enumerate(cfgs):
        run_alone(c, tmp_path / f"a{i}")
        assert_same_run(tmp_path / f"f{i}", tmp_path / f"a{i}")
    assert {r["agg_iterations"] for r in read_metrics(tmp_path / "f1")[1:]} == {3}


@pytest.mark.slow
def test_a_failed_group_can_fail_instead_of_running_alone(tmp_path: Path, monkeypatch) -> None:
    """on_group_failure="fail" (a time-boxed GPU run): the jobs are failed, not rerun alone."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(fused.FusedGroup, "_round", broken)
    cfgs = [cfg_for("strategy=gm"), cfg_for("strategy=cm")]
    jobs = [(c, tmp_path / f"j{i}") for i, c in enumerate(cfgs)]
    assert run_jobs(jobs, on_group_failure="fail") == {0: 1, 1: 1}
    summary = read_summary(tmp_path / "j0")
    assert summary["status"] == "failed" and "injected fault" in summary["error"]
    assert run_jobs([(c, tmp_path / f"k{i}") for i, c in enumerate(cfgs)]) == {0: 0, 1: 0}
    assert "engine" not in read_summary(tmp_path / "k0")  # rerun alone, completed


@pytest.mark.slow
def test_a_sweep_extended_into_its_folder_is_refused(tmp_path: Path) -> None:
    """Hydra numbers jobs by position: more values shift them onto other jobs' folders."""
    sweep = tmp_path / "sweep"
    common = ["-m", *BASE, "num_rounds=1", f"hydra.sweep.dir={sweep}", "hydra/launcher=fused"]
    assert _fedbgmd(*common, "strategy=gm,cm", "seed=0,1", cwd=tmp_path).returncode == 0
    res = _fedbgmd(*common, "strategy=gm,cm", "seed=0,1,2", cwd=tmp_path)
    assert res.returncode == 2
    assert "holds the run of another job" in res.stderr
    # the same command again continues (nothing to do)
    again = _fedbgmd(*common, "strategy=gm,cm", "seed=0,1", cwd=tmp_path)
    assert again.returncode == 0 and again.stderr.count("skipping it") == 4
