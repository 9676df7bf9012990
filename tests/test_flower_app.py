"""FedBGMD as a drop-in for FedAvg in a standard Flower app (issue 15).

The ServerApp and ClientApp below are written to Flower's conventions (examples/quickstart-pytorch):
the server builds the strategy and calls ``strategy.start(grid, initial_arrays, train_config,
num_rounds, evaluate_fn)``; a client replies to "train" with its trained weights and
``num-examples`` and to "evaluate" with its loss and accuracy. Nothing in them knows fedbgmd
except the one line that builds the strategy. One Byzantine ClientApp variant sends
x + 100 (x − y) (its update blown up a hundred times, the wrong way).

The apps run on the in-process Grid the project's engines use (Flower's Grid interface, fixed
node ids, no Ray) and, marked ``ray``, once through Flower's simulation runtime.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedbgmd.clients.mod import compact_update_mod
from fedbgmd.engine import InProcessGrid, set_server_identity
from fedbgmd.strategies import FedBGMD

NUM_NODES, NUM_ROUNDS, FEATURES, CLASSES = 5, 8, 10, 3


# ------------------------------------------------------------------ the user's task (Flower style)
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def load_data(partition_id: int, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs, a different seeded draw per partition (and for the test set)."""
    g = torch.Generator().manual_seed(1000 * int(not train) + partition_id)
    centres = torch.Generator().manual_seed(7)
    means = 2.0 * torch.randn(CLASSES, FEATURES, generator=centres)
    y = torch.randint(0, CLASSES, (120,), generator=g)
    x = means[y] + torch.randn(120, FEATURES, generator=g)
    return x, y


def train_model(net: Net, data: tuple[torch.Tensor, torch.Tensor], lr: float) -> float:
    x, y = data
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    for i in range(0, len(y), 20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x[i : i + 20]), y[i : i + 20])
        loss.backward()
        opt.step()
    return loss.item()


def evaluate_model(net: Net, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    x, y = data
    with torch.no_grad():
        out = net(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def make_client_app(byzantine: frozenset[int] = frozenset(), mods: list | None = None) -> ClientApp:
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        pid = int(context.node_config["partition-id"])
        data = load_data(pid)
        loss = train_model(model, data, float(msg.content["config"]["lr"]))
        state = model.state_dict()
        if pid in byzantine:  # x + 100 (x − y): the update blown up, the wrong way
            sent = msg.content["arrays"].to_torch_state_dict()
            state = {k: sent[k] + 100.0 * (sent[k] - v) for k, v in state.items()}
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(data[1])})
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = load_data(int(context.node_config["partition-id"]), train=False)
        loss, acc = evaluate_model(model, data)
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(data[1])})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_server_app(strategy_factory, out: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy = strategy_factory()
        out["strategy"] = strategy
        out["result"] = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(Net().state_dict()),
            train_config=ConfigRecord({"lr": 0.1}),
            num_rounds=NUM_ROUNDS,
            evaluate_fn=central_evaluate,
        )

    return app


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, acc = evaluate_model(model, load_data(99, train=False))
    return MetricRecord({"accuracy": acc, "loss": loss})


# ------------------------------------------------------------------ running it
def run_inprocess(strategy_factory, client_app: ClientApp) -> dict:
    set_server_identity()
    out: dict = {}
    grid = InProcessGrid(client_app, NUM_NODES)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    make_server_app(strategy_factory, out)(grid, context)
    return out


def final_accuracy(out: dict) -> float:
    metrics = out["result"].evaluate_metrics_serverapp
    acc = metrics[max(metrics)]["accuracy"]
    return float(acc) if math.isfinite(float(metrics[max(metrics)]["loss"])) else 0.0


STRATEGIES = {"fedavg": lambda: FedAvg(), "fedbgmd": lambda: FedBGMD()}


@pytest.mark.slow
def test_fedbgmd_trains_like_fedavg_and_holds_where_fedavg_breaks() -> None:
    start = final_accuracy_of_initial_model()
    acc = {
        (name, byz): final_accuracy(
            run_inprocess(factory, make_client_app(frozenset({0}) if byz else frozenset()))
        )
        for name, factory in STRATEGIES.items()
        for byz in (False, True)
    }
    print(f"initial model {start:.2f}; final accuracy (strategy, Byzantine): {acc}")  # docs
    assert acc["fedavg", False] > 0.9 and acc["fedbgmd", False] > 0.9, acc  # both train
    assert acc["fedavg", True] < 0.6, acc  # one Byzantine client of five breaks FedAvg
    assert acc["fedbgmd", True] > 0.9, acc  # FedBGMD holds
    assert start < 0.6  # the task is learnt, not given


def final_accuracy_of_initial_model() -> float:
    torch.manual_seed(0)
    return float(central_evaluate(0, ArrayRecord(Net().state_dict()))["accuracy"])


@pytest.mark.slow
def test_flower_semantics_config_evaluation_and_result() -> None:
    seen: list[dict] = []
    honest = make_client_app()

    def spy(msg: Message, context: Context, call_next):
        if msg.metadata.message_type == "train":
            seen.append(dict(msg.content["config"]))
        return call_next(msg, context)

    honest = make_client_app(mods=[spy])
    out = run_inprocess(lambda: FedBGMD(fraction_train=0.6, min_train_nodes=2), honest)
    result = out["result"]
    # train_config reaches the clients unchanged (plus Flower's server-round)
    assert seen and all(c == {"lr": 0.1, "server-round": c["server-round"]} for c in seen)
    assert len(seen) == 3 * NUM_ROUNDS  # int(5 x 0.6) nodes a round, as FedAvg samples
    # federated evaluation runs; the Result has per-round train and evaluate metrics
    assert sorted(result.evaluate_metrics_clientapp) == list(range(1, NUM_ROUNDS + 1))
    assert "eval_acc" in result.evaluate_metrics_clientapp[NUM_ROUNDS]
    train = result.train_metrics_clientapp
    assert sorted(train) == list(range(1, NUM_ROUNDS + 1))
    assert "train_loss" in train[1]  # the clients' metrics, aggregated as FedAvg does
    assert train[1]["replies-accepted"] == 3 and train[1]["replies-rejected"] == 0
    assert train[1]["memory-norm"] >= 0 and train[1]["agg-iterations"] >= 1
    # identity without partition ids: the residual memory is keyed by the replying node ids
    memory = out["strategy"].block_step.memory
    assert set(memory.client_ids) <= set(range(1000, 1000 + NUM_NODES))
    assert len(memory.client_ids) >= 3


@pytest.mark.slow
def test_the_compact_update_mod_sends_quantized_deltas_that_train() -> None:
    app = make_client_app(frozenset({0}), mods=[compact_update_mod("qsgd", bits=8)])
    out = run_inprocess(lambda: FedBGMD(), app)
    info = out["strategy"].round_info[1]
    assert info["replies_accepted"] == NUM_NODES
    d = sum(p.numel() for p in Net().parameters())
    assert info["bytes_up"] < NUM_NODES * (d + 4 * 4)  # ~1 byte a coordinate, not 4
    assert final_accuracy(out) > 0.9


@pytest.mark.slow
@pytest.mark.ray
def test_the_same_apps_in_flowers_simulation_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import ray
    from flwr.simulation import run_simulation

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # the apps are this test module's functions: Ray's workers get them by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    acc = {}
    for name, factory in STRATEGIES.items():
        out: dict = {}
        run_simulation(
            server_app=make_server_app(factory, out),
            client_app=make_client_app(frozenset({0})),
            num_supernodes=NUM_NODES,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        ray.shutdown()
        acc[name] = final_accuracy(out)
    assert acc["fedavg"] < 0.6 and acc["fedbgmd"] > 0.9, acc
