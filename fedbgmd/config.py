"""Typed configuration: one dataclass schema per config group, registered in Hydra's ConfigStore.

The YAML presets in ``conf/`` extend these schemas, so a misspelt key or a value of the wrong
type fails when Hydra composes the config, naming the key. Rules that involve several fields
(ψ < 1/2, 0 < β <= 1, n >= 4f + 3 for Bulyan, ...) are checked once in :func:`validate`, which
collects every problem and raises one :class:`ConfigError`.

Plug-in parameters (an aggregator's ``f``, an attack's ``scale``) live in free-form ``params``
maps because each plug-in has its own; they are checked when the plug-in is constructed at
startup (:func:`fedbgmd.checks.check_components`), which names the unknown parameter.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fedbgmd.core.counts import fraction_floor
from fedbgmd.reporting.setting import attack_label

# omegaconf.MISSING, spelt out: the schemas are plain dataclasses that the Flower-side code
# (engines, clients, strategies) reads without loading omegaconf or hydra; only composing a
# config (compose_config, register_configs, the CLI) imports them
MISSING: Any = "???"


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class PartitionerConfig:
    """A Flower Datasets partitioner class by ``target`` (dotted path; it replaces
    ``data.partition``) and its constructor parameters, named as in Flower Datasets
    (``alpha``, ``num_shards_per_partition``, ``num_classes_per_partition``, ...); fedbgmd sets
    ``num_partitions``, ``partition_by`` and ``seed`` itself."""

    target: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class HFDataConfig:
    """data=hf: a Hugging Face data set loaded by flwr_datasets.FederatedDataset."""

    dataset: str = "ylecun/mnist"  # a hub name (needs internet once) or a local data folder
    subset: str | None = None
    feature_key: str = "image"
    label_key: str = "label"
    train_split: str = "train"
    test_split: str = "test"


@dataclass
class DataConfig:
    """Which data set, where it lives, and how it is split among clients."""

    name: str = MISSING  # fashion_mnist | mnist | cifar10 | synthetic | hf
    root: str | None = None  # explicit folder; None searches the known places
    download: bool = False  # let torchvision download (needs internet)
    # iid | dirichlet | shards: Flower Datasets' Iid/Dirichlet/ShardPartitioner
    # (fedbgmd.partitions.PARTITION_SCHEMES: dirichlet's alpha defaults to 0.5, shards'
    # num_shards_per_partition to 2)
    partition: str = "iid"
    partitioner: PartitionerConfig = field(default_factory=PartitionerConfig)
    hf: HFDataConfig = field(default_factory=HFDataConfig)  # data=hf only (data.root: its cache)
    # synthetic task only
    num_train: int = 2000
    num_test: int = 500
    num_features: int = 32
    num_classes: int = 4
    image_shape: list[int] | None = None  # e.g. [1, 8, 8] to exercise the CNN cheaply


@dataclass
class ModelConfig:
    name: str = MISSING  # cnn | resnet18 | mlp | logreg
    hidden: list[int] = field(default_factory=lambda: [200])  # mlp only


@dataclass
class OptimizerConfig:
    """Client-side optimizer; a fresh optimizer is built each round (state does not persist)."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | step | cosine (by round, or by epoch: schedule_unit)
    schedule_unit: str = "round"  # round | epoch (epoch = rounds covering one pass of the data)
    step_gamma: float = 0.9
    step_every: int = 1
    cosine_t_max: int = 100
    min_lr: float = 0.0


@dataclass
class QuantizationConfig:
    method: str = "none"  # none | qsgd | sign
    bits: int = 8  # 1..16 (qsgd)
    bucket_size: int | None = 512  # qsgd: coordinates per norm (Alistarh et al.); null: one norm


@dataclass
class ClientConfig:
    """Honest local training: H steps (local_steps) or E epochs (local_epochs), exactly one."""

    local_steps: int | None = 1
    local_epochs: float | None = None
    batch_size: int = 16
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


@dataclass
class AggregatorConfig:
    """A core aggregator by registered ``name`` or a user callable by ``target`` (dotted path)."""

    name: str = "mean"
    target: str | None = None  # "my_module.my_aggregator" overrides name
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockConfig:
    """Block-coordinate step (BGMD): aggregate a sampled block of k = ceil(beta d) coordinates."""

    enabled: bool = False
    beta: float = 0.1
    selector: str = "sample"  # sample | topk | uniform | a registered or dotted-path selector
    memory: str = "per_client"  # per_client | mean | none


@dataclass
class StrategyConfig:
    """Server side: which class, which aggregator, block step, server optimizer, sampling."""

    name: str = MISSING
    target: str = "fedbgmd.strategies.RobustStrategy"  # any subclass of it (plug-in contract)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    block: BlockConfig = field(default_factory=BlockConfig)
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_nesterov: bool = False
    # weight rows by partition size (FedAvg); a rule without a weighted form refuses it
    weighted: bool = False
    clients_per_round: int | None = None  # None: fraction_train of the clients
    fraction_train: float = 1.0
    min_replies: int = 1  # fewer accepted replies than this: the round is skipped (logged)
    max_update_norm: float | None = None  # reject replies whose norm exceeds this (None: off)
    params: dict[str, Any] = field(default_factory=dict)  # extra kwargs for a custom strategy


@dataclass
class AttackConfig:
    """Byzantine clients: ⌊fraction · num_clients⌋ of them, chosen once by a seeded generator."""

    name: str = "none"
    target: str | None = None  # dotted path of a user ClientAttack / OmniscientAttack class
    mode: str = "client"  # client (runs in the Byzantine client) | omniscient (server hook)
    fraction: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineConfig:
    """How the federation is executed."""

    name: str = "simulation"  # simulation (Flower + Ray) | inprocess (no Ray) | deployment
    num_cpus: float = 1.0  # per client (simulation)
    num_gpus: float = 0.0  # per client, fraction allowed (simulation)
    round_timeout_s: float = 600.0
    num_threads: int | None = None  # torch CPU threads in this process (None: torch's default)
    verbose: bool = False
    # inprocess: all clients' local steps as one vmapped computation (SGD, local_steps, no
    # BatchNorm; otherwise the per-client loop)
    batched: bool = False
    # inprocess: the global model and unquantized updates travel by reference, on their device
    # (no byte round trips); false: serialised as on every other engine (same results)
    device_resident: bool = True
    batch_chunk: int | None = None  # at most this many clients per vmapped call (memory bound)
    # deployment: a running SuperLink (its Control API address, host:port) and TLS settings
    superlink: str = "127.0.0.1:8000"
    insecure: bool = True
    root_certificates: str | None = None  # CA certificate (PEM) to verify the SuperLink
    timeout_s: float = 3600.0  # the whole run; it is stopped on the federation when exceeded


@dataclass
class Config:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    client: ClientConfig = field(default_factory=ClientConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    num_clients: int = 10
    num_rounds: int = 10
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 1  # centralised test evaluation every this many rounds (and the last)
    eval_batch_size: int = 1024
    max_eval_samples: int | None = None  # evaluate on the first N test samples (None: all)
    progress: bool = True
    plots: bool = True  # draw the run's PNG plots at the end (1-2 s; sweeps may turn it off)
    # checkpoint.pt (the model and the server's state: a CNN's is ~56 MB) only when asked: every
    # N rounds and the last (checkpoint_every > 0), or only the last round's (checkpoint_last);
    # resume needs one of them
    checkpoint_every: int = 0
    checkpoint_last: bool = False
    resume: str | None = None  # a run folder with checkpoint.pt: continue it there
    # end the run after the round whose global model has NaN/Inf (later rounds could only reject)
    stop_on_divergence: bool = True


def to_typed(cfg: Any) -> Config:
    """The composed config as the typed :class:`Config` (its dataclasses, plain values): what a
    run is given once its config is checked, so that the Flower side reads typed fields, not
    an OmegaConf node. A Config is returned as it is."""
    if isinstance(cfg, Config):
        return cfg
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        raise TypeError(f"expected a config composed on the Config schema, got {type(obj)}")
    return obj


def plain(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts and lists (summary.json, the run's setting), from a typed
    :class:`Config`, a composed DictConfig or a dict."""
    if isinstance(cfg, dict):
        return cfg
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    from omegaconf import OmegaConf

    out = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(out, dict):
        raise TypeError(f"expected a mapping config, got {type(cfg).__name__}")
    return {str(k): v for k, v in out.items()}


#: Config keys renamed (the old spelling -> what to write now). The plug-ins' renamed names and
#: parameters live in their registries (fedbgmd.core.Registry.rename / rename_param).
RENAMED_KEYS = {
    # DataConfig keys that runs saved before partitions went through Flower Datasets carry
    "data.alpha": "data.partitioner.params.alpha (with data.partition=dirichlet)",
    "data.shards_per_client": "data.partitioner.params.num_shards_per_partition "
    "(with data.partition=shards)",
}
_PRE_FLOWER_DATASETS_KEYS = tuple(
    k.partition(".")[2] for k in RENAMED_KEYS if k.startswith("data.")
)


def drop_pre_flower_datasets_keys(saved: Any) -> None:
    """Make a config.yaml saved before Flower Datasets' partitioners loadable by the schema, or
    raise ConfigError. An iid run's ``data.alpha`` / ``data.shards_per_client`` never had an
    effect and iid partitions are unchanged: they are dropped. A dirichlet / shards run was split
    by fedbgmd's own partitioner, which Flower Datasets' replaced with different partitions: a
    resume would continue it on other clients' data, so it is refused."""
    data = saved.get("data") if hasattr(saved, "get") else None
    if data is None:
        return
    old = [k for k in _PRE_FLOWER_DATASETS_KEYS if k in data]
    if not old:
        return
    if data.get("partition", "iid") != "iid":
        raise ConfigError(
            [
                f"data.partition={data.get('partition')} with data.{' / data.'.join(old)}: this "
                "run was split by fedbgmd's own partitioner, which Flower Datasets' replaced "
                "(other partitions for the same seed); resuming would continue it on other "
                "clients' data. Start a new run (data.partitioner.params.alpha / "
                "num_shards_per_partition name those parameters now)"
            ]
        )
    for k in old:
        data.pop(k)


def compose_config(overrides: list[str]) -> Any:
    """The resolved-on-access config fedbgmd would run for ``overrides`` (a single job), for
    scripts and benchmarks that build configs without the CLI; not checked (cli.check_config)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module("fedbgmd.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    # the group schemas live in their own group, not among the options of the group they type
    # (``attack=base_attack`` would be offered by --help and run as no attack); a preset extends
    # its schema with ``defaults: [/schema/<group>@_here_]``
    for group, node in (
        ("data", DataConfig),
        ("model", ModelConfig),
        ("strategy", StrategyConfig),
        ("client", ClientConfig),
        ("attack", AttackConfig),
        ("engine", EngineConfig),
    ):
        cs.store(group="schema", name=group, node=node)


ENGINE_NAMES: tuple[str, ...] = ("simulation", "inprocess", "deployment")
ATTACK_MODES: tuple[str, ...] = ("client", "omniscient")
SCHEDULE_UNITS: tuple[str, ...] = ("round", "epoch")


def choices() -> dict[str, tuple[str, ...]]:
    """The valid values of each closed-choice key, read from where each choice is defined (the
    registries, the data / model / training modules), not repeated here."""
    from fedbgmd.core import MEMORIES, QUANTIZERS
    from fedbgmd.data import DATA_NAMES
    from fedbgmd.models import MODEL_NAMES
    from fedbgmd.training import OPTIMIZERS, SCHEDULES

    return {
        "data.name": DATA_NAMES,
        "model.name": MODEL_NAMES,
        "client.optimizer.name": OPTIMIZERS,
        "client.optimizer.schedule": SCHEDULES,
        "client.optimizer.schedule_unit": SCHEDULE_UNITS,
        "client.quantization.method": ("none", *QUANTIZERS.names()),
        "strategy.block.memory": tuple(MEMORIES.names()),
        "attack.mode": ATTACK_MODES,
        "engine.name": ENGINE_NAMES,
    }


# what each data set feeds the model (synthetic: data.image_shape, or flat num_features), and the
# models that need images; each data group's preset brings a model that fits (conf/data/*.yaml)
_IMAGE_SHAPES = {"fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
_IMAGE_MODELS = ("cnn", "resnet18")
_NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "cifar10": 10}


def _model_data_problem(cfg: Any) -> str | None:
    d, model = cfg.data, cfg.model.name
    if d.name == "hf":  # its shape is known once loaded; a model that cannot take it fails then
        return None
    shape = _IMAGE_SHAPES.get(d.name) or (
        tuple(d.image_shape) if d.image_shape else (d.num_features,)
    )
    if model not in _IMAGE_MODELS or len(shape) == 3:
        return None
    return (
        f"model={model} needs C×H×W images, but data={d.name} gives flat vectors of "
        f"{shape[0]} features; use model=mlp or model=logreg (data={d.name} brings mlp when "
        f"model is not given), or give the synthetic task an image shape "
        f"(data.image_shape=[1,16,16])"
    )


def _partitioner_problems(cfg: Any) -> list[str]:
    """data.partition / data.partitioner checked by fedbgmd.data (which constructs the Flower
    Datasets partitioner), with the class count the data set is known to have."""
    from fedbgmd.partitions import partitioner_problems

    d = cfg.data
    num_classes = d.num_classes if d.name == "synthetic" else _NUM_CLASSES.get(d.name)
    return partitioner_problems(
        d.partition, d.partitioner.target, d.partitioner.params, cfg.num_clients, num_classes
    )


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def byzantine_count(fraction: float, num_clients: int) -> int:
    """⌊fraction·num_clients⌋ of the decimal fraction (fedbgmd.core.fraction_floor: 0.29 * 100
    is 28.999999999999996 in floating point, not 29)."""
    return fraction_floor(fraction, num_clients)


def _positive(value: Any) -> bool:
    """A finite number > 0 (NaN compares False with everything, so `value <= 0` lets it pass)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def unknown_keys(cfg: Any) -> list[str]:
    """One problem per key that no schema declares. Hydra's ``+key=value`` adds a key even to a
    typed config, so ``+num_round=50`` would run num_rounds' value and keep the typo in
    config.yaml; only the free-form ``params`` maps (plug-in parameters) take new keys."""
    import difflib

    from omegaconf import DictConfig, OmegaConf

    problems: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(schema):  # a params map, or a plain config: open
            return
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            full = f"{prefix}{key}"
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=2)
                hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
                problems.append(
                    f"{full}: no such setting{hint} (only the params maps take new keys, e.g. "
                    f"+strategy.params.x=1; keys at {prefix.rstrip('.') or 'top level'}: "
                    f"{', '.join(known)})"
                )
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_none():
                walk(child, f"{full}.")

    if isinstance(cfg, DictConfig):
        walk(cfg, "")
    return problems


def validate(cfg: Any) -> None:
    """Check the cross-field rules once at startup; raise one ConfigError listing all problems."""
    p: list[str] = unknown_keys(cfg)
    if p:  # the other checks would read the schema's values, not the mistyped key's
        raise ConfigError(p)
    closed = choices()
    for key, valid in closed.items():
        value = _get(cfg, key)
        if value not in valid:
            p.append(f"{key}={value!r} is not one of {', '.join(valid)}")
    if cfg.data.name in closed["data.name"] and cfg.model.name in closed["model.name"]:
        mismatch = _model_data_problem(cfg)
        if mismatch:
            p.append(mismatch)
    if cfg.num_clients < 1:
        p.append(f"num_clients={cfg.num_clients} must be >= 1")
    else:
        p += _partitioner_problems(cfg)
    if cfg.num_rounds < 1:
        p.append(f"num_rounds={cfg.num_rounds} must be >= 1")
    if cfg.checkpoint_every < 0:
        p.append(f"checkpoint_every={cfg.checkpoint_every} must be >= 0")
    if cfg.eval_every < 1:
        p.append(f"eval_every={cfg.eval_every} must be >= 1")
    if not (cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:")):
        p.append(f"device={cfg.device!r} must be auto, cpu, cuda or cuda:N")
    c = cfg.client
    if (c.local_steps is None) == (c.local_epochs is None):
        p.append("client.local_steps and client.local_epochs: set exactly one (the other null)")
    if c.local_steps is not None and c.local_steps < 1:
        p.append(f"client.local_steps={c.local_steps} must be >= 1")
    if c.local_epochs is not None and not _positive(c.local_epochs):
        p.append(f"client.local_epochs={c.local_epochs} must be a finite number > 0")
    if c.batch_size < 1:
        p.append(f"client.batch_size={c.batch_size} must be >= 1")
    if not _positive(c.optimizer.lr):
        p.append(f"client.optimizer.lr={c.optimizer.lr} must be a finite number > 0")
    if not 1 <= c.quantization.bits <= 16:
        p.append(f"client.quantization.bits={c.quantization.bits} must be in 1..16")
    elif c.quantization.method == "sign" and c.quantization.bits != 1:
        p.append(
            f"client.quantization.bits={c.quantization.bits}: sign quantization sends 1 bit per "
            "coordinate; set client.quantization.bits=1"
        )
    if c.quantization.bucket_size is not None and c.quantization.bucket_size < 1:
        p.append(f"client.quantization.bucket_size={c.quantization.bucket_size} must be >= 1")
    if cfg.eval_batch_size < 1:
        p.append(f"eval_batch_size={cfg.eval_batch_size} must be >= 1")
    if cfg.max_eval_samples is not None and cfg.max_eval_samples < 1:
        p.append(f"max_eval_samples={cfg.max_eval_samples} must be >= 1 (or null: all)")
    s = cfg.strategy
    if not 0 < s.block.beta <= 1:
        p.append(f"strategy.block.beta={s.block.beta} must satisfy 0 < beta <= 1")
    if not _positive(s.server_lr):
        p.append(f"strategy.server_lr={s.server_lr} must be a finite number > 0")
    if s.max_update_norm is not None and not _positive(s.max_update_norm):
        p.append(
            f"strategy.max_update_norm={s.max_update_norm} must be a finite number > 0 (or null: "
            "no bound)"
        )
    if not 0 <= s.server_momentum < 1:
        p.append(f"strategy.server_momentum={s.server_momentum} must be in [0, 1)")
    if not 0 < s.fraction_train <= 1:
        p.append(f"strategy.fraction_train={s.fraction_train} must be in (0, 1]")
    per_round = clients_per_round(cfg)
    if s.clients_per_round is not None and not 1 <= s.clients_per_round <= cfg.num_clients:
        p.append(
            f"strategy.clients_per_round={s.clients_per_round} must be in 1..num_clients"
            f" ({cfg.num_clients})"
        )
    if s.min_replies < 1 or s.min_replies > max(per_round, 1):
        p.append(
            f"strategy.min_replies={s.min_replies} must be in 1..clients per round ({per_round})"
        )
    a = cfg.attack
    if not 0 <= a.fraction < 0.5:
        p.append(
            f"attack.fraction={a.fraction} must satisfy 0 <= fraction < 0.5 "
            "(a Byzantine majority cannot be tolerated by any aggregator)"
        )
    attacked = attack_label(a.name, a.target) != "none"
    if attacked and a.fraction > 0 and byzantine_count(a.fraction, cfg.num_clients) == 0:
        p.append(
            f"attack.fraction={a.fraction} with num_clients={cfg.num_clients} makes "
            "⌊fraction·num_clients⌋ = 0 Byzantine clients; raise one of them or use attack=none"
        )
    f = s.aggregator.params.get("f")
    if (
        s.aggregator.name in ("bulyan", "bulyan_multikrum")
        and f is not None
        and per_round < 4 * int(f) + 3
    ):
        p.append(
            f"strategy.aggregator.params.f={f}: Bulyan needs clients per round >= 4f+3 "
            f"(= {4 * int(f) + 3}), got {per_round}"
        )
    if s.aggregator.name in ("krum", "multikrum") and f is not None and per_round < 2 * int(f) + 3:
        p.append(
            f"strategy.aggregator.params.f={f}: Krum needs clients per round >= 2f+3 "
            f"(= {2 * int(f) + 3}), got {per_round}"
        )
    if cfg.engine.batched and cfg.engine.name != "inprocess":
        p.append("engine.batched=true needs engine=inprocess (one process holds every client)")
    if cfg.engine.batch_chunk is not None and cfg.engine.batch_chunk < 1:
        p.append(f"engine.batch_chunk={cfg.engine.batch_chunk} must be >= 1 (or null)")
    if cfg.engine.num_threads is not None and cfg.engine.num_threads < 1:
        p.append(f"engine.num_threads={cfg.engine.num_threads} must be >= 1 (or null)")
    for key in ("timeout_s", "round_timeout_s"):
        if not _positive(getattr(cfg.engine, key)):
            p.append(f"engine.{key}={getattr(cfg.engine, key)} must be a finite number > 0")
    if not _positive(cfg.engine.num_cpus):
        p.append(f"engine.num_cpus={cfg.engine.num_cpus} must be a finite number > 0")
    if not (_positive(cfg.engine.num_gpus) or cfg.engine.num_gpus == 0):
        p.append(f"engine.num_gpus={cfg.engine.num_gpus} must be a finite number >= 0")
    if p:
        raise ConfigError(p)


def clients_per_round(cfg: Any) -> int:
    """Clients sampled each round: ``clients_per_round`` or ⌊fraction_train · N⌋ (at least 1)."""
    s = cfg.strategy
    if s.clients_per_round is not None:
        return int(s.clients_per_round)
    return max(1, int(s.fraction_train * cfg.num_clients))
