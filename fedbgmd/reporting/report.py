"""Collect a sweep (e.g. a Hydra multirun folder) into a Table-2-like report and Figs-2-4-like plots.

``fedbgmd report DIR`` -> ``main([DIR, ...])`` -> ``build_report(DIR, ...)``, which finds every
``summary.json`` below DIR, groups runs by setting (:mod:`fedbgmd.reporting.setting`; seed apart,
or by --group-by keys), and writes into --out (default DIR/report/):

- ``report.md``: one table row per setting (mean ± std over seeds, sample std ddof=1, n shown),
  a strategy x (attack, fraction) pivot like Table 2 when the sweep varies those (each cell: mean ±
  std, n, epochs actually run, diverged runs, and with --reference the seed paper's number), a
  per-round timing table with BGMD-vs-GMD speed-ups, the relative-residual summary, the failed runs;
- ``report.csv``: one row per setting; ``timing.csv``: median time per round per setting and the
  GMD/BGMD speed-up ratios;
- ``compare_accuracy_round.png`` / ``compare_accuracy_time.png`` / ``compare_accuracy_epoch.png``:
  mean test accuracy ± std per setting vs round, wall-clock time and epoch, one subplot per attack
  setting when there are several;
- ``residual_epoch.png``: mean relative residual ||G − C_k(G)||²/||G||² vs epoch per setting that
  logs it (BGMD runs); not written (a line in report.md says so) when no run logs it.

``--reference FILE.csv`` (columns strategy, attack, fraction, accuracy_pct, epochs, optional
std_pct; e.g. benchmarks/table2_reference.csv) adds the seed's number to the matching pivot cells and
marks cells whose runs stopped before the reference's epochs as reduced-budget ("1.0/50 ep").

Runs are only read, never modified. Accuracies in summaries/metrics are fractions in [0, 1] and are
reported in %. Plain python + numpy (+ matplotlib through fedbgmd.reporting.plots).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedbgmd.reporting.reference import (
    REFERENCE_COLUMNS,
    CellKey,
    RefCell,
    ReferenceFileError,
    load_reference,
    match_reference,
)
from fedbgmd.reporting.runs import (
    Group,
    NoRunsFoundError,
    Run,
    collect_runs,
    group_runs,
    is_attack_key,
    num,
    varying_keys,
)
from fedbgmd.reporting.stats import group_stats, pct, series
from fedbgmd.reporting.summary import utc_now_iso
from fedbgmd.reporting.tables import (
    CSV_STATS,
    TIMING_CSV,
    curve_label,
    failed_runs,
    md_table,
    pivot_tables,
    results_table,
    setting_label,
    timing_section,
    unmatched_reference,
    unreadable_folders,
    write_csv,
)
from fedbgmd.reporting.writer import SUMMARY_JSON

__all__ = [
    "REFERENCE_COLUMNS",
    "NoRunsFoundError",
    "ReferenceFileError",
    "build_report",
    "main",
]


def build_report(
    root: Path | str,
    out_dir: Path | str | None = None,
    group_by: list[str] | None = None,
    metric: str = "final",
    reference: Path | str | None = None,
) -> Path:
    """Write report.md, report.csv, timing.csv and the plots for the runs below root.

    ``metric`` ("final" or "best") picks the accuracy shown in the pivot table; ``reference`` is
    a CSV of the seed paper's numbers (see load_reference). Returns the path of report.md.
    Raises NoRunsFoundError when root holds no summary.json, ReferenceFileError for a bad
    reference file (before anything is written).
    """
    if metric not in ("final", "best"):
        raise ValueError(f"metric must be 'final' or 'best', not {metric!r}")
    refs = load_reference(reference) if reference is not None else {}
    root = Path(root)
    if not root.is_dir():
        raise NoRunsFoundError(f"no runs found: {root} is not a directory")
    out = Path(out_dir) if out_dir is not None else root / "report"
    runs, problems = collect_runs(root, exclude=out)
    if not runs:
        raise NoRunsFoundError(
            f"no runs found under {root} (looked for {SUMMARY_JSON} in every subfolder)"
        )
    out.mkdir(parents=True, exist_ok=True)

    groups = group_runs(runs, group_by)
    stats = [group_stats(g) for g in groups]
    matched = match_reference(groups, stats, refs)
    varying = varying_keys(groups)
    shown = varying or list(groups[0].setting)  # the keys that tell the table's rows apart

    md = _overview(root, runs, groups, stats, varying, reference, refs, matched)
    md += ["## Results per setting", "", *results_table(groups, stats, shown)]
    ref_name = Path(reference).name if reference is not None else ""
    md += pivot_tables(groups, stats, metric, refs, ref_name)
    md += unmatched_reference(refs, matched)
    md += timing_section(groups, stats, shown)  # before the CSVs: it adds the speed-ups
    residual_md, figures = _figures(groups, out, shown, varying)
    md += residual_md
    problems += [(run.path, run.read_error) for run in runs if run.read_error]
    md += failed_runs(groups, root, shown)
    md += unreadable_folders(problems, root)
    md += ["## Figures", "", *(f"![{p.stem}]({p.name})" for p in figures), ""]

    write_csv(out / "report.csv", groups, stats, CSV_STATS)
    write_csv(out / "timing.csv", groups, stats, TIMING_CSV)
    md_path = out / "report.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return md_path


def _overview(
    root: Path,
    runs: Sequence[Run],
    groups: Sequence[Group],
    stats: Sequence[dict[str, Any]],
    varying: Sequence[str],
    reference: Path | str | None,
    refs: dict[CellKey, RefCell],
    matched: set[CellKey],
) -> list[str]:
    """The title and the sweep's counts: runs, outcomes, skipped rounds, common setting."""
    common = [k for k in groups[0].setting if k not in varying]
    n_failed = sum(len(g.failed) for g in groups)
    n_completed = sum(len(g.completed) for g in groups)
    n_repeats = sum(g.repeats for g in groups)
    n_diverged = sum(s["n_diverged"] for s in stats)
    repeats = (
        f", {n_repeats} not counted (repeats of a seed; the last to finish counts)"
        if n_repeats
        else ""
    )
    md: list[str] = [
        "# fedbgmd sweep report",
        "",
        f"- sweep: `{root}`",
        f"- generated: {utc_now_iso()}",
        f"- runs: {len(runs)} ({n_completed} completed, {n_failed} failed, "
        f"{n_diverged} diverged{repeats}); settings: {len(groups)}",
    ]
    n_skipped = sum(s["n_skipped_rounds"] for s in stats)
    if n_skipped:
        md.append(
            f"- **{n_skipped} rounds skipped** in the completed runs (too few replies, or the "
            "aggregator refused them: the model did not move); see each run's metrics.jsonl"
        )
    if common:
        md.append("- common to all runs: " + setting_label(groups[0].setting, common))
    if reference is not None:
        md.append(
            f"- reference: `{reference}` ({len(refs)} cells, {len(matched)} matched by this sweep)"
        )
    md += [
        "",
        "Mean ± sample std (ddof=1) over the completed runs of each setting; ±0.00 when n=1. "
        "Accuracies in %, epochs = last logged epoch (min–max over runs), "
        "agg = mean aggregation time per round.",
        "",
    ]
    return md


def _figures(
    groups: Sequence[Group], out: Path, shown: Sequence[str], varying: Sequence[str]
) -> tuple[list[str], list[Path]]:
    """The residual section of report.md and every figure: accuracy vs round, time and epoch
    (one panel per attack setting), and residual_epoch.png when some run logs the residual."""
    from fedbgmd.reporting.plots import Curve, plot_comparison  # matplotlib only here

    residual_md, residual_png = _residual_section(groups, out, shown)
    panel_keys = [k for k in varying if is_attack_key(k)]
    label_keys = [k for k in varying if k not in panel_keys]
    curves = []
    for g in groups:
        acc = series(g, "test_accuracy", pct, carry_diverged=True)
        if acc.rounds.size == 0:
            continue
        curves.append(
            Curve(
                label=curve_label(g.setting, label_keys),
                color_key=str(g.setting.get("strategy", "")),
                rounds=acc.rounds,
                mean=acc.mean,
                std=acc.std,
                time=acc.time,
                n=acc.n,
                panel=setting_label(g.setting, panel_keys),
                epoch=acc.epoch,
            )
        )
    figures = [
        plot_comparison(curves, out / "compare_accuracy_round.png", x="round"),
        plot_comparison(curves, out / "compare_accuracy_time.png", x="time"),
        plot_comparison(curves, out / "compare_accuracy_epoch.png", x="epoch"),
    ]
    if residual_png is not None:
        figures.append(residual_png)
    return residual_md, figures


def _residual_section(
    groups: Sequence[Group], out: Path, shown: Sequence[str]
) -> tuple[list[str], Path | None]:
    """residual_epoch.png and a summary table, or a logged skip when no run logs the residual."""
    from fedbgmd.reporting.plots import Curve, plot_comparison

    md = ["## Relative residual ‖G − C_k(G)‖²/‖G‖² (block selection, Lemma 1)", ""]
    with_data = [(g, series(g, "relative_residual")) for g in groups]
    with_data = [(g, s) for g, s in with_data if s.rounds.size]
    if not with_data:
        return [
            *md,
            "Skipped: no run logs relative_residual (only block strategies such as fedbgmd do); "
            "residual_epoch.png not written.",
            "",
        ], None
    keys = [k for k in varying_keys([g for g, _ in with_data]) if k in shown] or list(shown)
    curves = []
    rows = []
    for g, s in with_data:
        label = curve_label(g.setting, keys)
        curves.append(
            Curve(
                label=label,
                rounds=s.rounds,
                mean=s.mean,
                std=s.std,
                time=s.time,
                n=s.n,
                epoch=s.epoch,
            )
        )
        beta = num(g.setting.get("strategy.block.beta"))
        rows.append(
            [
                setting_label(g.setting, [k for k in keys if g.setting.get(k) is not None]),
                str(len(g.completed)),
                f"{float(np.mean(s.mean)):.4f}",
                f"{float(s.mean[-1]):.4f}",
                "-" if beta is None else f"{1 - beta:.4f}",
            ]
        )
    path = plot_comparison(
        curves,
        out / "residual_epoch.png",
        x="epoch",
        ylabel="relative residual",
        title="‖G − C_k(G)‖² / ‖G‖² (mean ± std over seeds)",
    )
    if not any(np.isfinite(s.epoch).any() for _, s in with_data):
        md += ["No epoch column logged: residual_epoch.png has no curves.", ""]
    md += [
        *md_table(["setting", "n", "mean over rounds", "last round", "1 − β"], rows),
        "",
        "Lemma 1 bounds the expected residual by 1 − ξ with ξ ≥ k/d ≈ β (the worst case, "
        "gradients spread evenly over the coordinates).",
        "",
    ]
    return md, path


def main(argv: list[str] | None = None) -> int:
    """CLI: ``fedbgmd report DIR [--out OUT] [--group-by k1,k2] [--metric final|best]
    [--reference FILE.csv]``."""
    parser = argparse.ArgumentParser(
        prog="fedbgmd report",
        description="Collect a sweep (folders with summary.json) into report.md/.csv, "
        "timing.csv and plots.",
    )
    parser.add_argument("dir", type=Path, help="sweep folder, e.g. multirun/2024-05-01/12-00-00")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default DIR/report)")
    parser.add_argument(
        "--group-by",
        action="append",
        default=None,
        metavar="KEYS",
        help="comma-separated setting keys to group by (default: all setting keys except seed); "
        "repeatable",
    )
    parser.add_argument(
        "--metric",
        choices=("final", "best"),
        default="final",
        help="accuracy shown in the strategy x corruption table (default: final)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="FILE.csv",
        help="reference numbers to show next to the measured ones (columns: strategy, attack, "
        "fraction, accuracy_pct, epochs[, std_pct]), e.g. benchmarks/table2_reference.csv",
    )
    args = parser.parse_args(argv)
    group_by = (
        [k.strip() for item in args.group_by for k in item.split(",") if k.strip()]
        if args.group_by
        else None
    )
    try:
        path = build_report(
            args.dir,
            out_dir=args.out,
            group_by=group_by,
            metric=args.metric,
            reference=args.reference,
        )
    except NoRunsFoundError as exc:
        print(f"fedbgmd report: {exc}", file=sys.stderr)
        return 1
    except ReferenceFileError as exc:
        print(f"fedbgmd report: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
