"""Cost of one H = 1 round of the seed's Fashion-MNIST setup, by phase, without Flower.

32 clients x batch 16 on the 1,163,978-parameter CNN: each client loads x_t, takes one SGD step
(fedbgmd.training.local_train, a Python loop over clients: what the ClientApp does per message)
and returns x_t - y_i; then the server aggregates the (32, d) updates with the BGMD step
(beta = 0.1, per-client memory) and with full GM. Random data of the right shape; no downloads.

    python benchmarks/bench_round.py [--device cuda] [--rounds 20]

Prints milliseconds per phase (median over rounds, after warm-up). Needs only torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

try:
    import fedbgmd  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fedbgmd.batched import BatchedTrainer
from fedbgmd.core import (
    bgmd_step,
    block_size,
    flatten_state,
    get_aggregator,
    make_memory,
    unflatten_state,
)
from fedbgmd.data import TensorData
from fedbgmd.models import build_model
from fedbgmd.training import OptimConfig, local_train


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--batched", action="store_true", help="fedbgmd.batched.BatchedTrainer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    model = build_model("cnn", 10, (1, 28, 28), seed=0).to(dev)
    data = [
        TensorData(
            torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)
        ).to(dev)
        for _ in range(args.clients)
    ]
    x, spec = flatten_state(model.state_dict())
    x = x.to(dev)
    d = x.numel()
    k = block_size(args.beta, d)
    gm = get_aggregator("gm", eps=1e-6)
    memory = make_memory("per_client", dim=d, device=dev, dtype=torch.float32)
    opt = OptimConfig(lr=0.01, momentum=0.0, weight_decay=1e-5)
    trainer = BatchedTrainer(model, optim=opt, batch_size=args.batch, steps=1, device=dev)
    times: dict[str, list[float]] = {"clients": [], "bgmd": [], "gm_full": []}
    for r in range(args.rounds + 3):
        sync(dev)
        t0 = time.perf_counter()
        gens = [torch.Generator().manual_seed(r * 1000 + i) for i in range(args.clients)]
        if args.batched:
            G, _ = trainer.train(x, data, gens, lr=0.01)
        else:
            ups = []
            for i in range(args.clients):
                model.load_state_dict(unflatten_state(x, spec))
                local_train(
                    model,
                    data[i],
                    steps=1,
                    batch_size=args.batch,
                    optim=opt,
                    lr=0.01,
                    generator=gens[i],
                    device=dev,
                )
                ups.append(x - flatten_state(model.state_dict())[0])
            G = torch.stack(ups)
        sync(dev)
        t1 = time.perf_counter()
        step = bgmd_step(
            G,
            aggregator=gm,
            k=k,
            memory=memory,
            client_ids=list(range(args.clients)),
            generator=torch.Generator(device=dev).manual_seed(r),
        )
        sync(dev)
        t2 = time.perf_counter()
        full = gm(G)
        sync(dev)
        t3 = time.perf_counter()
        x = x - step.vector
        if r >= 3:
            times["clients"].append(t1 - t0)
            times["bgmd"].append(t2 - t1)
            times["gm_full"].append(t3 - t2)
    med = {key: 1000 * statistics.median(v) for key, v in times.items()}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    mode = "batched (vmap)" if args.batched else "per-client loop"
    print(
        f"device {name}, torch {torch.__version__}, d={d}, clients={args.clients}, batch={args.batch}, beta={args.beta}, {mode}"
    )
    print(
        f"clients {med['clients']:.1f} ms/round, BGMD step {med['bgmd']:.2f} ms, full GM {med['gm_full']:.2f} ms "
        f"(GM iterations {full.iterations}, converged {full.converged}); "
        f"round (clients + BGMD) {med['clients'] + med['bgmd']:.1f} ms"
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"device": name, "torch": torch.__version__, "ms": med}, indent=2)
        )


if __name__ == "__main__":
    main()
