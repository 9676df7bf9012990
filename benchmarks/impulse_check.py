"""How far impulse (salt-and-pepper) noise in 40% of the clients moves the mean of their updates.

Investigates the Table 2 cell "SGD, impulse 40%" (seed: diverged; ours: ~75% after 1 epoch, no
divergence in 3 seeds). Takes one round of the seed's setup -- 32 clients x batch 16 of
Fashion-MNIST, the 1.16M-parameter CNN, updates c_i = lr * g_i with lr = 0.01 (H = 1) -- where the
12 Byzantine clients (floor(0.4 * 32)) compute their gradient on impulse-corrupted batches
(our `impulse` attack: each pixel hit with probability p, set to the batch's min or max, i.e. to
0 or 1 in pixel units after normalisation), and compares the mean with the mean of the 20 honest
updates. A salt value of 255 -- what "set to 1" becomes if it is applied to raw 0-255 pixels and
then normalised as if it were a 0-1 pixel -- is shown for contrast.

    python benchmarks/impulse_check.py [--checkpoint RUN/checkpoint.pt] [--seed 0]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from seed_setup import load_setup, parse_args

from fedbgmd.attacks import get_attack
from fedbgmd.core import flatten_state
from fedbgmd.data import normalization


def main() -> None:
    args = parse_args()
    ds, model = load_setup(args)
    (mean_px,), (std_px,) = normalization("fashion_mnist")

    def update(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(args.seed)  # the same dropout masks for every variant
        F.cross_entropy(model(x), y).backward()
        return args.lr * flatten_state({k: p.grad for k, p in model.named_parameters()})[0]

    g = torch.Generator().manual_seed(args.seed)
    batches = [
        (ds.train.x[i], ds.train.y[i])
        for i in (torch.randint(len(ds.train), (16,), generator=g) for _ in range(args.clients))
    ]
    byz = args.byzantine
    honest = torch.stack([update(x, y) for x, y in batches[byz:]])
    honest_mean = honest.mean(0)
    ref = honest_mean.norm()
    print(
        f"n={args.clients}, byzantine={byz}, |honest mean|={ref:.3e}, "
        f"median |c_i| honest={honest.norm(dim=1).median():.3e}"
        + (f", checkpoint {args.checkpoint}" if args.checkpoint else ", model at initialisation")
    )
    variants = [
        ("p=0.90, min/max (ours, paper)", {"p": 0.9}),
        ("p=0.95, min/max (ours, as_run)", {"p": 0.95}),
        (
            "p=0.95, salt = 255 raw",
            {"p": 0.95, "low": -mean_px / std_px, "high": (255 - mean_px) / std_px},
        ),
    ]
    for label, params in variants:
        attack = get_attack("impulse", **params)
        ag = torch.Generator().manual_seed(args.seed + 1)
        bad = torch.stack(
            [
                update(*attack.corrupt_batch(x, y, generator=ag, num_classes=ds.num_classes))
                for x, y in batches[:byz]
            ]
        )
        mean = torch.cat([bad, honest]).mean(0)
        cos = F.cosine_similarity(mean, honest_mean, dim=0)
        print(
            f"{label:32s} median |c_i| corrupted / honest = "
            f"{bad.norm(dim=1).median() / honest.norm(dim=1).median():9.3g}; mean of all 32: "
            f"cos to honest mean {cos:.3f}, |mean - honest mean|/|honest mean| = "
            f"{(mean - honest_mean).norm() / ref:.3g}"
        )


if __name__ == "__main__":
    main()
