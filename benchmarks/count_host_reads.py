#!/usr/bin/env python
"""Count the scalar host reads (``bool()``/``float()``/``.item()``/``.tolist()`` of a tensor) per
round of a run, by the code line that makes them.

On a GPU each such read of a device tensor waits for the device to finish its queue, so they
bound how far the CPU can run ahead. Counting needs no GPU: the run executes on the CPU and
``aten._local_scalar_dense`` (what ``bool``/``float``/``item`` call) and ``Tensor.tolist`` are
counted; reads of tensors that live on the CPU anyway (CPU generators, the Gram solver's host
iterations) are counted too and say so by their location. Per round = (count of a 4-round run −
count of a 2-round run) / 2, so start-up and the final evaluation cancel.

    python benchmarks/count_host_reads.py [hydra overrides...]

Default: the seed's Fashion-MNIST setup (``experiment=fmnist_table2_as_run``), FL-BGMD, 20% bit
flips, batched in-process engine, one torch thread. Needs Fashion-MNIST (see the README).
"""

from __future__ import annotations

import collections
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedbgmd.cli import entry

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = [
    "experiment=fmnist_table2_as_run",
    "strategy=fedbgmd",
    "attack=bit_flip",
    "attack.fraction=0.2",
    "attack.params.scale=5",
    "strategy.weighted=false",
    "eval_every=100000",
    "plots=false",
    "progress=false",
    "engine.num_threads=1",
]
COUNTS: collections.Counter[str] = collections.Counter()


def _where() -> str:
    """The innermost frame in the project's code (not in site-packages)."""
    for fr in reversed(traceback.extract_stack(limit=60)):
        path = Path(fr.filename)
        if (
            "site-packages" not in fr.filename
            and ROOT in path.parents
            and path.name != Path(__file__).name
        ):
            return f"{path.relative_to(ROOT)}:{fr.name}"
    return "(outside the project)"


class _Reads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            COUNTS[_where()] += 1
        return func(*args, **(kwargs or {}))


def _count(rounds: int, overrides: list[str]) -> collections.Counter[str]:
    """Scalar reads during one run of ``rounds`` rounds through the CLI (as ``fedbgmd ...``)."""
    COUNTS.clear()
    with tempfile.TemporaryDirectory() as tmp, _Reads():
        entry([*DEFAULTS, f"num_rounds={rounds}", *overrides, f"hydra.run.dir={tmp}"])
    return collections.Counter(COUNTS)


def main(argv: list[str]) -> int:
    tolist = torch.Tensor.tolist

    def counted_tolist(t: torch.Tensor):  # type: ignore[no-untyped-def]
        COUNTS[_where() + " (tolist)"] += 1
        return tolist(t)

    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
    short, long = _count(2, argv), _count(4, argv)
    per_round = {k: (long[k] - short[k]) / 2 for k in set(short) | set(long) if long[k] != short[k]}
    print(f"host reads per round: {sum(per_round.values()):g}")
    for where, n in sorted(per_round.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{n:8g}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
