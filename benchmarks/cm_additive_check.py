"""How far additive Gaussian noise in 40% of the rows moves CM and GM, on real client updates.

Investigates the Table 2 cell "CMD, additive noise 40%" (seed: 41.04% after 50 epochs; ours: ~76%
after 1 epoch). Takes one round of the seed's setup -- 32 clients x batch 16 of Fashion-MNIST, the
1.16M-parameter CNN, updates c_i = lr * g_i with lr = 0.01 (H = 1) -- adds z ~ N(0, sigma^2 I) to
the rows of the 12 Byzantine clients (floor(0.4 * 32)), and compares each aggregate with the mean
of the 20 honest updates:

- sigma = 10 on the update: the attack as SPEC section 4 and our `gaussian` attack define it;
- sigma = 0.1 on the update: the slides' N(0, 100) on the *gradient*, times lr = 0.01.

    python benchmarks/cm_additive_check.py [--checkpoint RUN/checkpoint.pt] [--seed 0]

A checkpoint (a run's checkpoint.pt) evaluates the question at a trained model instead of at
initialisation. Needs the Fashion-MNIST idx files. Prints one line per (aggregator, sigma).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seed_setup import load_setup, parse_args

from fedbgmd.core import flatten_state, get_aggregator


def main() -> None:
    args = parse_args()
    ds, model = load_setup(args)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for _ in range(args.clients):
        idx = torch.randint(len(ds.train), (16,), generator=g)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(ds.train.x[idx]), ds.train.y[idx]).backward()
        grads = {k: p.grad for k, p in model.named_parameters()}
        rows.append(args.lr * flatten_state(grads)[0])
    clean = torch.stack(rows)
    byz = args.byzantine
    honest_mean = clean[byz:].mean(0)
    ref = honest_mean.norm()
    print(
        f"d={clean.shape[1]}, n={args.clients}, byzantine={byz}, |honest mean|={ref:.3e}, "
        f"median |c_i|={clean.norm(dim=1).median():.3e}"
        + (f", checkpoint {args.checkpoint}" if args.checkpoint else ", model at initialisation")
    )
    for name in ("cm", "gm"):
        agg = get_aggregator(name)
        for sigma in (0.0, 0.1, 10.0):
            x = clean.clone()
            noise = torch.randn(byz, x.shape[1], generator=torch.Generator().manual_seed(1))
            x[:byz] += sigma * noise
            v = agg(x).vector
            cos = F.cosine_similarity(v, honest_mean, dim=0)
            print(
                f"{name:3s} sigma={sigma:5.1f}: cos(agg, honest mean)={cos:.3f}, "
                f"|agg - honest mean|/|honest mean|={(v - honest_mean).norm() / ref:.3f}, "
                f"|agg|/|honest mean|={v.norm() / ref:.3f}"
            )
    print(
        f"mean sigma= 10.0: |agg - honest mean|/|honest mean|="
        f"{((clean[byz:].sum(0) + (clean[:byz] + 10 * noise).sum(0)) / args.clients - honest_mean).norm() / ref:.1f}"
    )


if __name__ == "__main__":
    main()
