"""Does the geometric median of this checkout differ from that of an older revision?

    python benchmarks/compare_gm_revisions.py 978fe43

Loads ``fedbgmd/core/geometric_median.py`` of REV (``git show``) next to the current one and
compares their medians, both solvers, on blocks of the seed's BGMD shape (32 rows x 10% of the
1,163,978-parameter CNN) with 0, 6 or 12 rows scaled by -5 or 100 (the bit flips of Table 2).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fedbgmd.core import geometric_median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="git revision to compare with, e.g. 978fe43")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "-C", str(root), "show", f"{args.rev}:fedbgmd/core/geometric_median.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gm_old.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("gm_old", path)
        assert spec is not None and spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        sys.modules["gm_old"] = old  # dataclasses look their module up there
        spec.loader.exec_module(old)
    g = torch.Generator().manual_seed(0)
    same = True
    for scale, nb in ((-5.0, 6), (-5.0, 12), (100.0, 12), (0.0, 0)):
        x = torch.randn(32, 116398, generator=g) * 0.02 + torch.randn(116398, generator=g) * 0.01
        x[:nb] *= scale
        for solver in ("gram", "direct"):
            a = old.geometric_median(x, solver=solver).median
            b = geometric_median(x, solver=solver).median
            eq = torch.equal(a, b)
            same &= eq
            print(
                f"rows scaled {nb:2d} x {scale:5g}  {solver:6s}  bitwise equal: {eq}  "
                f"max |diff| {float((a - b).abs().max()):.3g}"
            )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
