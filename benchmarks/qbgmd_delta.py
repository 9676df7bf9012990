"""Measured ||C_k(Q(x)) - x||^2 / ||x||^2 on real Fashion-MNIST client updates, next to Lemma 4's
delta (QBGMD, seed slides; SPEC 3.4), for every quantization setting of the QBGMD study.

    python benchmarks/qbgmd_delta.py [--record 1,10] [--draws 1] [--out docs/results/qbgmd]

Updates: the honest run of the study's setting without attack (32 iid clients, the seed's
1,163,978-parameter CNN, one SGD step of batch 16 at lr 0.01 with weight decay 1e-5 from the
global model, computed by fedbgmd.training.local_train; x_i = x_t - y_i). The global model
follows the plain mean of the 32 updates (no compression, no momentum): this only decides
*which* real updates are measured. At the rounds in --record every client's update is kept.

Operators (Q: fedbgmd.core.quantization, the wire's quantizer; k = block_size(beta, d) = ceil(beta d)):
  * q_err     = ||Q(x) - x||^2 / ||x||^2, the quantizer alone;
  * ck_vec    = ||C_k(Q(x)) - x||^2 / ||x||^2, C_k keeping the k largest |Q(x)_j| of the one
    vector (Lemma 4's composition, per message);
  * ck_block  = the same with the coordinated block the as_run server selects: the k columns of
    the stacked (n, d) matrix of quantized messages with the largest norms (selector topk); every
    client's message is cut to that block.
Each is averaged over clients, recorded rounds and --draws quantizer draws (the expectation in
Lemma 4 is over Q's randomness). Lemma 4: E||x - C(x)||^2 <= (1 - delta) ||x||^2 with
delta = (1 - omega) k/d, where omega = beta_{k,s} is the variance constant of the quantizer,
E||Q(v) - v||^2 <= omega ||v||^2; for QSGD with s = 2^(bits-1) - 1 levels and buckets of b
coordinates omega = min(b/s^2, sqrt(b)/s) (Alistarh et al. 2017, Lemma 3.1; b = d without
buckets), omega = 0 without quantization. delta <= 0 (omega >= 1): the lemma promises no
contraction.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fedbgmd.core.counts import block_size
from fedbgmd.core.quantization import dequantize, quantize
from fedbgmd.core.selection import select_block
from fedbgmd.data import load_dataset
from fedbgmd.models import build_model
from fedbgmd.partitions import partition
from fedbgmd.training import OptimConfig, local_train

SETTINGS: list[tuple[str, int | None, int | None]] = [("none", None, None)] + [
    ("qsgd", bits, bucket) for bits in (8, 4, 2) for bucket in (None, 512, 128)
]


def omega(method: str, bits: int | None, bucket: int | None, d: int) -> float:
    """QSGD's variance constant min(b/s^2, sqrt(b)/s) (0 without quantization)."""
    if method == "none":
        return 0.0
    assert bits is not None and bits >= 2
    s = 2 ** (bits - 1) - 1
    b = d if bucket is None else bucket
    return min(b / s**2, math.sqrt(b) / s)


def honest_updates(args: argparse.Namespace) -> dict[int, torch.Tensor]:
    """{round: (n, d) float32 honest updates x_t - y_i} at the recorded rounds."""
    torch.manual_seed(args.seed)
    data = load_dataset("fashion_mnist")
    parts = partition(data.train.y, args.clients, "iid", seed=args.seed)
    shares = [data.train.subset(p) for p in parts]
    model = build_model("cnn", data.num_classes, data.input_shape, seed=args.seed)
    optim = OptimConfig(name="sgd", lr=args.lr, weight_decay=1e-5)
    device = torch.device("cpu")
    record = {int(r) for r in args.record.split(",")}
    out: dict[int, torch.Tensor] = {}
    for t in range(1, max(record) + 1):
        x = parameters_to_vector(model.parameters()).detach().clone()
        rows = []
        for i, share in enumerate(shares):
            local = copy.deepcopy(model)
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + t * 1009 + i)
            local_train(local, share, steps=1, batch_size=args.batch_size, optim=optim,
                        lr=args.lr, generator=g, device=device)  # fmt: skip
            rows.append(x - parameters_to_vector(local.parameters()).detach())
        upd = torch.stack(rows)
        if t in record:
            out[t] = upd.clone()
        vector_to_parameters(x - upd.mean(dim=0), model.parameters())
    return out


def measure(
    updates: dict[int, torch.Tensor], betas: list[float], draws: int, seed: int
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    d = next(iter(updates.values())).shape[1]
    gen = torch.Generator().manual_seed(seed)
    for method, bits, bucket in SETTINGS:
        om = omega(method, bits, bucket, d)
        acc: dict[float, dict[str, list[float]]] = {
            b: {"q_err": [], "ck_vec": [], "ck_block": []} for b in betas
        }
        for g_mat in updates.values():
            norms2 = g_mat.double().square().sum(dim=1)
            for _ in range(draws if method != "none" else 1):
                if method == "none":
                    qg = g_mat.clone()
                else:
                    assert bits is not None
                    qg = torch.stack(
                        [dequantize(quantize(r, bits, "qsgd", gen, bucket)) for r in g_mat]
                    )
                q_err = ((qg - g_mat).double().square().sum(dim=1) / norms2).tolist()
                for beta in betas:
                    k = block_size(beta, d)
                    # per message: keep the k largest |Q(x)_j|
                    top = torch.topk(qg.abs(), k, dim=1, sorted=False).indices
                    kept = torch.zeros_like(qg).scatter_(1, top, qg.gather(1, top))
                    vec = ((kept - g_mat).double().square().sum(dim=1) / norms2).tolist()
                    # coordinated block (the server's topk selector on the stacked messages)
                    idx = select_block(qg, k, "topk")
                    blk = torch.zeros_like(qg)
                    blk[:, idx] = qg[:, idx]
                    bl = ((blk - g_mat).double().square().sum(dim=1) / norms2).tolist()
                    acc[beta]["q_err"] += q_err
                    acc[beta]["ck_vec"] += vec
                    acc[beta]["ck_block"] += bl
        print(f"measured {method} bits={bits} bucket={bucket}", file=sys.stderr, flush=True)
        for beta in betas:
            k = block_size(beta, d)
            delta = (1 - om) * k / d
            a = acc[beta]
            rows.append(
                {
                    "method": method,
                    "bits": bits if bits is not None else "none",
                    "bucket": bucket
                    if bucket is not None
                    else ("none" if method != "none" else "-"),
                    "beta": beta,
                    "k": k,
                    "d": d,
                    "omega": om,
                    "delta": delta,
                    "bound_1_minus_delta": 1 - delta,
                    "q_err": sum(a["q_err"]) / len(a["q_err"]),
                    "ck_vec": sum(a["ck_vec"]) / len(a["ck_vec"]),
                    "ck_vec_max": max(a["ck_vec"]),
                    "ck_block": sum(a["ck_block"]) / len(a["ck_block"]),
                    "ck_block_max": max(a["ck_block"]),
                }
            )
    return rows


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.3g}"
    return f"{v:.4g}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--record", default="1,10", help="rounds whose updates are measured")
    p.add_argument(
        "--betas", default="0.05,0.1", help="block fractions (clean / bitflip20 presets)"
    )
    p.add_argument("--draws", type=int, default=1, help="quantizer draws per update")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default="docs/results/qbgmd", help="folder for delta.csv / delta.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    updates = honest_updates(args)
    t1 = time.perf_counter()
    rows = measure(updates, [float(b) for b in args.betas.split(",")], args.draws, args.seed)
    t2 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "delta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    head = (
        "| β | bits | bucket | ω = min(b/s², √b/s) | δ = (1−ω)k/d | bound 1−δ | "
        "‖Q(x)−x‖²/‖x‖² | ‖C_k(Q(x))−x‖²/‖x‖² per message (max) | same, server block (max) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['beta']} | {r['bits']} | {r['bucket']} | {fmt(float(r['omega']))} | "
            f"{fmt(float(r['delta']))} | {fmt(float(r['bound_1_minus_delta']))} | "
            f"{fmt(float(r['q_err']))} | {fmt(float(r['ck_vec']))} "
            f"({fmt(float(r['ck_vec_max']))}) | {fmt(float(r['ck_block']))} "
            f"({fmt(float(r['ck_block_max']))}) |"
        )
    n_upd = sum(u.shape[0] for u in updates.values())
    lines.append("")
    lines.append(
        f"{n_upd} updates (rounds {args.record}, {args.clients} clients), {args.draws} quantizer "
        f"draws each; d = {rows[0]['d']}; updates {t1 - t0:.0f} s, measurement {t2 - t1:.0f} s."
    )
    (out / "delta.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
