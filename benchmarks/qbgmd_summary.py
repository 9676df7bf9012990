"""Table and plot of the QBGMD study (benchmarks/qbgmd_study.sh): final test accuracy against
bytes up per round for every (strategy, row, quantization) run under OUT_DIR.

    python benchmarks/qbgmd_summary.py OUT_DIR [DEST]   # DEST default docs/results/qbgmd

Writes DEST/study.csv (one line per run), DEST/study.md (the table) and DEST/accuracy_vs_bytes.png.
Bytes up per round: the mean of metrics.csv's bytes_up over the run's rounds (every client's
message as sent, quantization scales included). A run that did not complete is listed with its
status and no accuracy.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

STRATEGY = {"fedbgmd": "BGMD", "gm": "GMD"}
ROW = {"none": "clean", "bit_flip": "bit flip 20%"}


def setting_of(cfg: dict) -> tuple[str, str]:
    q = cfg["client"]["quantization"]
    if q["method"] == "none":
        return "none", "-"
    b = q.get("bucket_size")
    return str(q["bits"]), "none" if b is None else str(b)


def collect(root: Path) -> list[dict[str, object]]:
    runs: list[dict[str, object]] = []
    for cfg_path in sorted(root.glob("*/*/config.yaml")):
        run = cfg_path.parent
        summ = run / "summary.json"
        if not summ.exists():
            continue
        s = json.loads(summ.read_text())
        cfg = s["config"]
        bits, bucket = setting_of(cfg)
        with open(run / "metrics.csv") as f:
            ups = [float(r["bytes_up"]) for r in csv.DictReader(f) if r["bytes_up"]]
        runs.append(
            {
                "strategy": STRATEGY.get(s["strategy"], s["strategy"]),
                "row": ROW.get(s["attack"], s["attack"]),
                "bits": bits,
                "bucket": bucket,
                "rounds": s["rounds"],
                "status": s["status"],
                "final_accuracy": s["final_accuracy"] if s["status"] == "completed" else None,
                "bytes_up_per_round": sum(ups) / len(ups) if ups else None,
                "wall_time_s": round(float(s["wall_time_s"]), 1),
                "run": str(run.relative_to(root)),
            }
        )
    return runs


ORDER = [("none", "-")] + [(b, k) for b in ("8", "4", "2") for k in ("none", "512", "128")]
COLUMNS = [(st, row) for row in ("clean", "bit flip 20%") for st in ("BGMD", "GMD")]


def table(runs: list[dict[str, object]]) -> str:
    by = {(r["strategy"], r["row"], r["bits"], r["bucket"]): r for r in runs}
    head = "| bits | bucket | MB up / round | " + " | ".join(f"{s} {r}" for s, r in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for bits, bucket in ORDER:
        cells, mb = [], ""
        for st, row in COLUMNS:
            r = by.get((st, row, bits, bucket))
            if r is None:
                cells.append("not run")
                continue
            if r["bytes_up_per_round"] is not None and not mb:
                mb = f"{float(r['bytes_up_per_round']) / 1e6:.2f}"  # type: ignore[arg-type]
            acc = r["final_accuracy"]
            cells.append(f"{100 * float(acc):.2f}" if acc is not None else str(r["status"]))  # type: ignore[arg-type]
        lines.append(f"| {bits} | {bucket} | {mb} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, object]], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, row in zip(axes, ("clean", "bit flip 20%"), strict=True):
        for st, marker in (("BGMD", "o"), ("GMD", "s")):
            pts = [
                r
                for r in runs
                if r["strategy"] == st and r["row"] == row and r["final_accuracy"] is not None
            ]
            xs = [float(r["bytes_up_per_round"]) / 1e6 for r in pts]  # type: ignore[arg-type]
            ys = [100 * float(r["final_accuracy"]) for r in pts]  # type: ignore[arg-type]
            ax.scatter(xs, ys, marker=marker, label=st, alpha=0.8)
            for r, x, y in zip(pts, xs, ys, strict=True):
                lab = "fp32" if r["bits"] == "none" else f"{r['bits']}b/{r['bucket']}"
                ax.annotate(lab, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("MB up per round (32 clients)")
        ax.set_title(f"Fashion-MNIST, {row}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after the budget (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(dest / "accuracy_vs_bytes.png", dpi=110)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    root = Path(sys.argv[1])
    dest = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/results/qbgmd")
    dest.mkdir(parents=True, exist_ok=True)
    runs = collect(root)
    if not runs:
        print(f"no finished runs under {root}", file=sys.stderr)
        return 1
    with open(dest / "study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    md = table(runs)
    (dest / "study.md").write_text(md)
    plot(runs, dest)
    print(md)
    print(f"{len(runs)} runs; wrote {dest}/study.csv, study.md, accuracy_vs_bytes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
