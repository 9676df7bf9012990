"""The report's tables: formatting of setting values and statistics, the results table, the
strategy x corruption pivot (like the seed's Table 2), the timing table, and the CSV files.
Plain python.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbgmd.reporting.reference import CellKey, RefCell, cell_key, group_cell_key
from fedbgmd.reporting.runs import (
    Group,
    in_order,
    is_attack_key,
    is_strategy_key,
    key_of,
    num,
    varying_keys,
)
from fedbgmd.reporting.stats import BGMD_STRATEGY, GMD_STRATEGY, is_fused, is_reduced, speedups

__all__ = ["CSV_STATS", "TIMING_CSV", "md_table", "pivot_tables", "timing_section", "write_csv"]

# setting keys that only set the budget: a pivot cell shows the epochs reached instead
BUDGET_KEYS: frozenset[str] = frozenset({"num_rounds"})


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return str(v)


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def plus_minus(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {(std or 0.0):.{digits}f}"


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}×"


def setting_label(setting: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={fmt_value(setting.get(k))}" for k in keys)


def curve_label(setting: dict[str, Any], keys: Sequence[str]) -> str:
    """A short plot legend label: the strategy's name, then ``leaf=value`` of the other keys
    (``strategy.block.beta`` -> ``beta``), leaving out unset ones (e.g. beta of a non-block
    strategy)."""
    parts = [
        fmt_value(setting[k])
        if k == "strategy"
        else f"{k.rsplit('.', 1)[-1]}={fmt_value(setting[k])}"
        for k in keys
        if setting.get(k) is not None
    ]
    return ", ".join(parts) or "all runs"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(md_escape(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return lines


def fmt_epochs(e: float) -> str:
    text = f"{e:.1f}"
    return text if text != "0.0" else f"{e:.2g}"


def budget_text(s: dict[str, Any], target: float | None) -> str:
    """'1.0 ep' (no target or full budget) or '1.0/50 ep' (reduced: reached / target epochs)."""
    lo, hi = s.get("epochs_min"), s.get("epochs_max")
    if lo is None or hi is None:
        reached = "?"
    elif fmt_epochs(lo) == fmt_epochs(hi):
        reached = fmt_epochs(lo)
    else:
        reached = f"{fmt_epochs(lo)}–{fmt_epochs(hi)}"
    if target is None:
        return "" if reached == "?" else f"{reached} ep"
    if not is_reduced({**s, "target_epochs": target}):
        return f"{reached} ep"
    return f"{reached}/{target:g} ep"


def pivot_cell(
    s: dict[str, Any],
    metric: str,
    ref: RefCell | None,
    bold: bool,
    extras: Sequence[str] = (),
) -> str:
    """e.g. '78.12 ± 0.40 (n=3, 1.0/50 ep, diverged in 1/3) · seed 88.42'."""
    # n = the accuracies averaged (a completed run without one does not count)
    m, sd, n = s[f"{metric}_acc_mean"], s[f"{metric}_acc_std"], s[f"{metric}_acc_n"]
    if m is None:
        head = "-"
    elif bold:
        head = f"**{m:.2f}** ± {(sd or 0.0):.2f}"
    else:
        head = plus_minus(m, sd)
    notes = [f"n={n}"]
    budget = budget_text(s, s.get("target_epochs"))
    if budget:
        notes.append(budget)
    if s["n_diverged"]:
        notes.append(f"diverged in {s['n_diverged']}/{n}")
    if s["n_failed"]:
        notes.append(f"{s['n_failed']} failed")
    if s.get("n_skipped_rounds"):
        notes.append(f"{s['n_skipped_rounds']} rounds skipped")
    notes.extend(extras)
    text = f"{head} ({', '.join(notes)})"
    if ref is not None:
        text += f" · seed {ref.accuracy_pct:.2f}"
    return text


def pivot_tables(
    groups: Sequence[Group],
    stats: Sequence[dict[str, Any]],
    metric: str,
    refs: dict[CellKey, RefCell] | None = None,
    ref_name: str = "",
) -> list[str]:
    """Strategy columns x (attack, fraction) rows, like the seed's Table 2.

    Other strategy keys that take one value per cell (e.g. strategy.block.beta, which differs
    by row in Table 2) are shown inside the cell instead of splitting the column, and a
    num_rounds that differs between cells does not split the table (the cell shows the epochs
    reached)."""
    refs = refs or {}
    keys = list(groups[0].setting) if groups else []
    varying = varying_keys(groups)
    row_keys = [k for k in keys if is_attack_key(k)]
    strategy_keys = [k for k in varying if is_strategy_key(k)]
    col_keys = ["strategy"] if "strategy" in keys else strategy_keys
    folded = [k for k in strategy_keys if k not in col_keys]
    budget_keys = [k for k in varying if k in BUDGET_KEYS]  # the cell shows the epochs reached
    section_keys = [
        k
        for k in varying
        if not is_strategy_key(k) and not is_attack_key(k) and k not in budget_keys
    ]
    if folded or budget_keys:
        per_cell = Counter(
            (key_of(g, section_keys), key_of(g, row_keys), key_of(g, col_keys)) for g in groups
        )
        if any(c > 1 for c in per_cell.values()):  # not one group per cell: split instead
            col_keys, folded = col_keys + folded, []
            section_keys = [k for k in varying if k in section_keys or k in budget_keys]
    if len(groups) < 2 or not col_keys or not row_keys:
        return []
    cell_text = "measured mean ± sample std over seeds (n = completed runs, epochs reached"
    if refs:
        cell_text += f") · seed = the reference's number ({ref_name})"
    else:
        cell_text += ")"
    out: list[str] = [
        f"## Test accuracy (%) by strategy and corruption ({metric}, mean ± std over seeds)",
        "",
        f"Cell: {cell_text}.",
        "",
    ]
    indexed = list(zip(groups, stats))
    for section in in_order(key_of(g, section_keys) for g in groups):
        members = [(g, s) for g, s in indexed if key_of(g, section_keys) == section]
        if section_keys:
            out += [f"### {setting_label(dict(zip(section_keys, section)), section_keys)}", ""]
        cols = in_order(key_of(g, col_keys) for g, _ in members)
        rows = in_order(key_of(g, row_keys) for g, _ in members)
        cell: dict[tuple[Any, Any], tuple[Group, dict[str, Any]]] = {
            (key_of(g, row_keys), key_of(g, col_keys)): (g, s) for g, s in members
        }
        header = [*row_keys, *(" / ".join(fmt_value(v) for v in c) for c in cols)]
        body: list[list[str]] = []
        seen = dict.fromkeys(("reduced", "diverged", "failed", "noref", "nodata"), False)
        for rk in rows:
            means = [cell[(rk, c)][1].get(f"{metric}_acc_mean") for c in cols if (rk, c) in cell]
            best = max((m for m in means if m is not None), default=None)
            line = [fmt_value(v) for v in rk]
            for c in cols:
                if (rk, c) not in cell:
                    # a strategy/attack pair the sweep did not run: show the reference anyway
                    rs = dict(zip(row_keys, rk))
                    frac = rs.get("attack.fraction", rs.get("fraction"))
                    cs = dict(zip(col_keys, c))
                    ref = None
                    if "strategy" in cs and "attack" in rs:
                        ref = refs.get(cell_key(cs["strategy"], rs["attack"], num(frac)))
                    line.append(
                        "not run" if ref is None else f"not run · seed {ref.accuracy_pct:.2f}"
                    )
                    continue
                g, s = cell[(rk, c)]
                ck = group_cell_key(g)
                ref = refs.get(ck) if ck is not None else None
                m = s[f"{metric}_acc_mean"]
                extras = [
                    f"{k.rsplit('.', 1)[-1]}={fmt_value(g.setting.get(k))}"
                    for k in folded
                    if g.setting.get(k) is not None
                ]
                bold = m is not None and m == best and len(cols) > 1
                line.append(pivot_cell(s, metric, ref, bold, extras))
                seen["reduced"] |= is_reduced(s)
                seen["diverged"] |= bool(s["n_diverged"])
                seen["failed"] |= bool(s["n_failed"])
                seen["noref"] |= bool(refs) and ref is None
                seen["nodata"] |= m is None
            body.append(line)
        out += [*md_table(header, body), ""]
        legend = []
        if seen["reduced"]:
            legend.append(
                "- **`a/b ep` = reduced budget**: the runs reached a epochs where the reference "
                "trained b; their accuracy is not comparable with the seed's number."
            )
        if seen["diverged"]:
            legend.append(
                "- `diverged in k/n`: the global model of k of the n runs became non-finite "
                "(summary `diverged_at`); such runs end near chance (~10 %) and are included in "
                "the mean."
            )
        if seen["failed"]:
            legend.append("- `f failed`: crashed runs, not averaged (see Failed runs).")
        if seen["noref"]:
            legend.append(
                "- no `seed` part: the reference has no number for the cell (the seed's Table 2 "
                "shows `-` where training diverged)."
            )
        if seen["nodata"]:
            legend.append("- `-`: no completed run with an accuracy.")
        out += [*legend, ""]
    return out


CSV_STATS = (
    "n_runs",
    "n_completed",
    "n_failed",
    "n_diverged",
    "seeds",
    "final_acc_mean",
    "final_acc_std",
    "best_acc_mean",
    "best_acc_std",
    "wall_time_s_mean",
    "wall_time_s_std",
    "agg_time_s_mean",
    "agg_time_s_std",
    "rounds_mean",
    "epochs_min",
    "epochs_max",
    "ref_accuracy_pct",
    "ref_std_pct",
    "ref_epochs",
    "target_epochs",
    "reduced_budget",
)

TIMING_CSV = (
    "n_completed",
    "timing_rounds",
    "client_ms_median",
    "comm_ms_median",
    "agg_ms_median",
    "round_ms_median",
    "client_agg_ms_median",
    "agg_speedup_vs_gm",
    "round_speedup_vs_gm",
    "client_agg_speedup_vs_gm",
)


def write_csv(
    path: Path, groups: Sequence[Group], stats: Sequence[dict[str, Any]], columns: Sequence[str]
) -> None:
    keys = list(groups[0].setting) if groups else []
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([*keys, *columns])
        for g, s in zip(groups, stats):
            w.writerow(
                [
                    *(
                        "" if g.setting.get(k) is None else fmt_value(g.setting.get(k))
                        for k in keys
                    ),
                    *("" if s.get(c) is None else s[c] for c in columns),
                ]
            )


def timing_section(
    groups: Sequence[Group], stats: list[dict[str, Any]], shown: Sequence[str]
) -> list[str]:
    """Median per-round times per setting and the GMD/BGMD speed-ups; fills the speed-up
    fields of the BGMD rows in ``stats`` (for timing.csv)."""
    md = [
        "## Time per round (median over rounds ≥ 1 of the completed runs, ms)",
        "",
    ]
    if not any(s["timing_rounds"] for s in stats):
        fused = any(is_fused(r) for g in groups for r in g.completed)
        return [
            *md,
            "Skipped: fused runs (hydra/launcher=fused) share one computation; their time "
            "columns are the group's, not their strategy's (docs/fused.md)."
            if fused
            else "Skipped: no run logs client_time_s, comm_time_s, agg_time_s or round_time_s.",
            "",
        ]
    header = [*shown, "n", "rounds", "client", "comm", "agg", "round", "client+agg"]
    body = [
        [
            *(fmt_value(g.setting.get(k)) for k in shown),
            str(s["n_completed"]),
            str(s["timing_rounds"]),
            *(
                ms(s[f"{name}_ms_median"])
                for name in ("client", "comm", "agg", "round", "client_agg")
            ),
        ]
        for g, s in zip(groups, stats)
    ]
    md += [*md_table(header, body), ""]
    md += [
        "client = local training of all clients (summed as logged), comm = serialisation/transport, "
        "agg = aggregation incl. block selection, round = whole round incl. evaluation rounds; "
        "client+agg = gradient + aggregation time, what the seed's speed-up claim counts.",
        "",
        f"### Speed-up of BGMD over GMD (`{GMD_STRATEGY}` / `{BGMD_STRATEGY}` median time per "
        "round; > 1: BGMD faster)",
        "",
    ]
    pairs = speedups(groups, stats)
    if not pairs:
        return [
            *md,
            f"No setting has both `{BGMD_STRATEGY}` and `{GMD_STRATEGY}` runs: no speed-up ratios.",
            "",
        ]
    ctx_keys = [k for k in pairs[0][0] if k in shown]
    strat_extra = [k for k in shown if is_strategy_key(k) and k != "strategy"]
    rows = []
    per_bgmd: Counter[int] = Counter(i for _, i, _, _ in pairs)
    for ctx, i, _j, ratios in pairs:
        bg = groups[i]
        rows.append(
            [
                setting_label(ctx, ctx_keys) or "all runs",
                setting_label(bg.setting, strat_extra) or BGMD_STRATEGY,
                ratio(ratios["agg"]),
                ratio(ratios["round"]),
                ratio(ratios["client_agg"]),
            ]
        )
        if per_bgmd[i] == 1:  # one GMD to compare with: the CSV row is unambiguous
            for name, v in ratios.items():
                stats[i][f"{name}_speedup_vs_gm"] = v
    md += [*md_table(["setting", "BGMD", "agg", "round", "client+agg"], rows), ""]
    return md


def results_table(
    groups: Sequence[Group], stats: Sequence[dict[str, Any]], shown: Sequence[str]
) -> list[str]:
    """One row per setting: counts, epochs reached, accuracies, wall and aggregation time."""
    header = [
        *shown,
        "n",
        "failed",
        "diverged",
        "epochs",
        "final acc (%)",
        "best acc (%)",
        "wall time (s)",
        "agg/round (ms)",
    ]
    body = []
    for g, s in zip(groups, stats):
        agg_m = None if s["agg_time_s_mean"] is None else 1e3 * s["agg_time_s_mean"]
        agg_s = None if s["agg_time_s_std"] is None else 1e3 * s["agg_time_s_std"]
        body.append(
            [
                *(fmt_value(g.setting.get(k)) for k in shown),
                str(s["n_completed"]),
                str(s["n_failed"]),
                str(s["n_diverged"]),
                budget_text(s, None) or "-",
                plus_minus(s["final_acc_mean"], s["final_acc_std"]),
                plus_minus(s["best_acc_mean"], s["best_acc_std"]),
                plus_minus(s["wall_time_s_mean"], s["wall_time_s_std"], 1),
                plus_minus(agg_m, agg_s, 2),
            ]
        )
    return [*md_table(header, body), ""]


def unmatched_reference(refs: dict[CellKey, RefCell], matched: set[CellKey]) -> list[str]:
    """The reference cells no group of the sweep stands for, by corruption."""
    unmatched: dict[tuple[str, float], list[RefCell]] = {}
    for k, r in refs.items():
        if k not in matched:
            unmatched.setdefault(k[1:], []).append(r)
    if not unmatched:
        return []
    n_un = sum(len(v) for v in unmatched.values())
    return [
        f"Reference cells with no run in this sweep ({n_un}):",
        "",
        *(
            f"- {attack} {fraction:g}: "
            + ", ".join(f"{r.strategy} {r.accuracy_pct:.2f} ({r.epochs:g} ep)" for r in cells)
            for (attack, fraction), cells in unmatched.items()
        ),
        "",
    ]


def failed_runs(groups: Sequence[Group], root: Path, shown: Sequence[str]) -> list[str]:
    """The failed runs (not averaged) with the last line of their error."""
    rows = []
    for g in groups:
        for run in g.failed:
            err = str(run.summary.get("error") or "").strip().splitlines()
            msg = (err[-1] if err else "")[:200]
            rows.append(
                [relative(run.path, root), setting_label(g.setting, shown), run.status, msg]
            )
    if not rows:
        return []
    return [
        "## Failed runs (not averaged)",
        "",
        *md_table(["run", "setting", "status", "error"], rows),
        "",
    ]


def unreadable_folders(problems: Sequence[tuple[Path, str]], root: Path) -> list[str]:
    """Folders that hold no readable run (killed runs, damaged files), with the reason."""
    if not problems:
        return []
    return [
        "## Incomplete or unreadable run folders (not counted)",
        "",
        *(f"- `{relative(p, root)}`: {why}" for p, why in problems),
        "",
    ]


def relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)
