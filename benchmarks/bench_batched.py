"""Client phase of one round: per-client ``local_train`` loop vs one ``BatchedTrainer`` call.

The seed's Fashion-MNIST setup: 32 clients x batch 16 on the 1,163,978-parameter CNN, H = 1
local step, SGD with Nesterov momentum 0.9 and weight decay. The loop is what the ClientApp
does per message (load x_t, local_train, x_t - y_i); the batched call does every client in one
vmapped computation (``--chunk`` clients per vmap call). Random data of the right shape; no
downloads. Also checks that both give close updates on the same batches (with dropout off, since
dropout masks differ between the two paths by design).

    python benchmarks/bench_batched.py [--device cpu|cuda] [--repeats 10] [--steps 1]

Prints milliseconds per round (median over repeats, after warm-up; CUDA synchronised) and a
JSON line. Needs only torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    import fedbgmd  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fedbgmd.batched import BatchedTrainer
from fedbgmd.core import flatten_state, unflatten_state
from fedbgmd.data import TensorData
from fedbgmd.models import build_model, count_parameters
from fedbgmd.training import OptimConfig, local_train


def sync(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``fn`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="clients per vmap call (all)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-tf32", action="store_true", help="full fp32 convs/matmuls on CUDA")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    model = build_model("cnn", 10, (1, 28, 28), seed=0).to(dev)
    datas = [
        TensorData(
            torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g)
        ).to(dev)
        for _ in range(args.clients)
    ]
    optim = OptimConfig(momentum=0.9, nesterov=True, weight_decay=1e-4)
    lr = 0.01
    x0, spec = flatten_state(model.state_dict())
    x0 = x0.clone()
    d = x0.numel()

    def gens(r: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(10_000 * r + i) for i in range(args.clients)]

    def loop_round() -> torch.Tensor:
        out = torch.empty(args.clients, d, device=dev)
        for i, (data, gen) in enumerate(zip(datas, gens(0))):
            model.load_state_dict(unflatten_state(x0, spec))
            local_train(
                model, data, steps=args.steps, batch_size=args.batch, optim=optim, lr=lr,
                generator=gen, device=dev,
            )  # fmt: skip
            out[i] = x0 - flatten_state(model.state_dict())[0]
        return out

    trainer = BatchedTrainer(
        model, optim=optim, batch_size=args.batch, steps=args.steps, device=dev,
        max_chunk=args.chunk,
    )  # fmt: skip

    def batched_round() -> torch.Tensor:
        return trainer.train(x0, datas, gens(0), lr)[0]

    # agreement on identical batches with dropout off (masks differ between paths by design)
    model.dropout.p = 0.0
    ref, got = loop_round(), batched_round()
    rel_err = float((ref - got).norm() / ref.norm())
    model.dropout.p = 0.5

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_batched = timed(batched_round, dev, args.repeats, args.warmup)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    t_loop = timed(loop_round, dev, args.repeats, args.warmup)
    med_loop, med_batched = statistics.median(t_loop), statistics.median(t_batched)
    result = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tf32_conv": torch.backends.cudnn.allow_tf32,
        "params": count_parameters(model),
        "clients": args.clients,
        "batch": args.batch,
        "steps": args.steps,
        "chunk": args.chunk,
        "repeats": args.repeats,
        "loop_ms_median": round(med_loop, 2),
        "batched_ms_median": round(med_batched, 2),
        "speedup": round(med_loop / med_batched, 2),
        "loop_ms_all": [round(t, 2) for t in t_loop],
        "batched_ms_all": [round(t, 2) for t in t_batched],
        "rel_err_no_dropout": rel_err,
        "batched_peak_mib": None if peak is None else round(peak, 1),
    }
    print(
        f"{args.clients} clients x batch {args.batch}, H={args.steps}, cnn d={d} on {dev}: "
        f"loop {med_loop:.1f} ms/round, batched {med_batched:.1f} ms/round "
        f"(x{med_loop / med_batched:.2f}); rel. err without dropout {rel_err:.2e}"
    )
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
