"""Time and peak memory of decoding one quantized message (what the server does per reply).

    python benchmarks/bench_unpack.py [--numel 4000000] [--bits 16]

Prints the seconds and the growth of the process's peak RSS while ``dequantize`` decodes a
random packed message (the packed bytes are made first, so only decoding counts).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from fedbgmd.core import dequantize
from fedbgmd.core.quantization import QuantizedTensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=4_000_000)
    ap.add_argument("--bits", type=int, default=16)
    args = ap.parse_args()
    nbytes = (args.numel * args.bits + 7) // 8
    data = torch.randint(
        0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    q = QuantizedTensor(data, torch.tensor(1.0), (args.numel,), args.bits, "qsgd")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    dequantize(q)
    secs = time.perf_counter() - t
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(
        f"{args.numel} codes x {args.bits} bits ({nbytes / 1e6:.1f} MB): {secs:.3f} s, "
        f"peak RSS growth {grown:.0f} MB"
    )


if __name__ == "__main__":
    main()
