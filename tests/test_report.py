"""Reporting layer: run folder writer/readers, per-run plots, sweep report."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import pytest

from fedbgmd.reporting import plots, reference, report, runs, stats, tables
from fedbgmd.reporting.summary import summarize
from fedbgmd.reporting.writer import (
    METRIC_COLUMNS,
    RunFolderInUseError,
    RunWriter,
    read_metrics,
    read_metrics_jsonl,
    read_summary,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# final accuracy per (strategy, attack, fraction) and seed: index = seed
FINAL = {
    ("fedavg", "none", 0.0): [0.88, 0.89, 0.90],
    ("fedbgmd", "none", 0.0): [0.86, 0.88, 0.92],
    ("fedavg", "bit_flip", 0.2): [0.10, 0.12, None],  # seed 2 fails
    ("fedbgmd", "bit_flip", 0.2): [0.80, 0.82, 0.87],
}
ROUNDS = 4


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def _rows_for(final: float, seed: int) -> list[dict[str, Any]]:
    """Accuracy rises linearly to `final` at the last round; eval missing on round 2."""
    rows = []
    for r in range(1, ROUNDS + 1):
        acc = final * r / ROUNDS
        rows.append(
            {
                "round": r,
                "epoch": r * 0.5,
                "test_accuracy": None if r == 2 else acc,
                "test_loss": None if r == 2 else 2.0 - acc,
                "train_loss": 2.1 - acc,
                "agg_time_s": 0.01 * (seed + 1),
                "wall_time_s": 1.5 * r,
                "bytes_up": 1000 * r,
                "agg_iterations": 5,
                "agg_converged": True,
                "memory_norm": 0.5 / r,
                "relative_residual": 0.1 / r,
                "rejections": {"nan": 0, "shape": r % 2},  # extra key -> jsonl only
            }
        )
    return rows


def _make_sweep(root: Path) -> dict[tuple[str, str, float, int], Path]:
    """Hydra-multirun-like layout root/<job>/..., one run per setting and seed."""
    dirs = {}
    job = 0
    for (strategy, attack, fraction), finals in FINAL.items():
        for seed, final in enumerate(finals):
            run_dir = root / str(job)
            job += 1
            w = RunWriter(run_dir)
            setting = {
                "strategy": strategy,
                "attack": attack,
                "attack.fraction": fraction,
                "data": "fashion_mnist",
                "seed": seed,
            }
            base = {"seed": seed, "strategy": strategy, "attack": attack, "fraction": fraction}
            if final is None:
                w.log_round(_rows_for(0.1, seed)[0])
                w.write_summary(
                    {
                        **base,
                        "setting": setting,
                        "status": "failed",
                        "error": "Traceback ...\nRuntimeError: loss is NaN",
                    }
                )
            else:
                for row in _rows_for(final, seed):
                    w.log_round(row)
                w.write_summary({**base, "setting": setting, "byzantine_ids": [0, 3]})
            dirs[(strategy, attack, fraction, seed)] = run_dir
    return dirs


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


# --------------------------------------------------------------------------------------- results


def test_metrics_csv_roundtrip_types(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "run")
    w.log_round(
        {
            "round": 1,
            "test_accuracy": 0.5,
            "test_loss": float("nan"),
            "bytes_up": 123456789012,
            "agg_converged": True,
            "agg_iterations": 7,
            "wall_time_s": 0.25,
            "reasons": {"norm": 2},
        }
    )
    w.log_round({"round": 2, "train_loss": 1.0 / 3.0, "wall_time_s": 0.5})

    csv_path = tmp_path / "run" / "metrics.csv"
    with csv_path.open(newline="") as fh:
        lines = list(csv.reader(fh))
    assert tuple(lines[0]) == METRIC_COLUMNS
    assert len(lines) == 3  # header written once
    assert "reasons" not in lines[0]

    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2
    r1, r2 = rows
    assert r1["round"] == 1 and type(r1["round"]) is int
    assert r1["bytes_up"] == 123456789012 and type(r1["bytes_up"]) is int
    assert r1["agg_converged"] == 1 and r1["agg_iterations"] == 7
    assert r1["test_accuracy"] == 0.5 and type(r1["test_accuracy"]) is float
    assert math.isnan(r1["test_loss"])
    assert r1["train_loss"] is None  # empty cell
    assert r2["train_loss"] == 1.0 / 3.0  # exact float round-trip
    assert r2["test_accuracy"] is None
    assert set(r1) == set(METRIC_COLUMNS)

    jl = read_metrics_jsonl(tmp_path / "run")
    assert jl[0]["reasons"] == {"norm": 2}
    assert jl[0]["test_loss"] is None  # strict JSON: NaN -> null
    assert w.rows()[0]["reasons"] == {"norm": 2}
    assert [r["round"] for r in w.rows()] == [1, 2]


def test_log_round_is_flushed_each_round_and_reopen_appends(tmp_path: Path) -> None:
    run = tmp_path / "run"
    w = RunWriter(run)
    w.log_round({"round": 1, "test_accuracy": 0.3, "wall_time_s": 1.0})
    # readable by another reader right away (no close needed)
    assert [r["test_accuracy"] for r in read_metrics(run)] == [0.3]
    w2 = RunWriter(run, resume=True)  # a resumed run appends
    assert len(w2.rows()) == 1
    w2.log_round({"round": 2, "test_accuracy": 0.4, "wall_time_s": 2.0})
    assert [r["round"] for r in read_metrics(run)] == [1, 2]
    # a partial last line (crash mid-write) is dropped by the reader
    with (run / "metrics.csv").open("a") as fh:
        fh.write("3,1.5,0.")
    assert [r["round"] for r in read_metrics(run)] == [1, 2]


def test_a_new_writer_refuses_a_folder_that_holds_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    RunWriter(run).log_round({"round": 1, "test_accuracy": 0.3})
    before = (run / "metrics.csv").read_bytes()
    with pytest.raises(RunFolderInUseError, match=r"already holds a run \(metrics\.csv\)"):
        RunWriter(run)
    assert (run / "metrics.csv").read_bytes() == before  # nothing appended or rewritten
    # a summary alone (a run that failed before its first round) holds the folder too
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "summary.json").write_text('{"status": "failed"}')
    with pytest.raises(RunFolderInUseError, match=r"summary\.json"):
        RunWriter(tmp_path / "failed")
    # a checkpoint makes the message point at resume
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(RunFolderInUseError, match=r"resume="):
        RunWriter(run)
    # a folder with only config.yaml (written before a run starts) is fresh
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("seed: 0\n")
    RunWriter(tmp_path / "fresh").log_round({"round": 0})
    assert [r["round"] for r in read_metrics(tmp_path / "fresh")] == [0]


def test_wall_time_filled_when_missing(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    w.log_round({"round": 1})
    wall = read_metrics(tmp_path)[0]["wall_time_s"]
    assert wall is not None and 0.0 <= wall < 60.0


def test_write_summary_atomic_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = RunWriter(tmp_path)
    for row in _rows_for(0.8, 0):
        w.log_round(row)
    w.write_summary({"seed": 0, "byzantine_ids": [1, 2], "final_loss": float("inf")})
    s = read_summary(tmp_path)
    assert s["status"] == "completed" and s["error"] is None
    assert s["final_accuracy"] == pytest.approx(0.8)
    assert s["rounds"] == ROUNDS
    assert s["byzantine_ids"] == [1, 2]
    assert s["final_loss"] is None  # non-finite -> null (strict JSON)
    assert s["started_at"] <= s["finished_at"]
    json.loads((tmp_path / "summary.json").read_text())  # strict JSON parses
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # a crash during the write leaves the previous summary intact and no temp file behind
    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        w.write_summary({"status": "failed", "error": "x"})
    assert read_summary(tmp_path)["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.csv",
        "metrics.jsonl",
        "summary.json",
    ]


def test_summarize_known_numbers_with_empty_cells() -> None:
    rows: list[dict[str, Any]] = [
        {"round": 0, "test_accuracy": 0.10, "test_loss": 2.3, "wall_time_s": 0.0},
        {"round": 1, "test_accuracy": 0.55, "test_loss": 1.2, "wall_time_s": 2.0},
        {"round": 2, "test_accuracy": 0.70, "test_loss": 0.9, "wall_time_s": 4.5},
        {"round": 3, "test_accuracy": None, "test_loss": None, "wall_time_s": 6.0},
        {"round": 4, "test_accuracy": 0.65, "test_loss": 1.0, "wall_time_s": 8.25},
        {"round": 5, "test_accuracy": float("nan"), "test_loss": None, "wall_time_s": None},
    ]
    s = summarize(rows)
    assert s == {
        "final_accuracy": 0.65,
        "best_accuracy": 0.70,
        "best_round": 2,
        "final_loss": 1.0,
        "rounds": 5,
        "wall_time_s": 8.25,
        "skipped_rounds": 0,
        "first_skip_reason": None,
    }
    # a diverged model: the final evaluation's loss is NaN, not the older finite 2.3
    diverged = summarize(
        [
            {"round": 0, "test_accuracy": 0.08, "test_loss": 2.3},
            {"round": 7, "test_accuracy": 0.10, "test_loss": float("nan")},
        ]
    )
    assert diverged["final_accuracy"] == 0.10 and diverged["final_loss"] is None
    empty = summarize([])
    assert empty["final_accuracy"] is None and empty["best_round"] is None
    assert empty["rounds"] == 0


# ----------------------------------------------------------------------------------------- plots


def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    w = RunWriter(tmp_path)
    for row in _rows_for(0.9, 0):
        w.log_round(row)
    paths = plots.plot_run(tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "loss.png", "diagnostics.png"]
    assert all(_is_png(p) and p.parent == tmp_path for p in paths)


def test_plot_run_copes_with_empty_diagnostic_columns(tmp_path: Path) -> None:
    w = RunWriter(tmp_path / "a")
    for r in range(1, 4):
        w.log_round({"round": r, "test_accuracy": 0.2 * r, "wall_time_s": float(r)})
    paths = plots.plot_run(tmp_path / "a")
    assert all(_is_png(p) for p in paths)
    # no rows at all: still placeholders, no exception
    RunWriter(tmp_path / "b")
    assert all(_is_png(p) for p in plots.plot_run(tmp_path / "b"))


# ---------------------------------------------------------------------------------------- report


def test_build_report_mean_std_and_outputs(tmp_path: Path) -> None:
    root = tmp_path / "multirun"
    _make_sweep(root)
    before = _snapshot(root)

    md_path = report.build_report(root)

    assert md_path == root / "report" / "report.md"
    after = _snapshot(root)
    # runs untouched; the only new files are the report's
    assert {k: v for k, v in after.items() if not k.startswith("report/")} == before
    assert sorted(k for k in after if k.startswith("report/")) == [
        "report/compare_accuracy_epoch.png",
        "report/compare_accuracy_round.png",
        "report/compare_accuracy_time.png",
        "report/report.csv",
        "report/report.md",
        "report/residual_epoch.png",
        "report/timing.csv",
    ]
    out = root / "report"
    assert _is_png(out / "compare_accuracy_round.png")
    assert _is_png(out / "compare_accuracy_time.png")
    md = md_path.read_text()

    # known group fedbgmd / bit_flip / 0.2, seeds 0..2 -> computed by hand
    finals = [80.0, 82.0, 87.0]
    mean, std = statistics.mean(finals), statistics.stdev(finals)
    assert (mean, round(std, 2)) == (83.0, 3.61)
    assert "83.00 ± 3.61" in md

    with (out / "report.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4  # one per setting
    assert "seed" not in rows[0]
    row = next(r for r in rows if r["strategy"] == "fedbgmd" and r["attack"] == "bit_flip")
    assert float(row["final_acc_mean"]) == pytest.approx(mean)
    assert float(row["final_acc_std"]) == pytest.approx(std)
    assert int(row["n_completed"]) == 3 and int(row["n_failed"]) == 0
    # best == final here (accuracy increases every evaluated round)
    assert float(row["best_acc_mean"]) == pytest.approx(mean)
    assert float(row["wall_time_s_mean"]) == pytest.approx(1.5 * ROUNDS)
    # mean agg time per round: 0.01, 0.02, 0.03 s for seeds 0, 1, 2
    assert float(row["agg_time_s_mean"]) == pytest.approx(0.02)
    assert float(row["agg_time_s_std"]) == pytest.approx(0.01)

    # Table-2-like pivot: rows attack+fraction, columns strategy
    assert "by strategy and corruption" in md
    pivot = md.split("by strategy and corruption", 1)[1]
    header = next(line for line in pivot.splitlines() if line.startswith("| attack"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "attack",
        "attack.fraction",
        "fedavg",
        "fedbgmd",
    ]
    clean_line = next(line for line in pivot.splitlines() if line.startswith("| none"))
    assert "**89.00** ± 1.00" in clean_line  # fedavg wins the clean row (bold)
    assert "88.67 ± 3.06" in clean_line  # fedbgmd: 86, 88, 92 (not bold)
    assert "**88.67**" not in clean_line


def test_build_report_excludes_and_lists_failed_runs(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    dirs = _make_sweep(root)
    out = tmp_path / "elsewhere"
    md = report.build_report(root, out_dir=out).read_text()
    assert not (root / "report").exists()  # --out respected

    with (out / "report.csv").open(newline="") as fh:
        row = next(
            r for r in csv.DictReader(fh) if r["strategy"] == "fedavg" and r["attack"] == "bit_flip"
        )
    assert int(row["n_runs"]) == 3
    assert int(row["n_failed"]) == 1 and int(row["n_completed"]) == 2
    # mean of the two completed seeds only (10 %, 12 %)
    assert float(row["final_acc_mean"]) == pytest.approx(11.0)
    assert float(row["final_acc_std"]) == pytest.approx(statistics.stdev([10.0, 12.0]))
    assert "11.00 ± 1.41" in md

    failed_section = md.split("## Failed runs", 1)[1]
    failed_dir = dirs[("fedavg", "bit_flip", 0.2, 2)]
    assert str(failed_dir.relative_to(root)) in failed_section
    assert "RuntimeError: loss is NaN" in failed_section
    assert "1 failed" in md


def test_single_seed_shows_zero_std_and_group_by(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    _make_sweep(root)
    md = report.build_report(root, group_by=["strategy"]).read_text()
    with (root / "report" / "report.csv").open(newline="") as fh:
        rows = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"fedavg", "fedbgmd"}
    assert int(rows["fedbgmd"]["n_completed"]) == 6
    assert "by strategy and corruption" not in md  # no attack key in the grouping

    single = tmp_path / "single"
    w = RunWriter(single / "0")
    w.log_round({"round": 1, "test_accuracy": 0.5, "wall_time_s": 1.0})
    w.write_summary({"seed": 0, "setting": {"strategy": "fedbgmd", "seed": 0}})
    text = report.build_report(single).read_text()
    assert "50.00 ± 0.00" in text


def test_main_no_runs_returns_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no runs found" in err and str(tmp_path / "empty") in err
    assert not (tmp_path / "empty" / "report").exists()
    assert report.main([str(tmp_path / "missing")]) == 1
    assert "no runs found" in capsys.readouterr().err


def test_main_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "sweep"
    _make_sweep(root)
    out = tmp_path / "out"
    rc = report.main(
        [
            str(root),
            "--out",
            str(out),
            "--metric",
            "best",
            "--group-by",
            "strategy,attack,attack.fraction",
        ]
    )
    assert rc == 0
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "(best, mean ± std over seeds)" in md
    assert (out / "report.csv").is_file()


def test_identical_runs_in_one_group_are_counted_once(tmp_path: Path) -> None:
    for job, acc in ((0, 0.5), (1, 0.5), (2, 0.7)):
        w = RunWriter(tmp_path / str(job))
        w.log_round({"round": 1, "test_accuracy": acc})
        seed = 0 if job < 2 else 1  # jobs 0 and 1: the same setting and seed (a repeated run)
        w.write_summary({"seed": seed, "setting": {"strategy": "gm", "attack": "none"}})
    group = runs.group_runs(runs.collect_runs(tmp_path)[0])[0]
    assert len(group.runs) == 3 and len(group.completed) == 2
    assert stats.mean_std(r.summary["final_accuracy"] for r in group.completed)[0] == pytest.approx(
        0.6
    )


def test_old_runs_get_missing_setting_keys_from_their_config(tmp_path: Path) -> None:
    """Runs written before selector/memory/attack params were setting keys: read from config."""

    def config(memory: str, scale: float) -> dict[str, Any]:
        return {
            "strategy": {"block": {"enabled": True, "selector": "sample", "memory": memory}},
            "attack": {"name": "bit_flip", "params": {"scale": scale}},
        }

    old = {"strategy": "fedbgmd", "attack": "bit_flip", "attack.fraction": 0.2}
    for job, (memory, scale) in enumerate([("mean", 100.0), ("per_client", 100.0)]):
        w = RunWriter(tmp_path / str(job))
        w.log_round({"round": 1, "test_accuracy": 0.5 + 0.1 * job})
        w.write_summary({"seed": 0, "setting": dict(old), "config": config(memory, scale)})
    # a newer run of the per_client setting records the keys itself: it joins that group
    w = RunWriter(tmp_path / "2")
    w.log_round({"round": 1, "test_accuracy": 0.8})
    new = dict(old, **{"strategy.block.selector": "sample", "strategy.block.memory": "per_client"})
    new["attack.params"] = {"scale": 100.0}
    w.write_summary({"seed": 1, "setting": new})
    groups = runs.group_runs(runs.collect_runs(tmp_path)[0])
    by_memory = {g.setting["strategy.block.memory"]: len(g.runs) for g in groups}
    assert by_memory == {"mean": 1, "per_client": 2}  # same seed 0, different memory: not merged
    assert all(g.setting["attack.params"] == {"scale": 100.0} for g in groups)


# ------------------------------------------------------------------------- Table 2 reproduction

REFERENCE_CSV = Path(__file__).resolve().parents[1] / "benchmarks" / "table2_reference.csv"
RPE = 4  # rounds per epoch in the fake Table-2 runs


def _t2_run(
    run_dir: Path,
    strategy: str,
    attack: str,
    fraction: float,
    seed: int,
    final: float,
    *,
    beta: float | None = None,
    epochs: float = 1.0,
    diverged: bool = False,
    agg_ms: float = 2.0,
    client_ms: float = 6.0,
    round_ms: float = 10.0,
    residual: float | None = None,
) -> None:
    """One run laid out like the server's: round 0 = initial evaluation, one evaluation per epoch,
    per-round timing columns (the first round 50x slower: a warm-up the median must ignore) and,
    for block strategies, relative_residual."""
    w = RunWriter(run_dir)
    n_rounds = round(epochs * RPE)
    for r in range(n_rounds + 1):
        evaluated = r % RPE == 0 or r == n_rounds
        slow = 50.0 if r == 1 else 1.0
        w.log_round(
            {
                "round": r,
                "epoch": r / RPE,
                "test_accuracy": (final if r == n_rounds else 0.1) if evaluated else None,
                "round_time_s": (0.5 if r == 0 else slow * round_ms / 1e3),
                "client_time_s": None if r == 0 else slow * client_ms / 1e3,
                "comm_time_s": None if r == 0 else 0.0001,
                "agg_time_s": None if r == 0 else slow * agg_ms / 1e3,
                "wall_time_s": 0.01 * r,
                "relative_residual": None if residual is None or r == 0 else residual + 0.01 * r,
            }
        )
    setting = {
        "strategy": strategy,
        "attack": attack,
        "attack.fraction": fraction,
        "data": "fashion_mnist",
        "model": "cnn",
        "strategy.block.beta": beta,
        "num_clients": 32,
        "num_rounds": n_rounds,
    }
    w.write_summary(
        {
            "seed": seed,
            "strategy": strategy,
            "attack": attack,
            "fraction": fraction,
            "setting": setting,
            "diverged_at": 2 if diverged else None,
        }
    )


# (row folder, attack, fraction, BGMD beta) x strategy -> final accuracy per seed 0, 1, 2
T2_ROWS = {
    ("clean", "none", 0.0, 0.05): {
        "fedavg": [0.88, 0.89, 0.90],
        "cm": [0.80, 0.81, 0.82],
        "fedbgmd": [0.87, 0.88, 0.89],
        "gm": [0.86, 0.87, 0.88],
    },
    ("bitflip20", "bit_flip", 0.2, 0.1): {
        "fedavg": [0.10, 0.10, 0.10],  # diverges in every seed
        "cm": [0.70, 0.72, 0.74],
        "fedbgmd": [0.78, 0.79, 0.80],
        "gm": [0.76, 0.77, 0.81],
    },
}


def _make_table2_sweep(root: Path, epochs: float = 1.0, residual: bool = True) -> None:
    """benchmarks/table2.sh layout: root/<row>/<job>/ with 4 strategies x 3 seeds per row;
    BGMD aggregates in 2 ms, GMD in 3.5 ms, rounds take 10 ms and 12 ms (medians)."""
    for (row, attack, fraction, beta), finals in T2_ROWS.items():
        job = 0
        for strategy, accs in finals.items():
            for seed, final in enumerate(accs):
                is_bgmd = strategy == "fedbgmd"
                _t2_run(
                    root / row / str(job),
                    strategy,
                    attack,
                    fraction,
                    seed,
                    final,
                    beta=beta if is_bgmd else None,
                    epochs=epochs,
                    diverged=strategy == "fedavg" and attack != "none",
                    agg_ms={"fedbgmd": 2.0, "gm": 3.5}.get(strategy, 1.0),
                    round_ms={"fedbgmd": 10.0, "gm": 12.0}.get(strategy, 9.0),
                    residual=0.5 + 0.1 * seed if is_bgmd and residual else None,
                )
                job += 1


def _pivot_rows(md: str) -> dict[str, dict[str, str]]:
    """Pivot table of report.md as {attack: {column: cell}}."""
    pivot = md.split("by strategy and corruption", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in pivot.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header, cells))
    return out


def test_table2_cells_with_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "t2"
    _make_table2_sweep(root)
    assert report.main([str(root), "--reference", str(REFERENCE_CSV)]) == 0
    md = (root / "report" / "report.md").read_text()
    rows = _pivot_rows(md)
    # strategy columns only: beta (0.05 clean, 0.1 bit flip) goes into the BGMD cells
    assert list(rows["bit_flip"]) == ["attack", "attack.fraction", "cm", "fedavg", "fedbgmd", "gm"]
    # fedbgmd / bit_flip 20 %: 78, 79, 80 -> 79.00 ± 1.00, best of the row (bold), 1 of 50 epochs
    assert rows["bit_flip"]["fedbgmd"] == (
        "**79.00** ± 1.00 (n=3, 1.0/50 ep, beta=0.1) · seed 88.42"
    )
    # gm: 76, 77, 81 -> mean 78, sample std sqrt(7) = 2.65
    assert statistics.stdev([76.0, 77.0, 81.0]) == pytest.approx(2.6458, abs=1e-4)
    assert rows["bit_flip"]["gm"] == "78.00 ± 2.65 (n=3, 1.0/50 ep) · seed 88.07"
    assert rows["none"]["fedavg"] == "**89.00** ± 1.00 (n=3, 1.0/50 ep) · seed 89.39"
    assert rows["none"]["fedbgmd"] == "88.00 ± 1.00 (n=3, 1.0/50 ep, beta=0.05) · seed 89.25"
    # SGD under bit flips: the seed has no number (diverged), our runs diverged too; the budget
    # is still held to the row's 50 epochs
    assert rows["bit_flip"]["fedavg"] == "10.00 ± 0.00 (n=3, 1.0/50 ep, diverged in 3/3)"
    assert "reduced budget" in md and "`diverged in k/n`" in md
    assert "(37 cells, 7 matched by this sweep)" in md
    assert "- backdoor 0.4: fedavg 73.01 (50 ep), cm 60.85 (50 ep)" in md

    with (root / "report" / "report.csv").open(newline="") as fh:
        csv_rows = {(r["strategy"], r["attack"]): r for r in csv.DictReader(fh)}
    bg = csv_rows[("fedbgmd", "bit_flip")]
    assert float(bg["ref_accuracy_pct"]) == 88.42 and float(bg["ref_std_pct"]) == 0.16
    assert float(bg["ref_epochs"]) == 50 and bg["reduced_budget"] == "1"
    assert float(bg["epochs_min"]) == float(bg["epochs_max"]) == 1.0
    sgd = csv_rows[("fedavg", "bit_flip")]
    assert sgd["ref_accuracy_pct"] == "" and sgd["n_diverged"] == "3"
    assert csv_rows[("fedavg", "none")]["n_diverged"] == "0"


def test_table2_full_budget_is_not_marked_reduced(tmp_path: Path) -> None:
    ref = tmp_path / "ref.csv"
    ref.write_text("strategy,attack,fraction,accuracy_pct,epochs\nfedbgmd,bit_flip,0.2,88.42,2\n")
    root = tmp_path / "t2"
    _make_table2_sweep(root, epochs=2.0)
    md = report.build_report(root, reference=ref).read_text()
    rows = _pivot_rows(md)
    assert rows["bit_flip"]["fedbgmd"] == "**79.00** ± 1.00 (n=3, 2.0 ep, beta=0.1) · seed 88.42"
    assert rows["bit_flip"]["cm"] == "72.00 ± 2.00 (n=3, 2.0 ep)"  # no reference for the cell
    assert "/2 ep" not in md and "reduced budget" not in md
    # without --reference: budget shown, no seed part
    md = report.build_report(root, out_dir=tmp_path / "plain").read_text()
    assert _pivot_rows(md)["bit_flip"]["fedbgmd"] == "**79.00** ± 1.00 (n=3, 2.0 ep, beta=0.1)"
    assert "· seed" not in md


def test_timing_medians_and_bgmd_speedup(tmp_path: Path) -> None:
    root = tmp_path / "t2"
    _make_table2_sweep(root)
    md = report.build_report(root).read_text()
    with (root / "report" / "timing.csv").open(newline="") as fh:
        rows = {(r["strategy"], r["attack"]): r for r in csv.DictReader(fh)}
    bg, gm = rows[("fedbgmd", "bit_flip")], rows[("gm", "bit_flip")]
    # medians: the 50x slower first round and round 0 (evaluation only, 0.5 s) do not count
    assert float(bg["agg_ms_median"]) == pytest.approx(2.0)
    assert float(bg["round_ms_median"]) == pytest.approx(10.0)
    assert float(bg["client_ms_median"]) == pytest.approx(6.0)
    assert float(bg["comm_ms_median"]) == pytest.approx(0.1)
    assert float(bg["client_agg_ms_median"]) == pytest.approx(8.0)
    assert int(bg["timing_rounds"]) == 3 * RPE
    assert float(gm["agg_ms_median"]) == pytest.approx(3.5)
    assert float(bg["agg_speedup_vs_gm"]) == pytest.approx(3.5 / 2.0)
    assert float(bg["round_speedup_vs_gm"]) == pytest.approx(12.0 / 10.0)
    assert float(bg["client_agg_speedup_vs_gm"]) == pytest.approx(9.5 / 8.0)
    assert gm["agg_speedup_vs_gm"] == "" and rows[("cm", "none")]["agg_speedup_vs_gm"] == ""

    timing = md.split("## Time per round", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in timing.splitlines() if x.startswith("| attack=bit_flip"))
    assert [c.strip() for c in line.strip("|").split("|")] == [
        "attack=bit_flip, attack.fraction=0.2",
        "strategy.block.beta=0.1",
        "1.75×",
        "1.20×",
        "1.19×",
    ]
    bg_line = next(x for x in timing.splitlines() if x.startswith("| fedbgmd | 0.1 |"))
    assert "| 2.00 | 10.00 | 8.00 |" in bg_line


def test_speedup_needs_both_strategies_and_timing_columns(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    _make_sweep(root)  # fedavg and fedbgmd only, no round/client times
    md = report.build_report(root).read_text()
    assert "No setting has both `fedbgmd` and `gm` runs" in md
    # a sweep without any timing column: the table is skipped with a line
    for job, strategy in enumerate(("fedbgmd", "gm")):
        w = RunWriter(tmp_path / "bare" / str(job))
        w.log_round({"round": 1, "test_accuracy": 0.5, "wall_time_s": 1.0})
        w.write_summary({"seed": 0, "setting": {"strategy": strategy, "attack": "none"}})
    md = report.build_report(tmp_path / "bare").read_text()
    assert "Skipped: no run logs client_time_s" in md


def test_residual_plot_only_when_logged(tmp_path: Path) -> None:
    root = tmp_path / "t2"
    _make_table2_sweep(root)
    md = report.build_report(root).read_text()
    assert _is_png(root / "report" / "residual_epoch.png")
    assert "![residual_epoch](residual_epoch.png)" in md
    section = md.split("## Relative residual", 1)[1].split("\n## ", 1)[0]
    # BGMD only (fedavg/cm/gm log no residual); per seed 0.5 + 0.1 s + 0.01 r, rounds 1..4
    lines = [x for x in section.splitlines() if x.startswith("| strategy")]
    assert len(lines) == 2
    bit = next(x for x in lines if "bit_flip" in x)
    # mean over seeds 0.6 (+0.01 r); rounds 1..4 -> 0.625; last round 0.64; 1 - beta = 0.9
    assert [c.strip() for c in bit.strip("|").split("|")][1:] == [
        "3",
        "0.6250",
        "0.6400",
        "0.9000",
    ]

    none = tmp_path / "none"
    _make_table2_sweep(none, residual=False)
    md = report.build_report(none).read_text()
    assert not (none / "report" / "residual_epoch.png").exists()
    assert "Skipped: no run logs relative_residual" in md
    assert "residual_epoch.png)" not in md
    assert _is_png(none / "report" / "compare_accuracy_epoch.png")


def test_reference_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "sweep"
    _make_sweep(root)
    cases = {
        "unknown.csv": (
            "strategy,attack,fraction,accuracy_pct,epochs,dataset\nfedbgmd,none,0,89,50,fmnist\n",
            "unknown column(s) dataset",
        ),
        "missing.csv": ("strategy,attack,accuracy_pct\nfedbgmd,none,89\n", "missing column(s)"),
        "nan.csv": (
            "strategy,attack,fraction,accuracy_pct,epochs\nfedbgmd,none,0,n/a,50\n",
            "nan.csv:2: accuracy_pct='n/a' is not a number",
        ),
        "dup.csv": (
            "strategy,attack,fraction,accuracy_pct,epochs\ngm,none,0,89,50\ngm,none,0.0,88,50\n",
            "duplicate cell",
        ),
        "empty.csv": ("", "is empty"),
        "binary.csv": (b"\xff\xfe\x00garbage", "cannot read reference file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        assert report.main([str(root), "--reference", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)
    assert report.main([str(root), "--reference", str(tmp_path / "absent.csv")]) == 2
    assert "cannot read reference file" in capsys.readouterr().err
    assert not (root / "report").exists()  # nothing written on a bad reference
    with pytest.raises(reference.ReferenceFileError):
        reference.load_reference(tmp_path / "unknown.csv")


def test_shipped_table2_reference() -> None:
    refs = reference.load_reference(REFERENCE_CSV)
    assert len(refs) == 37
    assert {r.epochs for r in refs.values()} == {50.0}
    assert refs[("fedbgmd", "bit_flip", 0.2)].accuracy_pct == 88.42
    assert refs[("gm", "gaussian", 0.4)].accuracy_pct == 83.89
    assert refs[("cm", "feature_noise", 0.4)].accuracy_pct == 78.54
    assert refs[("fedavg", "impulse", 0.2)].std_pct == 6.47
    assert refs[("fedavg", "none", 0.0)].accuracy_pct == 89.39
    # SGD diverged under gradient attacks in the seed ('-'): no number, not invented
    for attack in ("bit_flip", "gaussian", "feature_noise"):
        for fraction in (0.2, 0.4):
            assert ("fedavg", attack, fraction) not in refs
    assert ("fedavg", "impulse", 0.4) not in refs
    assert {r.strategy for r in refs.values()} == {"fedavg", "cm", "fedbgmd", "gm"}


def test_bad_metrics_are_skipped_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    # a run whose metrics.csv has only two columns and a non-numeric cell
    (root / "0").mkdir(parents=True)
    (root / "0" / "metrics.csv").write_text("round,test_accuracy\n1,0.5\n2,oops\n3,0.7\n")
    (root / "0" / "summary.json").write_text(
        json.dumps(
            {"seed": 0, "final_accuracy": "oops", "setting": {"strategy": "gm", "attack": "none"}}
        )
    )
    # an empty metrics.csv, and one that is not text
    for job, data in ((1, b""), (2, b"\xff\xfe\x00\x81 not utf-8")):
        (root / str(job)).mkdir()
        (root / str(job) / "metrics.csv").write_bytes(data)
        (root / str(job) / "summary.json").write_text(
            json.dumps({"seed": job, "setting": {"strategy": "fedbgmd", "attack": "none"}})
        )
    md = report.build_report(root).read_text()
    assert "unreadable metrics.csv" in md
    assert "Skipped: no run logs relative_residual" in md
    assert "Skipped: no run logs client_time_s" in md
    with (root / "report" / "report.csv").open(newline="") as fh:
        rows = {r["strategy"]: r for r in csv.DictReader(fh)}
    assert rows["gm"]["final_acc_mean"] == ""  # non-numeric summary value: missing
    assert rows["gm"]["epochs_min"] == ""  # no epoch column
    assert _is_png(root / "report" / "compare_accuracy_epoch.png")


def test_accuracy_curve_carries_a_diverged_run_forward_and_drops_its_stop_round() -> None:
    """A run that diverged at round 3 (evaluated there, nobody else is) counts with its last value
    at the later rounds, so the curve ends at the table's mean; round 3 is not a point."""

    def run(seed: int, accs: dict[int, float], diverged_at: int | None) -> runs.Run:
        rows = [
            {"round": r, "test_accuracy": a, "epoch": r / 6, "wall_time_s": r}
            for r, a in accs.items()
        ]
        summary = {"seed": seed, "status": "completed", "diverged_at": diverged_at}
        return runs.Run(Path(f"/nonexistent/{seed}"), summary, {"strategy": "fedavg"}, metrics=rows)

    g = runs.Group({"strategy": "fedavg"})
    g.runs = [
        run(0, {0: 0.1, 2: 0.5, 4: 0.7, 6: 0.8}, None),
        run(1, {0: 0.1, 2: 0.6, 4: 0.8, 6: 0.9}, None),
        run(2, {0: 0.1, 2: 0.4, 3: 0.1}, 3),
    ]
    s = stats.series(g, "test_accuracy", stats.pct, carry_diverged=True)
    assert s.rounds.tolist() == [0, 2, 4, 6]
    assert s.n.tolist() == [3, 3, 3, 3]
    assert s.mean.tolist() == pytest.approx([10.0, 50.0, (70 + 80 + 10) / 3, (80 + 90 + 10) / 3])
    assert s.time.tolist() == pytest.approx([0.0, 2.0, 4.0, 6.0])  # carried points add no time
    # without carrying (e.g. the residual), every logged round is a point of its own
    raw = stats.series(g, "test_accuracy", stats.pct)
    assert raw.rounds.tolist() == [0, 2, 3, 4, 6]
    assert raw.mean[2] == pytest.approx(10.0) and raw.n[2] == 1
    # every run diverged: each is carried to the last stopping round, where the curve ends at
    # the mean of their final values (it used to draw each run's stop as a point of n = 1)
    g.runs = [run(0, {0: 0.1, 3: 0.2}, 3), run(1, {0: 0.1, 5: 0.1}, 5)]
    alld = stats.series(g, "test_accuracy", stats.pct, carry_diverged=True)
    assert alld.rounds.tolist() == [0, 5] and alld.n.tolist() == [2, 2]
    assert alld.mean.tolist() == pytest.approx([10.0, 15.0])


def test_accuracy_curve_keeps_the_rounds_every_run_evaluated() -> None:
    # one run evaluated every 2 rounds, one every 3: the mean used to alternate between them
    def run(seed: int, every: int) -> runs.Run:
        rows = [
            {"round": r, "test_accuracy": r / 12, "epoch": r / 6, "wall_time_s": r}
            for r in range(0, 13, every)
        ]
        return runs.Run(Path(f"/x/{seed}"), {"seed": seed}, {"strategy": "gm"}, metrics=rows)

    g = runs.Group({"strategy": "gm"})
    g.runs = [run(0, 2), run(1, 3)]
    s = stats.series(g, "test_accuracy", stats.pct, carry_diverged=True)
    assert s.rounds.tolist() == [0, 6, 12] and s.n.tolist() == [2, 2, 2]


def test_table2_cell_not_run_says_so_with_or_without_a_seed_number(tmp_path: Path) -> None:
    """A strategy/attack pair without runs reads "not run" (plus the seed's number where the
    reference has one) — never an empty cell that looks like a formatting slip."""
    root = tmp_path / "t2"
    _make_table2_sweep(root)
    for job in (root / "bitflip20").iterdir():  # drop SGD and CMD under bit flips
        if json.loads((job / "summary.json").read_text())["strategy"] in ("fedavg", "cm"):
            for f in job.iterdir():
                f.unlink()
            job.rmdir()
    md = report.build_report(root, reference=REFERENCE_CSV).read_text()
    rows = _pivot_rows(md)
    assert rows["bit_flip"]["fedavg"] == "not run"  # the seed's SGD diverged: no number
    assert rows["bit_flip"]["cm"] == "not run · seed 84.20"


def test_source_commit_names_the_code_and_whether_it_was_modified(tmp_path):
    import shutil
    import subprocess

    from fedbgmd.reporting.summary import environment_versions, source_commit

    assert source_commit(tmp_path) is None  # not a checkout (e.g. an installed wheel)
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
    }

    def run(*a):
        return subprocess.run(
            ["git", "-C", str(tmp_path), *a], check=True, env=env, capture_output=True, text=True
        ).stdout.strip()

    run("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    run("add", "a.py")
    run("commit", "-q", "-m", "c")
    head = run("rev-parse", "HEAD")
    assert source_commit(tmp_path) == head
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert source_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == head + "+dirty"
    assert "fedbgmd_commit" in environment_versions("cpu")


def _sweep_run(root: Path, name: str, seed: int, acc: float, **config_changes: Any) -> Path:
    """A run folder whose config is the smoke preset's with ``config_changes`` (dotted keys)."""
    config: dict[str, Any] = {
        "seed": seed,
        "num_rounds": 2,
        "strategy": {"name": "gm", "block": {"enabled": False}},
        "attack": {"name": "none", "fraction": 0.0},
        "client": {"optimizer": {"lr": 0.01}},
        "data": {"name": "synthetic", "partition": "iid"},
        "engine": {"name": "inprocess", "num_threads": seed + 1},
    }
    for dotted, value in config_changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    d = root / name
    d.mkdir(parents=True)
    summary = {
        "seed": seed,
        "status": "completed",
        "final_accuracy": acc,
        "best_accuracy": acc,
        "strategy": "gm",
        "attack": "none",
        "fraction": 0.0,
        "finished_at": f"2026-01-01T00:00:{seed:02d}",
        "config": config,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.csv").write_text("round,epoch,test_accuracy\n0,0.0,0.1\n2,1.0," + str(acc) + "\n")
    return d


def test_runs_that_differ_in_any_outcome_relevant_config_are_not_merged(tmp_path: Path) -> None:
    # these summaries carry no "setting": they used to be grouped by strategy/attack/fraction
    # only, merged, and the lr=0.1 runs dropped as repeats of the same seeds without a note
    for seed in range(3):
        _sweep_run(tmp_path, f"a{seed}", seed, 0.8)
        _sweep_run(tmp_path, f"b{seed}", seed, 0.3, client__optimizer__lr=0.1)
    found, _ = runs.collect_runs(tmp_path)
    groups = runs.group_runs(found)
    assert len(groups) == 2
    assert sorted(len(g.completed) for g in groups) == [3, 3]
    assert {g.setting["client.optimizer.lr"] for g in groups} == {0.01, 0.1}
    # engine threads differ between seeds too, but do not change what a run learns: no split


def test_repeats_and_retried_failures(tmp_path: Path) -> None:
    for seed in range(3):
        _sweep_run(tmp_path, f"r{seed}", seed, 0.7 + seed / 100)
    # a rerun of seed 0 that finished later replaces the first; a failed try of seed 1 that
    # was rerun (r1) is not a failure of the cell
    late = _sweep_run(tmp_path, "r0-again", 0, 0.9)
    s = json.loads((late / "summary.json").read_text())
    s["finished_at"] = "2026-02-01T00:00:00"
    (late / "summary.json").write_text(json.dumps(s))
    failed = _sweep_run(tmp_path, "r1-crashed", 1, 0.0)
    s = json.loads((failed / "summary.json").read_text())
    s.update(status="failed", final_accuracy=None)
    (failed / "summary.json").write_text(json.dumps(s))
    found, _ = runs.collect_runs(tmp_path)
    (g,) = runs.group_runs(found)
    assert sorted(r.path.name for r in g.completed) == ["r0-again", "r1", "r2"]
    assert g.failed == [] and g.repeats == 2
    s = stats.group_stats(g)
    assert s["final_acc_mean"] == pytest.approx((90 + 71 + 72) / 3)
    report.build_report(tmp_path, out_dir=tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "- runs: 5 (3 completed, 0 failed, 0 diverged, 2 not counted" in text


def test_cell_n_counts_the_accuracies_averaged_and_a_whole_epoch_is_not_reduced() -> None:
    s = {
        "final_acc_mean": 78.91,
        "final_acc_std": 0.83,
        "final_acc_n": 2,  # the third completed run logged no accuracy
        "n_completed": 3,
        "n_diverged": 0,
        "n_failed": 0,
        "epochs_min": 0.9984,  # 117 rounds of 117.1875 per epoch
        "epochs_max": 0.9984,
        "target_epochs": 1.0,
    }
    cell = tables.pivot_cell(s, "final", None, bold=False)
    assert "n=2" in cell and "1.0 ep" in cell and "/1 ep" not in cell
    assert not stats.is_reduced(s)
    assert stats.is_reduced({**s, "target_epochs": 50.0})
    assert not stats.is_reduced({**s, "epochs_min": 49.92, "target_epochs": 50.0})


def test_the_named_setting_and_the_rest_follow_one_rule() -> None:
    # no key that cannot change what a run learns moves either part of the setting; a key
    # that can moves it
    import copy

    from fedbgmd.reporting.setting import NO_OUTCOME_KEYS, outcome_config, setting_from_config

    config: dict[str, Any] = {
        "seed": 1,
        "engine": {"name": "inprocess", "num_threads": 1},
        "device": "cpu",
        "plots": True,
        "progress": True,
        "resume": None,
        "eval_every": 1,
        "checkpoint_every": 0,
        "checkpoint_last": False,
        "eval_batch_size": 256,
        "data": {"name": "synthetic", "root": "data", "download": True},
        "model": {"name": "mlp"},
        "strategy": {
            "name": "fedbgmd",
            "block": {"enabled": True, "beta": 0.1, "selector": "sample", "memory": "per_client"},
        },
        "attack": {"name": "sign_flip", "fraction": 0.2, "params": {"mode": "negate"}},
        "client": {"optimizer": {"lr": 0.1}},
        "num_clients": 5,
        "num_rounds": 3,
    }

    def changed(path: str, value: Any) -> dict[str, Any]:
        out = copy.deepcopy(config)
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[leaf] = value
        return out

    named, rest = setting_from_config(config), outcome_config(config)
    for key in NO_OUTCOME_KEYS:
        other = changed(key, "something else")
        assert setting_from_config(other) == named, key
        assert outcome_config(other) == rest, key
    for key, value in [("strategy.block.beta", 0.3), ("attack.params.mode", "scale")]:
        other = changed(key, value)
        assert setting_from_config(other) != named, key
        assert outcome_config(other) != rest, key
    assert setting_from_config(changed("client.optimizer.lr", 0.05)) == named  # not named,
    assert outcome_config(changed("client.optimizer.lr", 0.05)) != rest  # but a setting key
