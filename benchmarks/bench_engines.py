"""Run the same config on each engine and compare wall time and per-phase round time.

    python benchmarks/bench_engines.py [--rounds 20] [--clients 10] [hydra overrides...]

Default config: synthetic data, MLP, FL-BGMD, H = 1 local step, 10 clients. Prints a table and
writes benchmarks/results/engines-<host>.json. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(engine: str, overrides: list[str], out: Path) -> dict:
    """``engine`` is an engine name, or ``inprocess:batched`` for the batched in-process mode."""
    name, _, mode = engine.partition(":")
    extra = ["engine.batched=true"] if mode == "batched" else []
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedbgmd.cli import entry; entry()",
            f"engine={name}",
            *extra,
            "progress=false",
            f"hydra.run.dir={out}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-2000:]}")
    from fedbgmd.reporting.writer import read_metrics

    rows = read_metrics(out)[1:]  # skip round 0 (initial evaluation)
    med = {
        k: statistics.median(r[k] or 0.0 for r in rows)
        for k in ("round_time_s", "client_time_s", "comm_time_s", "agg_time_s", "eval_time_s")
    }
    overhead = [
        r["round_time_s"]
        - (r["client_time_s"] or 0)
        - (r["agg_time_s"] or 0)
        - (r["eval_time_s"] or 0)
        for r in rows
    ]
    med["overhead_s"] = statistics.median(overhead)
    med["overhead_frac"] = statistics.median(
        o / r["round_time_s"] for o, r in zip(overhead, rows) if r["round_time_s"]
    )
    return {
        "engine": engine,
        "process_wall_s": wall,
        "final_accuracy": rows[-1]["test_accuracy"],
        "median": med,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--engines", default="inprocess,inprocess:batched,simulation")
    args, extra = ap.parse_known_args()
    overrides = [
        "experiment=smoke",
        f"num_rounds={args.rounds}",
        f"num_clients={args.clients}",
        "client.local_steps=1",
        *extra,
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            results.append(run(engine, overrides, Path(tmp) / engine))
    print(
        f"config: {' '.join(overrides)}  machine: {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} CPUs"
    )
    print(
        "| engine | process wall (s) | median round (s) | client (s) | agg (s) | eval (s) | overhead (s) | overhead / round |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median"]
        print(
            f"| {r['engine']} | {r['process_wall_s']:.1f} | {m['round_time_s']:.4f} | "
            f"{m['client_time_s']:.4f} | {m['agg_time_s']:.4f} | {m['eval_time_s']:.4f} | "
            f"{m['overhead_s']:.4f} | {100 * m['overhead_frac']:.0f}% |"
        )
    base = results[-1]
    for r in results[:-1]:
        print(
            f"{base['engine']} / {r['engine']}: end to end "
            f"{base['process_wall_s'] / r['process_wall_s']:.1f}x, per round "
            f"{base['median']['round_time_s'] / r['median']['round_time_s']:.1f}x"
        )
    out = ROOT / "benchmarks" / "results" / f"engines-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"overrides": overrides, "results": results}, indent=2))


if __name__ == "__main__":
    main()
