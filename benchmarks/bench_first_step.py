"""Two hot spots of the seed's Fashion-MNIST round, timed in isolation (not a test).

    python benchmarks/bench_first_step.py [--threads 2]

1. The 32 clients' gradients (batch 16, the 1,163,978-parameter CNN) as one vmapped call with the
   parameters stacked per client (what every local step after the first needs) vs shared by all
   clients (``in_dims=None``: the first step, where every client starts from x_t), and a plain
   per-client loop for reference.
2. The NaN/Inf check of 32 replies of d = 1,163,978: an element-wise mask vs one reduction
   (``fedbgmd.core.all_finite``).
Prints the minimum over repeats in ms.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedbgmd.core import all_finite
from fedbgmd.models import build_model


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, b = 32, 16
    model = build_model("cnn", 10, (1, 28, 28), seed=0).train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(n, b, 1, 28, 28), torch.randint(0, 10, (n, b))

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    stacked = {k: v.unsqueeze(0).expand(n, *v.shape).clone() for k, v in params.items()}
    per_client = vmap(grad_and_value(loss), randomness="different")
    shared = vmap(grad_and_value(loss), in_dims=(None, 0, 0), randomness="different")

    def loop() -> None:
        for i in range(n):
            p = {k: v.clone().requires_grad_() for k, v in params.items()}
            loss(p, x[i], y[i]).backward()

    r = args.repeats
    print(f"torch threads: {torch.get_num_threads()}")
    print(
        f"vmap, parameters stacked per client: {best_ms(lambda: per_client(stacked, x, y), r):.1f}"
    )
    print(f"vmap, parameters shared (first step): {best_ms(lambda: shared(params, x, y), r):.1f}")
    print(f"per-client loop:                      {best_ms(loop, r):.1f}")
    replies = [torch.randn(1_163_978) for _ in range(n)]
    mask = best_ms(lambda: [bool(torch.isfinite(v).all()) for v in replies], r)
    print(f"NaN/Inf check of {n} replies, element-wise mask: {mask:.1f}")
    print(
        f"NaN/Inf check of {n} replies, all_finite:        "
        f"{best_ms(lambda: [all_finite(v) for v in replies], r):.1f}"
    )


if __name__ == "__main__":
    main()
