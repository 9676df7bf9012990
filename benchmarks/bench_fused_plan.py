"""CPU cost of planning one fused round of the seed's as_run Table 2 (132 jobs): every client's
mini-batch indices from its own generator and every data-attacked batch, exactly as the single
runs draw them (fedbgmd.fused.planner._plan_round). This is the work the planner processes
(hydra.launcher.workers) take off the device loop.

    python benchmarks/bench_fused_plan.py [--rounds 5]

model=logreg keeps the group's set-up cheap; planning does not depend on the model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fedbgmd.config import compose_config
from fedbgmd.fused import FusedGroup
from fedbgmd.fused.planner import _plan_round

ROWS = ("clean bitflip20 bitflip40 additive20 additive40 impulse20 impulse40 featnoise20 "
        "featnoise40 backdoor20 backdoor40").split()  # fmt: skip


FIXED = ["device=cpu", "model=logreg", "plots=false", "progress=false"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    cfgs = [
        compose_config([f"+table2=as_run_{r}", f"strategy={s}", f"seed={seed}", *FIXED])
        for r in ROWS
        for s in ("fedavg", "cm", "fedbgmd", "gm")
        for seed in (0, 1, 2)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        group = FusedGroup([(c, Path(tmp) / str(i)) for i, c in enumerate(cfgs)])
        state = group._plan_state()
        times = []
        for rnd in range(1, a.rounds + 1):
            t0 = time.perf_counter()
            idx, attacked, _ = _plan_round(state, rnd)
            times.append(time.perf_counter() - t0)
    n_att = 0 if attacked is None else len(attacked[0])
    print(
        f"{len(cfgs)} jobs, {idx.shape[0] * idx.shape[1]} clients and {n_att} attacked batches "
        f"a round: planning {1000 * statistics.median(times):.0f} ms a round (median of "
        f"{a.rounds}, one process)"
    )


if __name__ == "__main__":
    main()
