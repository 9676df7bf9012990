"""Pack a sweep's results small enough to come back from the GPU machine (<= 16 MiB a file).

    python3 benchmarks/pack_sweep.py SWEEP_DIR OUT_FILE.jsonl.gz [--every N]

One JSON line per job: its overrides, summary.json, every evaluated round's row and every Nth
round's row of metrics.csv (diagnostics: train loss, GM iterations, memory norm, timings).
A job without summary.json (the run was cut short) still gives its rows, marked unfinished.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from fedbgmd.reporting.writer import read_metrics, read_summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep")
    ap.add_argument("out")
    ap.add_argument("--every", type=int, default=39)
    a = ap.parse_args()
    jobs = 0
    with gzip.open(a.out, "wt", encoding="utf-8") as fh:
        for run in sorted(Path(a.sweep).iterdir(), key=lambda p: p.name):
            if not (run / "metrics.csv").exists():
                continue
            try:
                summary = read_summary(run)
                summary.pop("config", None)
            except (OSError, ValueError):
                summary = {"status": "unfinished"}
            rows = [
                r
                for r in read_metrics(run)
                if r.get("test_accuracy") is not None or (r.get("round") or 0) % a.every == 0
            ]
            overrides = (
                (run / ".hydra" / "overrides.yaml").read_text()
                if (run / ".hydra" / "overrides.yaml").exists()
                else ""
            )
            fh.write(
                json.dumps(
                    {"job": run.name, "overrides": overrides, "summary": summary, "rows": rows}
                )
                + "\n"
            )
            jobs += 1
    print(f"packed {jobs} jobs into {a.out}")


if __name__ == "__main__":
    main()
