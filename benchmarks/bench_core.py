#!/usr/bin/env python
"""Benchmark of fedbgmd.core: geometric median solvers, the BGMD block step, every aggregator.

Run from the repository root (no install needed; torch is the only requirement):

    python benchmarks/bench_core.py --device auto --grid small
    python benchmarks/bench_core.py --device cuda --grid full --repeats 7

For every (n, d) of the grid it draws float32 data on the device — honest rows N(0, I) and
⌊n/10⌋ outlier rows (honest mean + a random direction of norm 100·√d) — and times, with warm-up,
device synchronisation and the median of ``--repeats`` runs:

* ``gm_gram`` / ``gm_direct``: :func:`fedbgmd.core.geometric_median` with ε = 1e-6;
* ``bgmd_sample`` / ``bgmd_topk``: one :func:`fedbgmd.core.bgmd_step` (GM, β = 0.1,
  per-client memory);
* every other registered aggregator (Bulyan with the largest f allowed, at most n/10);
* ``weiszfeld_textbook``: a plain Weiszfeld loop written below (start at the mean, host check of
  the relative objective change every iteration, ε = 1e-6);
* ``byzfl_gm``: ByzFL's GeometricMedian when ``byzfl`` is importable (optional, never required).

Prints a markdown table and writes JSON (machine info included) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import fedbgmd.core as core
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fedbgmd.core as core
from fedbgmd.core.gram import centred_gram
from fedbgmd.core.selection import select_from_norms

SMALL_GRID = [(100, 100_000), (100, 1_000_000)]
FULL_GRID = [(20, 1_000_000), (100, 1_000_000), (100, 11_000_000), (1000, 1_000_000)]
CPU_MAX_FLOP = 5e11  # full-grid sizes whose Gram product exceeds this are skipped on CPU
CPU_MAX_BYTES = 6 * 2**30  # ... and those whose data exceed this (several copies must fit 24 GiB)
SLOW_S = 20.0  # a method whose warm-up takes longer is timed once


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = cpu
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(n: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device)
    f = n // 10
    if f:
        direction = torch.randn(d, generator=g, device=device)
        x[:f] = x[f:].mean(0) + direction * (100.0 * math.sqrt(d) / float(direction.norm()))
    return x


def textbook_weiszfeld(
    x: torch.Tensor, eps: float = 1e-6, max_iter: int = 1000
) -> tuple[torch.Tensor, int]:
    """Plain Weiszfeld: y <- sum_i x_i/||x_i - y|| / sum_i 1/||x_i - y||, from the mean."""
    y = x.mean(0)
    f_prev = math.inf
    for it in range(1, max_iter + 1):
        dist = torch.linalg.vector_norm(x - y, dim=1).clamp_min(1e-8)
        f = float(dist.sum())
        if abs(f_prev - f) <= eps * f:
            return y, it
        w = 1.0 / dist
        y = (w / w.sum()) @ x
        f_prev = f
    return y, max_iter


def byzfl_gm() -> Callable[[torch.Tensor], Any] | None:
    try:
        from byzfl import GeometricMedian  # type: ignore[import-not-found]
    except Exception:
        return None
    agg = GeometricMedian()
    return lambda x: agg(x)


def time_it(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any, int]:
    """Median wall time (ms) over repeats after one warm-up; returns (ms, last output, runs)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    warm = time.perf_counter() - t0
    if warm > SLOW_S:
        return warm * 1e3, out, 1
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out, repeats


def methods(n: int, d: int, device: torch.device, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    k = math.ceil(0.1 * d)
    gm = core.get_aggregator("gm", eps=1e-6)
    ids = list(range(n))
    mems = {s: core.make_memory("per_client", dim=d, device=device) for s in ("sample", "topk")}
    nomem = core.make_memory("none", dim=d, device=device)
    gens = {s: torch.Generator(device=device).manual_seed(1) for s in ("sample", "topk")}

    def step(sel: str) -> Callable[[], Any]:
        return lambda: core.bgmd_step(x, gm, k, mems[sel], ids, selector=sel, generator=gens[sel])

    out: dict[str, Callable[[], Any]] = {
        "gm_gram": lambda: core.geometric_median(x, eps=1e-6, solver="gram"),
        "gm_direct": lambda: core.geometric_median(x, eps=1e-6, solver="direct"),
        "bgmd_sample": step("sample"),
        "bgmd_topk": step("topk"),
        "bgmd_sample_nomem": lambda: core.bgmd_step(
            x, gm, k, nomem, ids, selector="sample", generator=gens["sample"]
        ),
        "weiszfeld_textbook": lambda: textbook_weiszfeld(x),
    }
    f_bulyan = min((n - 3) // 4, n // 10)
    params: dict[str, dict[str, Any]] = {
        "krum": {"f": n // 10},
        "multikrum": {"f": n // 10},
        "bulyan": {"f": f_bulyan},
        "ctm": {"beta": 0.1},
    }
    for name in core.available_aggregators():
        if name == "gm":
            continue
        agg = core.get_aggregator(name, **params.get(name, {}))
        out[f"agg_{name}"] = lambda agg=agg: agg(x)
    bz = byzfl_gm()
    if bz is not None:
        out["byzfl_gm"] = lambda: bz(x)
    return out


def describe(out: Any) -> dict[str, Any]:
    if isinstance(out, core.GMResult):
        return {
            "iterations": out.iterations,
            "converged": out.converged,
            "objective": out.objective,
        }
    if isinstance(out, core.BlockStepResult):
        return {
            "iterations": out.aggregation.iterations,
            "converged": out.aggregation.converged,
            "relative_residual": out.relative_residual,
        }
    if isinstance(out, core.AggregationResult):
        return {"iterations": out.iterations, "converged": out.converged}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], int):
        return {"iterations": out[1]}
    return {}


def skip_reason(n: int, d: int, device: torch.device, grid: str, force: bool) -> str | None:
    if device.type != "cpu" or force or grid == "small":
        return None
    if n * d * 4 > CPU_MAX_BYTES:
        return f"data {n * d * 4 / 2**30:.1f} GiB too large for the CPU run (use --force)"
    if 2.0 * n * n * d > CPU_MAX_FLOP:
        return f"Gram product {2.0 * n * n * d:.1e} flop too slow on CPU (use --force)"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--grid", default="small", choices=["small", "full"])
    p.add_argument(
        "--sizes", default=None, help="explicit grid, e.g. 100x1000000,20x50000; 'none' = no grid"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated method names to run")
    p.add_argument("--force", action="store_true", help="run every size, even slow on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--micro", action="store_true", help="also time primitive ops at the largest size"
    )
    p.add_argument(
        "--threshold", action="store_true", help="time gram vs direct around d = 4n (solver choice)"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_name = args.device
    if dev_name == "auto":
        dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev_name)
    grid = FULL_GRID if args.grid == "full" else SMALL_GRID
    if args.sizes == "none":
        grid = []
    elif args.sizes:
        grid = [tuple(int(float(v)) for v in s.split("x")) for s in args.sizes.split(",")]  # type: ignore[misc]
    out_path = Path(args.out or f"benchmarks/results/core-{device.type}.json")
    info = machine_info(device)
    print(f"# fedbgmd.core benchmark on {info['device_name']} (torch {info['torch']})\n")
    rows: list[dict[str, Any]] = []
    for n, d in grid:
        reason = skip_reason(n, d, device, args.grid, args.force)
        if reason:
            print(f"note: skipping n={n} d={d}: {reason}")
            rows.append({"n": n, "d": d, "skipped": reason})
            continue
        x = make_data(n, d, device)
        todo = methods(n, d, device, x)
        if args.only:
            keep = set(args.only.split(","))
            todo = {k: v for k, v in todo.items() if k in keep}
        for name, fn in todo.items():
            try:
                ms, res, runs = time_it(fn, device, args.repeats)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory
                print(f"note: {name} n={n} d={d} failed: {e}")
                rows.append({"n": n, "d": d, "method": name, "error": str(e)[:200]})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            row = {"n": n, "d": d, "method": name, "ms": ms, "runs": runs, **describe(res)}
            rows.append(row)
            print(f"  n={n:5d} d={d:9d} {name:20s} {ms:10.2f} ms  {describe(res)}", flush=True)
        del x, todo
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.threshold:
        rows += threshold(device, args.repeats)
    if args.micro:
        n, d = max(grid, key=lambda nd: nd[0] * nd[1])
        rows += micro(n, d, device, args.repeats)
    print("\n" + markdown(rows))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"machine": info, "results": rows}, indent=2))
    print(f"\nwrote {out_path}")
    return 0


def threshold(device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Direct vs gram solver time for d/n around the auto threshold (d >= 4n -> gram)."""
    out = []
    shapes = [(n, int(n * r)) for n in (20, 100, 500) for r in (0.5, 1, 2, 4, 8, 32)]
    if device.type == "cuda":
        shapes += [(n, 1_000_000) for n in (200, 400, 700, 1000)]
    for n, d in shapes:
        x = make_data(n, d, device)
        for solver in ("direct", "gram"):
            ms, res, runs = time_it(
                lambda s=solver, x=x: core.geometric_median(x, solver=s), device, repeats
            )
            row = {"n": n, "d": d, "method": f"threshold_{solver}", "ms": ms, "runs": runs}
            out.append({**row, **describe(res)})
            print(f"  n={n:5d} d={d:9d} {solver:8s} {ms:9.3f} ms", flush=True)
    return out


def micro(n: int, d: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Primitive costs at one size: the lower bounds the solvers are built from."""
    x = make_data(n, d, device)
    k = math.ceil(0.1 * d)
    s = core.column_sq_norms(x)
    alpha = torch.full((n,), 1.0 / n, device=device)
    ops: dict[str, Callable[[], Any]] = {
        "op_row_sums (finite check)": lambda: x.sum(1),
        "op_gram_fp32 (X Xt)": lambda: x @ x.T,
        "op_centred_gram": lambda: centred_gram(x, x[0]),
        "op_matvec (alpha X)": lambda: alpha @ x,
        "op_column_sq_norms": lambda: core.column_sq_norms(x),
        "op_select_sample": lambda: select_from_norms(s, k, "sample"),
        "op_select_topk": lambda: select_from_norms(s, k, "topk"),
        "op_multinomial": lambda: torch.multinomial(s, k, replacement=False),
    }
    if device.type == "cuda":

        def tf32() -> Any:
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return x @ x.T
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old

        ops["op_gram_tf32"] = tf32
        ops["op_gram_bf16"] = lambda: x.to(torch.bfloat16) @ x.to(torch.bfloat16).T
    out = []
    for name, fn in ops.items():
        ms, _, runs = time_it(fn, device, repeats)
        print(f"  n={n:5d} d={d:9d} {name:28s} {ms:10.2f} ms", flush=True)
        out.append({"n": n, "d": d, "method": name, "ms": ms, "runs": runs})
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| n | d | method | median ms | iterations | converged | ratio to gm_gram |",
        "|---|---|---|---|---|---|---|",
    ]
    ref = {(r["n"], r["d"]): r["ms"] for r in rows if r.get("method") == "gm_gram" and "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        base = ref.get((r["n"], r["d"]))
        ratio = f"{r['ms'] / base:.2f}" if base else ""
        lines.append(
            f"| {r['n']} | {r['d']:.3g} | {r['method']} | {r['ms']:.2f} | {r.get('iterations', '')} "
            f"| {r.get('converged', '')} | {ratio} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
