"""Every YAML composes against its schema; cross-field checks; the CLI's bad-config path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from fedbgmd.cli import check_config
from fedbgmd.config import ConfigError, register_configs, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["data", "model", "strategy", "client", "attack", "engine"]


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def all_options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


@pytest.mark.parametrize("group, option", list(all_options()))
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "strategy" and option in ("krum", "multikrum", "bulyan"):
        overrides.append("num_clients=8")
    cfg = compose_cfg(*overrides)
    check_config(cfg)
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    check_config(cfg)


def test_required_group_names_exist():
    names = {g: {p.stem for p in (CONF / g).glob("*.yaml")} for g in GROUPS}
    assert {"fedbgmd", "fedavg", "gm", "cm"} <= names["strategy"]
    assert {"fashion_mnist", "synthetic"} <= names["data"]


def test_misspelt_key_fails_at_composition_naming_it():
    with pytest.raises(ConfigCompositionException, match="num_clinets"):
        compose_cfg("num_clinets=3")


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="num_rounds"):
        compose_cfg("num_rounds=many")


def test_cross_field_errors_are_collected_into_one_message():
    cfg = compose_cfg(
        "attack=bit_flip",
        "attack.fraction=0.6",
        "strategy.block.beta=0",
        "client.quantization.bits=20",
    )
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    text = str(info.value)
    assert "attack.fraction" in text and "strategy.block.beta" in text and "bits" in text
    assert len(info.value.problems) == 3


def test_bulyan_needs_4f_plus_3_clients():
    cfg = compose_cfg("strategy=bulyan", "strategy.aggregator.params.f=2", "num_clients=10")
    with pytest.raises(ConfigError, match="4f\\+3"):
        validate(cfg)


def test_unknown_aggregator_and_attack_param_are_reported_at_startup():
    cfg = compose_cfg(
        "strategy.aggregator.name=medianish", "attack=bit_flip", "+attack.params.scal=3"
    )
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert "medianish" in str(info.value) and "scal" in str(info.value)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from fedbgmd.cli import entry; entry()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    "override, needle",
    [
        ("strategy=fedbgmx", "valid strategy options: block_cm, bulyan"),
        ("num_clinets=3", "did you mean num_clients"),
        ("strategy.block.bta=0.2", "did you mean beta"),
        ("num_rounds=many", "num_rounds"),
        ("attack=bit_flip attack.fraction=0.7", "attack.fraction"),
        ("~num_rounds", "num_rounds"),  # deleting a required key
    ],
)
def test_cli_bad_config_exits_2_with_one_clear_message(tmp_path, override, needle):
    proc = run_cli(*override.split(), "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "summary.json").exists()


def test_hydra_flags_reach_hydra(tmp_path):
    """--config-dir etc. are Hydra's: not refused as overrides by the pre-check."""
    (tmp_path / "extra").mkdir()
    run = tmp_path / "run"
    proc = run_cli(
        f"--config-dir={tmp_path / 'extra'}",
        "experiment=smoke",
        "num_rounds=1",
        "plots=false",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (run / "summary.json").exists()
    # a bad value behind a Hydra flag is still caught by the job's own check
    bad = run_cli(
        f"--config-dir={tmp_path / 'extra'}",
        "attack=bit_flip",
        "attack.fraction=0.7",
        f"hydra.run.dir={tmp_path / 'bad'}",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "attack.fraction" in bad.stderr


def test_weighting_an_aggregator_without_a_weighted_form_is_refused():
    cfg = compose_cfg("strategy=cm", "strategy.weighted=true")
    with pytest.raises(ConfigError, match="no weighted form"):
        check_config(cfg)


def test_setting_tells_the_table2_variants_apart():
    """Reports group and deduplicate runs by setting: paper and as_run runs must never merge."""
    from fedbgmd.server import setting_of

    paper = setting_of(compose_cfg("experiment=fmnist_table2", "attack=bit_flip"))
    as_run = setting_of(compose_cfg("experiment=fmnist_table2_as_run", "attack=bit_flip"))
    differs = {k for k in paper if paper[k] != as_run[k]}
    assert {"strategy.block.selector", "strategy.block.memory"} <= differs
    assert (
        paper["strategy.block.memory"] == "mean" and as_run["strategy.block.memory"] == "per_client"
    )
    # the attack's own parameters count too (bit flip x100 vs x5 for every strategy)
    gm_paper = setting_of(compose_cfg("strategy=gm", "attack=bit_flip", "attack.params.scale=100"))
    gm_as_run = setting_of(compose_cfg("strategy=gm", "attack=bit_flip", "attack.params.scale=5"))
    assert gm_paper["attack.params"] == {"scale": 100.0} != gm_as_run["attack.params"]
    assert gm_paper["strategy.block.memory"] is None  # no block step, no memory
    clean = setting_of(compose_cfg("strategy=gm", "attack=none"))
    assert clean["attack.params"] == {} and clean["attack.fraction"] == 0.0


def test_an_attack_given_only_by_target_gets_its_byzantine_clients_and_its_name():
    from fedbgmd.plugins import build_attack
    from fedbgmd.server import setting_of

    target = "fedbgmd.attacks.update.BitFlipAttack"
    cfg = compose_cfg(f"attack.target={target}", "attack.fraction=0.3")
    assert cfg.attack.name == "none"
    spec = build_attack(cfg.attack, cfg.seed, cfg.num_clients)
    assert len(spec.byzantine_ids) == 3 and spec.client_attack is not None
    assert spec.name == target
    setting = setting_of(cfg)  # the report must not file it under the clean runs
    assert setting["attack"] == target and setting["attack.fraction"] == 0.3


def test_byzantine_count_is_the_floor_of_the_decimal_fraction():
    from fedbgmd.seeding import byzantine_ids

    # 0.29 * 100 is 28.999999999999996 in floating point
    assert len(byzantine_ids(0, 100, 0.29)) == 29
    assert len(byzantine_ids(0, 200, 0.29)) == 58
    assert len(byzantine_ids(0, 32, 0.2)) == 6 and len(byzantine_ids(0, 32, 0.4)) == 12
    assert len(byzantine_ids(0, 10, 0.09)) == 0


@pytest.mark.parametrize(
    "override, key",
    [
        ("strategy.server_lr=nan", "strategy.server_lr"),
        ("strategy.server_lr=inf", "strategy.server_lr"),
        ("strategy.max_update_norm=nan", "strategy.max_update_norm"),
        ("strategy.max_update_norm=-1", "strategy.max_update_norm"),
        ("engine.round_timeout_s=0", "engine.round_timeout_s"),
        ("engine.timeout_s=nan", "engine.timeout_s"),
        ("engine.num_gpus=nan", "engine.num_gpus"),
        ("engine.num_cpus=inf", "engine.num_cpus"),
        ("eval_batch_size=0", "eval_batch_size"),
        ("max_eval_samples=0", "max_eval_samples"),
        ("client.optimizer.lr=nan", "client.optimizer.lr"),
        ("client.quantization.method=sign", "client.quantization.bits"),
    ],
)
def test_values_that_would_break_the_run_later_are_refused_at_startup(override, key):
    # NaN compares False with everything: `value <= 0` checks let these through, and the run then
    # failed late (exit 1), silently turned a defence off (max_update_norm=nan) or looked like a
    # divergence (server_lr=nan)
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(override))
    assert any(p.startswith(key) for p in info.value.problems), info.value.problems


def test_the_accepted_neighbours_of_those_values_pass():
    validate(compose_cfg("strategy.max_update_norm=10", "engine.num_gpus=0", "max_eval_samples=1"))
    validate(compose_cfg("client.quantization.method=sign", "client.quantization.bits=1"))


def test_a_new_run_is_not_mixed_into_a_folder_that_holds_one(tmp_path):
    # it appended its rounds to the old metrics.csv and its summary mixed both runs
    run = tmp_path / "run"
    args = ("experiment=smoke", "num_rounds=1", "plots=false", f"hydra.run.dir={run}")
    assert run_cli(*args, "seed=1", cwd=tmp_path).returncode == 0
    before = (run / "metrics.csv").read_text()
    again = run_cli(*args, "seed=2", cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert "resume=" not in again.stderr  # no checkpoint: nothing to resume (issue 16)
    assert (run / "metrics.csv").read_text() == before
    # in a sweep the finished jobs are skipped and the missing ones run
    sweep = tmp_path / "sweep"
    sargs = ("-m", "experiment=smoke", "num_rounds=1", "plots=false", f"hydra.sweep.dir={sweep}")
    assert run_cli(*sargs, "seed=0", cwd=tmp_path).returncode == 0
    first = (sweep / "0" / "metrics.csv").read_text()
    proc = run_cli(*sargs, "seed=0,1", cwd=tmp_path)
    assert proc.returncode == 0 and "skipping this job" in proc.stderr
    assert (sweep / "0" / "metrics.csv").read_text() == first
    assert (sweep / "1" / "summary.json").exists()
