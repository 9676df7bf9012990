"""No silent failures (issue 16): bad keys, mismatched model/data, invalid sweep jobs, crashing
plug-ins, runs that fail before training, missing data, the CLI's identity, the run folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from fedbgmd.cli import check_config, explain, run
from fedbgmd.config import ConfigError, register_configs, validate
from fedbgmd.reporting.writer import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from fedbgmd.cli import entry; entry()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


PLUGINS = """
import torch
from fedbgmd.attacks.base import ClientAttack
from fedbgmd.core import AggregationRefused, AggregationResult
from fedbgmd.strategies import RobustStrategy


def crashing_aggregator(x, weights=None):
    raise RuntimeError("boom in the aggregator")


def plain_mean(x, weights=None):
    return AggregationResult(vector=x.mean(dim=0))


def refusing_aggregator(x, weights=None):
    raise AggregationRefused("not this round")


def odd_rounds_refused(x, weights=None):
    odd_rounds_refused.calls = getattr(odd_rounds_refused, "calls", 0) + 1
    if odd_rounds_refused.calls % 2:
        raise AggregationRefused("odd call")
    return AggregationResult(vector=x.mean(dim=0))


def crashing_selector(col_sq_norms, k, generator=None):
    raise KeyError("boom in the selector")


class CrashingStrategy(RobustStrategy):
    def aggregate_updates(self, updates, client_ids, server_round, weights=None):
        raise ValueError("boom in the strategy")


class CrashingAttack(ClientAttack):
    kind = "update"

    def corrupt_update(self, update, generator=None, sample_updates=None):
        raise ZeroDivisionError("boom in the attack")
"""


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    name = f"silent_plugins_{abs(hash(str(tmp_path)))}"
    (folder / f"{name}.py").write_text(PLUGINS)
    monkeypatch.syspath_prepend(str(folder))
    return name, folder


SMOKE = ("experiment=smoke", "num_rounds=2", "plots=false", "progress=false")


# 1 ------------------------------------------------------------------------------ config keys
@pytest.mark.parametrize(
    "override, named, suggestion",
    [
        ("+num_round=50", "num_round", "num_rounds"),
        ("+attack.fractoin=0.3", "attack.fractoin", "attack.fraction"),
        ("+strategy.block.bta=0.3", "strategy.block.bta", "strategy.block.beta"),
    ],
)
def test_an_added_key_outside_a_params_map_is_refused(override, named, suggestion):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("experiment=smoke", override))
    assert f"{named}: no such setting; did you mean {suggestion}?" in str(info.value)


def test_plugin_params_maps_still_take_new_keys():
    validate(compose_cfg("experiment=smoke", "+strategy.params.drop=1", "+attack.params.x=2"))


def test_the_cli_refuses_an_added_typo_with_exit_2(tmp_path):
    proc = cli("experiment=smoke", "+num_round=50", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "did you mean num_rounds" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("group", ["data", "model", "strategy", "client", "attack", "engine"])
def test_schema_bases_are_not_options_of_their_group(group):
    with pytest.raises(ConfigCompositionException, match=f"Could not find '{group}/base_{group}'"):
        compose_cfg(f"{group}=base_{group}")


def test_key_hints_come_from_the_chosen_plugin_not_the_default_one():
    overrides = ["strategy=ctm", "strategy.aggregator.params.trm=0.1"]
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(*overrides)
    message = explain(info.value, overrides)
    assert "did you mean trim?" in message
    assert "eps" not in message and "max_iter" not in message  # GM's, the default strategy's


# 2 ------------------------------------------------------------------------- model follows data
@pytest.mark.parametrize(
    "data, model", [("synthetic", "mlp"), ("fashion_mnist", "cnn"), ("cifar10", "resnet18")]
)
def test_each_data_group_brings_a_model_that_fits(data, model):
    cfg = compose_cfg(f"data={data}")
    assert cfg.model.name == model
    validate(cfg)
    assert compose_cfg(f"data={data}", "model=logreg").model.name == "logreg"  # model= wins


def test_an_explicit_model_that_cannot_take_the_data_is_refused_naming_both():
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg("data=synthetic", "model=cnn"))
    assert "model=cnn" in str(info.value) and "data=synthetic" in str(info.value)
    validate(compose_cfg("data=synthetic", "model=cnn", "data.image_shape=[1,16,16]"))


# 3 ------------------------------------------------------------------------------------ sweeps
def test_a_sweep_with_an_invalid_job_starts_no_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        *SMOKE,
        "attack=bit_flip",
        "attack.fraction=0.2,0.7",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "job 1 (" in proc.stderr and "attack.fraction=0.7 must satisfy" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not sweep.exists()  # job 0 (valid) did not run either


def test_a_sweep_over_an_unknown_option_gets_the_single_run_message(tmp_path):
    proc = cli("-m", *SMOKE, "strategy=fedbgmd,bogus", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "valid strategy options: block_cm" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("launcher", ["basic", "fused"])
def test_a_sweep_runs_every_job_and_exits_1_when_one_failed(tmp_path, plugins, launcher):
    module, folder = plugins
    sweep = tmp_path / "sweep"
    proc = cli(
        "-m",
        *SMOKE,
        "strategy=fedavg",
        f"strategy.aggregator.target={module}.crashing_aggregator,{module}.plain_mean",
        f"hydra.sweep.dir={sweep}",
        *(["hydra/launcher=fused"] if launcher == "fused" else []),
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert summary_of(sweep / "0")["status"] == "failed"
    assert summary_of(sweep / "1")["status"] == "completed"  # the sweep went on past job 0
    assert "1 failed job(s)" in proc.stderr and str(sweep / "0") in proc.stderr
    assert str(sweep / "1") not in proc.stderr.rpartition("failed job(s)")[2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+strategy.params.bogus=1"], "unexpected keyword argument 'bogus'"),
        (["strategy=cclip", "strategy.block.enabled=true"], "keeps state between rounds"),
        (["attack=nan"], "renamed 'nonfinite'"),
        (
            ["strategy=ctm", "strategy.aggregator.params.beta=0.1"],
            "strategy.aggregator.params.trim",
        ),
        (["data.alpha=0.3"], "data.partitioner.params.alpha"),
        (["attack=nonfinite", "attack.params.fraction=0.1"], "attack.params.coord_fraction"),
    ],
)
def test_a_bad_strategy_or_a_renamed_key_exits_2_before_anything_runs(tmp_path, overrides, message):
    proc = cli(*SMOKE, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


# 4 ----------------------------------------------------------------------- plug-ins fail loudly
@pytest.mark.parametrize(
    "role, overrides, message",
    [
        (
            "aggregator",
            ["strategy=fedavg", "strategy.aggregator.target={m}.crashing_aggregator"],
            "boom in the aggr",
        ),
        ("selector", ["strategy.block.selector={m}.crashing_selector"], "boom in the selector"),
        ("strategy", ["strategy.target={m}.CrashingStrategy"], "boom in the strategy"),
        ("attack", ["attack.target={m}.CrashingAttack", "attack.fraction=0.4"], "boom in the att"),
    ],
)
def test_a_crashing_plugin_fails_the_run_with_its_traceback(
    tmp_path, plugins, caplog, role, overrides, message
):
    module, _ = plugins
    cfg = compose_cfg(*SMOKE, *(o.format(m=module) for o in overrides))
    check_config(cfg)
    assert run(cfg, tmp_path / "run") == 1
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "failed" and message in summary["error"]
    assert message in summary["traceback"] and "Traceback" in summary["traceback"]
    assert summary["targets"][role].startswith(module)  # 10: labelled by what ran
    logged = [r.getMessage() for r in caplog.records if r.name == "fedbgmd"]  # cli.log, stderr
    assert any("Traceback" in m and message in m for m in logged)


def test_a_refused_round_is_skipped_counted_and_reported(tmp_path, plugins):
    from fedbgmd.reporting.report import build_report

    module, _ = plugins
    cfg = compose_cfg(
        *SMOKE,
        "num_rounds=4",
        "strategy=fedavg",
        f"strategy.aggregator.target={module}.odd_rounds_refused",
    )
    assert run(cfg, tmp_path / "sweep" / "0") == 0
    summary = summary_of(tmp_path / "sweep" / "0")
    assert summary["status"] == "completed" and summary["skipped_rounds"] == 2
    md = build_report(tmp_path / "sweep", tmp_path / "report").read_text()
    assert "2 rounds skipped" in md


def test_a_run_whose_every_round_was_skipped_is_not_completed(tmp_path, plugins):
    module, _ = plugins
    cfg = compose_cfg(
        *SMOKE, "strategy=fedavg", f"strategy.aggregator.target={module}.refusing_aggregator"
    )
    assert run(cfg, tmp_path / "run") == 1
    summary = summary_of(tmp_path / "run")
    assert summary["status"] == "failed" and summary["skipped_rounds"] == 2
    assert "every round was skipped" in summary["error"] and "not this round" in summary["error"]


def test_the_cli_puts_a_plugin_traceback_in_the_run_log_and_on_stderr(tmp_path, plugins):
    module, folder = plugins
    run_dir = tmp_path / "run"
    proc = cli(
        *SMOKE,
        f"attack.target={module}.CrashingAttack",
        "attack.fraction=0.4",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])},
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "boom in the attack" in proc.stderr
    log = (run_dir / "cli.log").read_text()
    assert "Traceback" in log and "boom in the attack" in log
    assert summary_of(run_dir)["status"] == "failed"


# 5, 6 --------------------------------------------------------------- failures before training
def test_a_run_failing_before_training_leaves_a_failed_summary_and_is_retried(tmp_path):
    run_dir = tmp_path / "run"
    missing = tmp_path / "nowhere"
    args = (
        "data=fashion_mnist",
        f"data.root={missing}",
        "engine=inprocess",
        "num_rounds=1",
        "plots=false",
        f"hydra.run.dir={run_dir}",
    )
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 1
    summary = summary_of(run_dir)
    assert summary["status"] == "failed" and summary["config"]["data"]["root"] == str(missing)
    for text in (summary["error"], proc.stderr):  # 6: the data set, where, how to get it
        assert "fashion_mnist" in text and str(missing) in text and "data.download=true" in text
    assert "URLError" not in proc.stderr and "Traceback" not in proc.stderr
    again = cli(*args, cwd=tmp_path)  # retried, not "already holds a run"
    assert again.returncode == 1 and "running it again" in again.stderr
    assert "resume=" not in again.stderr  # nothing to resume from


def test_a_failed_download_names_the_data_set_and_the_folder(tmp_path, monkeypatch):
    from urllib.error import URLError

    from fedbgmd import data

    def offline(folder, root):
        raise URLError("no network")

    monkeypatch.setattr(data, "_torchvision_download", offline)
    with pytest.raises(data.DatasetMissingError) as info:
        data.load_dataset("mnist", root=str(tmp_path / "mnist"), download=True)
    text = str(info.value)
    assert "mnist" in text and str(tmp_path / "mnist") in text and "no network" in text
    assert "data.root=" in text


# 7 --------------------------------------------------------------------------------- identity
def test_help_starts_with_fedbgmd_usage_and_version_names_the_stack(tmp_path):
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    head = proc.stdout[:4000]
    assert head.startswith("fedbgmd") and "report" in head and "resume" in head
    assert "attack:" in head and "base_attack" not in proc.stdout
    assert head.count("  fedbgmd ") >= 3  # examples
    assert proc.stdout.index("--multirun") > proc.stdout.index("Examples")  # then Hydra's flags
    version = cli("--version", cwd=tmp_path)
    assert version.returncode == 0
    for name in ("fedbgmd", "torch", "flwr", "hydra"):
        assert name in version.stdout


# 8 -------------------------------------------------------------------------------- run folder
def test_the_run_folder_is_small_and_readable(tmp_path):
    cfg = compose_cfg("experiment=smoke", "num_rounds=2", "progress=false")
    assert run(cfg, tmp_path / "run") == 0
    folder = tmp_path / "run"
    assert not (folder / "checkpoint.pt").exists()  # only when asked
    mode = stat.S_IMODE((folder / "summary.json").stat().st_mode)
    assert mode == stat.S_IMODE((folder / "config.yaml").stat().st_mode)  # not 0600
    asked = compose_cfg("experiment=smoke", "num_rounds=2", "progress=false", "checkpoint_last=1")
    assert run(asked, tmp_path / "kept") == 0
    assert (tmp_path / "kept" / "checkpoint.pt").is_file()


def test_rejected_replies_are_summarised_once_per_round(tmp_path, caplog):
    cfg = compose_cfg(*SMOKE, "attack=nonfinite", "attack.fraction=0.4")
    with caplog.at_level("WARNING", logger="fedbgmd"):
        assert run(cfg, tmp_path / "run") == 0
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 2  # one per round, 2 Byzantine replies each
    assert all("2 of 5 sampled replies rejected (non_finite: 2)" in m for m in rejected)


def test_plots_are_titled_by_the_run_and_skip_constant_panels(tmp_path):
    from fedbgmd.reporting import plots

    cfg = compose_cfg(*SMOKE, "attack=sign_flip", "attack.fraction=0.2", "seed=3")
    assert run(cfg, tmp_path / "run") == 0
    title = plots.run_title(tmp_path / "run")
    for part in ("fedbgmd", "sign_flip", "ψ=0.2", "seed 3"):
        assert part in title
    panels = plots.diagnostic_panels(tmp_path / "run")
    assert "bytes_up" not in panels  # the same every round
    rows = read_metrics(tmp_path / "run")[1:]
    for column in panels:
        assert len({r[column] for r in rows}) > 1


# 10 ---------------------------------------------------------------------------- custom labels
def test_custom_targets_label_the_run(plugins):
    from fedbgmd.reporting.setting import run_labels

    labels = run_labels(
        {
            "strategy": {
                "name": "gm",
                "target": "my.Strategy",
                "aggregator": {"target": "my.agg"},
                "block": {"selector": "my.sel"},
            },
            "attack": {"name": "none", "target": "my.Attack", "fraction": 0.2},
        }
    )
    assert labels["targets"] == {
        "strategy": "my.Strategy",
        "aggregator": "my.agg",
        "selector": "my.sel",
        "attack": "my.Attack",
    }
    assert labels["strategy"] == "gm[strategy=my.Strategy, aggregator=my.agg]"
    assert labels["attack"] == "my.Attack"
    plain = run_labels({"strategy": {"name": "gm", "block": {"selector": "topk"}}, "attack": {}})
    assert plain["targets"] == {} and plain["strategy"] == "gm"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 320, len(lines)
