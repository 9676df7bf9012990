"""Run output folder: per-round metrics (CSV + JSONL), final summary, and readers.

One run writes one folder, as the run goes::

    run_dir/
      config.yaml      resolved config (written by the caller, not here)
      metrics.csv      one row per round, fixed columns METRIC_COLUMNS, empty cell = missing
      metrics.jsonl    the same rows plus any extra keys (strict JSON: NaN/inf become null)
      summary.json     final summary, written atomically (tmp file + os.replace)

Conventions: accuracies are fractions in [0, 1]; times are seconds; bytes are integers.
Plain python + numpy only: no flwr, hydra or torch imports here.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("fedbgmd")

__all__ = [
    "INT_COLUMNS",
    "METRICS_CSV",
    "METRICS_JSONL",
    "METRIC_COLUMNS",
    "SUMMARY_JSON",
    "RunWriter",
    "atomic_write_text",
    "environment_versions",
    "is_missing",
    "read_metrics",
    "read_metrics_jsonl",
    "read_summary",
    "summarize",
    "utc_now_iso",
    "with_segments",
]

METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_JSON = "summary.json"

METRIC_COLUMNS: tuple[str, ...] = (
    "round",
    "epoch",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "round_time_s",
    "client_time_s",
    "comm_time_s",
    "agg_time_s",
    "eval_time_s",
    "wall_time_s",
    "bytes_up",
    "bytes_down",
    "replies_accepted",
    "replies_rejected",
    "gm_iterations",
    "gm_converged",
    "memory_norm",
    "relative_residual",
)

# Columns read back as int (falling back to float when a cell is not an integer literal, e.g. a
# mean number of GM iterations over blocks). Every other column is read back as float.
# Booleans (e.g. gm_converged=True) are written as 1/0.
INT_COLUMNS: frozenset[str] = frozenset(
    {
        "round",
        "bytes_up",
        "bytes_down",
        "replies_accepted",
        "replies_rejected",
        "gm_iterations",
        "gm_converged",
    }
)


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with seconds precision, e.g. 2024-05-01T12:00:00+00:00."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_missing(value: object) -> bool:
    """True for None, empty strings and non-finite floats (NaN): values summaries skip."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    if isinstance(value, float):
        return math.isnan(value)
    return False


def _to_python(value: object) -> object:
    """Numpy/torch scalars -> python scalars; containers converted recursively."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_python(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _to_python(item())
        except (TypeError, ValueError, RuntimeError):
            pass  # multi-element arrays/tensors
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _to_python(tolist())
    return str(value)


def _json_safe(value: object) -> object:
    """Like _to_python, with non-finite floats replaced by None (strict JSON)."""
    value = _to_python(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _csv_cell(value: object) -> str:
    value = _to_python(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)  # shortest round-trip repr; nan/inf as 'nan'/'inf'
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _parse_cell(column: str, text: str) -> int | float | str | None:
    text = text.strip()
    if text == "":
        return None
    if column in INT_COLUMNS:
        try:
            return int(text)
        except ValueError:
            pass
    try:
        return float(text)
    except ValueError:
        return text  # unknown, non-numeric extra column


def fs_error(err: OSError, operation: str, path: Path) -> OSError:
    """``err`` re-raised with the operation and the path (a write error on an open file names
    neither, e.g. ENOSPC); the errno and the type are kept."""
    return type(err)(err.errno, f"{err.strerror or err} ({operation} {path})")


def atomic_write_text(path: Path, text: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise fs_error(err, "creating a temporary file for", path) from err
    try:
        # mkstemp makes the file 0600; the run's other files follow the umask (usually 0644)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise fs_error(err, "writing", path) from err
        raise


def _append_lines(path: Path, text: str) -> None:
    """Append whole lines with one write(2) on an O_APPEND descriptor: a signal lands before or
    after it, never inside; a short or failed write (a full disk) is cut back to the last whole
    line, so the file never ends in a torn line that a later append would glue onto."""
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise fs_error(err, "opening for append", path) from err
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, os.strerror(28))  # a short write: the disk filled up
        except OSError as err:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise fs_error(err, "appending to", path) from err
    finally:
        os.close(fd)


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-write) from ``path``."""
    with path.open("rb") as fh:
        data = fh.read()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as fh:
        fh.truncate(keep)
    log.warning(
        "%s: dropped a torn last line (%d bytes) left by an interrupted write",
        path,
        len(data) - keep,
    )


def _csv_lines(rows: Sequence[Mapping[str, object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in METRIC_COLUMNS])
    return buf.getvalue()


def _jsonl_lines(rows: Sequence[Mapping[str, object]]) -> str:
    return "".join(json.dumps(_json_safe(r), sort_keys=False) + "\n" for r in rows)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once (at import: no threads yet)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class RunWriter:
    """Writes one run's metrics and summary into ``run_dir`` (and never outside it).

    ``log_round`` appends one row to metrics.csv (known columns, empty cells for missing values)
    and to metrics.jsonl (all keys) and flushes both, so a crash loses at most the round in
    progress. If ``wall_time_s`` is absent from a row it is filled with the seconds elapsed since
    this writer was created. Reopening an existing run folder appends to it (the CSV header must
    match METRIC_COLUMNS).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_csv = self.run_dir / METRICS_CSV
        self.metrics_jsonl = self.run_dir / METRICS_JSONL
        self.summary_json = self.run_dir / SUMMARY_JSON
        self.started_at = utc_now_iso()
        self._t0 = time.monotonic()
        self._rows: list[dict[str, Any]] = []
        if self.metrics_csv.exists() and self.metrics_csv.stat().st_size > 0:
            for path in (self.metrics_csv, self.metrics_jsonl):
                if path.exists():
                    _drop_torn_line(path)
            with self.metrics_csv.open(newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            if tuple(header) != METRIC_COLUMNS:
                raise ValueError(
                    f"{self.metrics_csv} exists with a different header; refusing to append"
                )
            self._rows = (
                read_metrics_jsonl(self.run_dir)
                if self.metrics_jsonl.exists()
                else read_metrics(self.run_dir)
            )
        else:
            atomic_write_text(
                self.metrics_csv, _csv_lines([dict(zip(METRIC_COLUMNS, METRIC_COLUMNS))])
            )

    def log_round(self, row: Mapping[str, object]) -> None:
        """Append one round. Unknown keys go only to metrics.jsonl."""
        self.log_rounds([row])

    def log_rounds(self, rows: Sequence[Mapping[str, object]]) -> None:
        """Append several rounds with one write to each file (a fused sweep logs its jobs' rows
        in batches: one open per row and job cost more than its rounds). Each file gets whole
        lines or nothing (see _append_lines)."""
        cleaned = []
        for row in rows:
            clean: dict[str, Any] = {str(k): _to_python(v) for k, v in row.items()}
            if is_missing(clean.get("wall_time_s")):
                clean["wall_time_s"] = time.monotonic() - self._t0
            ordered = {c: clean.get(c) for c in METRIC_COLUMNS}
            ordered.update({k: v for k, v in clean.items() if k not in ordered})
            cleaned.append(ordered)
        if not cleaned:
            return
        _append_lines(self.metrics_csv, _csv_lines(cleaned))
        _append_lines(self.metrics_jsonl, _jsonl_lines(cleaned))
        self._rows.extend(cleaned)

    def write_summary(self, summary: Mapping[str, object]) -> None:
        """Atomically write summary.json.

        Defaults are filled in and overridden by ``summary``: the ``summarize(self.rows())``
        fields, started_at (writer creation), finished_at (now), status "completed", error None.
        """
        merged: dict[str, Any] = {
            **summarize(self._rows),
            "status": "completed",
            "error": None,
            "started_at": self.started_at,
            "finished_at": utc_now_iso(),
        }
        merged.update({str(k): v for k, v in summary.items()})
        merged.update(completed_status(merged))
        text = json.dumps(_json_safe(merged), indent=2, sort_keys=True) + "\n"
        atomic_write_text(self.summary_json, text)

    def truncate_after(self, last_round: int) -> None:
        """Keep the rows up to ``last_round`` (a resumed run redoes the rounds after its
        checkpoint). Both files are rewritten every time (atomically), so they hold exactly those
        rows whatever an interrupted run left behind."""
        self._rows = [r for r in self._rows if int(r.get("round") or 0) <= last_round]
        header = dict(zip(METRIC_COLUMNS, METRIC_COLUMNS))
        atomic_write_text(self.metrics_csv, _csv_lines([header, *self._rows]))
        atomic_write_text(self.metrics_jsonl, _jsonl_lines(self._rows))

    def rows(self) -> list[dict[str, Any]]:
        """The rows logged so far (copies; all METRIC_COLUMNS keys plus extras)."""
        return [dict(r) for r in self._rows]


def _last(values: Iterable[object]) -> object:
    out: object = None
    for v in values:
        if not is_missing(v):
            out = v
    return out


def summarize(rows: list[dict[str, Any]] | list[Mapping[str, Any]]) -> dict[str, Any]:
    """Final/best accuracy, final loss, rounds and wall time from per-round rows.

    Missing values (None, empty, NaN) are skipped: final_accuracy is the last non-missing
    test_accuracy, final_loss the test_loss of that row (None when not finite), best_round the round of the first maximum, rounds the largest round number
    (number of rows when no row has a round), wall_time_s the last non-missing wall_time_s.
    """
    best_acc: float | None = None
    best_round: int | None = None
    for i, r in enumerate(rows):
        acc = r.get("test_accuracy")
        if is_missing(acc):
            continue
        acc_f = float(acc)  # type: ignore[arg-type]
        if best_acc is None or acc_f > best_acc:
            best_acc = acc_f
            rnd = r.get("round")
            best_round = int(rnd) if not is_missing(rnd) else i + 1  # type: ignore[arg-type]
    final_acc = _last(r.get("test_accuracy") for r in rows)
    # the loss of that same last evaluation: NaN/Inf there (a diverged model) gives None, not an
    # older finite loss
    evaluated = [r for r in rows if not is_missing(r.get("test_accuracy"))]
    final_loss = evaluated[-1].get("test_loss") if evaluated else None
    if final_loss is not None and (is_missing(final_loss) or not math.isfinite(float(final_loss))):
        final_loss = None
    wall = _last(r.get("wall_time_s") for r in rows)
    rounds_seen = [int(r["round"]) for r in rows if not is_missing(r.get("round"))]
    skipped = [r for r in rows if r.get("skipped")]
    return {
        "skipped_rounds": len(skipped),
        "first_skip_reason": str(skipped[0]["skipped"]) if skipped else None,
        "final_accuracy": None if final_acc is None else float(final_acc),  # type: ignore[arg-type]
        "best_accuracy": best_acc,
        "best_round": best_round,
        "final_loss": None if final_loss is None else float(final_loss),  # type: ignore[arg-type]
        "rounds": max(rounds_seen) if rounds_seen else len(rows),
        "wall_time_s": None if wall is None else float(wall),  # type: ignore[arg-type]
    }


def with_segments(
    summary: dict[str, Any], previous: Mapping[str, Any] | None, current: Mapping[str, Any]
) -> dict[str, Any]:
    """Add the run's segments to ``summary`` (a run resumed n times has n + 1 segments).

    ``current`` is this process's segment: started_at, finished_at, status, resumed_after_round
    (None for the first), last_round, wall_time_s. ``previous`` is the summary.json the run
    folder held when this segment began (None for a fresh run); a segment that wrote none
    (killed by SIGKILL) is absent. ``started_at`` becomes the first segment's and
    ``wall_time_s`` the sum over segments.
    """
    prior: list[dict[str, Any]] = []
    if previous:
        prior = [dict(s) for s in previous.get("segments") or []]
        if not prior:  # written before summaries recorded segments
            prior = [
                {
                    "started_at": previous.get("started_at"),
                    "finished_at": previous.get("finished_at"),
                    "status": previous.get("status"),
                    "resumed_after_round": None,
                    "last_round": previous.get("rounds"),
                    "wall_time_s": previous.get("wall_time_s"),
                }
            ]
    segments = [*prior, dict(current)]
    summary["segments"] = segments
    summary["started_at"] = segments[0].get("started_at") or current.get("started_at")
    summary["wall_time_s"] = sum(float(s.get("wall_time_s") or 0.0) for s in segments)
    return summary


def completed_status(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``status``/``error`` of a summary, where a "completed" run none of whose rounds aggregated
    (every one skipped: too few replies, or the aggregator refused each) is a failed run: it
    trained nothing, so its accuracy is the initial model's and must not be reported as a result."""
    status, error = summary.get("status"), summary.get("error")
    rounds, skipped = summary.get("rounds") or 0, summary.get("skipped_rounds") or 0
    if status == "completed" and rounds >= 1 and skipped >= rounds:
        status = "failed"
        error = (
            f"every round was skipped ({skipped}); the first: {summary.get('first_skip_reason')}"
        )
    return {"status": status, "error": error}


def _metrics_path(run_dir: str | Path, name: str) -> Path:
    p = Path(run_dir)
    return p if p.is_file() else p / name


def setting_from_config(config: Mapping[Any, Any]) -> dict[str, Any]:
    """The config choices that define a run, for grouping runs across seeds in reports.

    ``config`` is a resolved config as plain nested dicts (what summary.json keeps under
    ``"config"``), so reports can recompute settings of old runs without Hydra. The block and
    attack keys are what tell the seed's "paper" variant from "as_run" (memory, selector,
    attack scale): runs that differ there are never averaged together or deduplicated as repeats.
    """

    def section(node: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = node.get(key)
        return value if isinstance(value, Mapping) else {}

    strategy, attack = section(config, "strategy"), section(config, "attack")
    block = section(strategy, "block")
    enabled = bool(block.get("enabled"))
    label = attack_label(attack.get("name", "none"), attack.get("target"))
    attacked = label != "none"  # no Byzantine clients without an attack
    targets = plugin_targets(config)
    custom = [f"{role}={targets[role]}" for role in ("strategy", "aggregator") if role in targets]
    return {
        # a user's strategy class or aggregator runs under the preset's name: the label says
        # which code ran, so it is never grouped with (or read as) the built-in
        "strategy": (
            f"{strategy.get('name')}[{', '.join(custom)}]" if custom else strategy.get("name")
        ),
        "attack": label,
        "attack.fraction": float(attack.get("fraction", 0.0)) if attacked else 0.0,
        "data": section(config, "data").get("name"),
        "model": section(config, "model").get("name"),
        "strategy.block.beta": _number(block.get("beta"), float) if enabled else None,
        "strategy.block.selector": str(block.get("selector")) if enabled else None,
        "strategy.block.memory": str(block.get("memory")) if enabled else None,
        "attack.params": dict(sorted(dict(attack.get("params") or {}).items())) if attacked else {},
        "num_clients": _number(config.get("num_clients"), int),
        "num_rounds": _number(config.get("num_rounds"), int),
    }


DEFAULT_STRATEGY_TARGET = "fedbgmd.strategies.RobustStrategy"
# the strategy classes fedbgmd ships (a preset's target is not a user plug-in)
BUILTIN_STRATEGY_TARGETS = frozenset({DEFAULT_STRATEGY_TARGET, "fedbgmd.strategies.FedBGMD"})


def plugin_targets(config: Mapping[Any, Any]) -> dict[str, str]:
    """The user plug-ins a run used, by role (strategy, aggregator, selector, attack): their
    dotted paths. Empty when only built-ins ran."""

    def section(node: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = node.get(key)
        return value if isinstance(value, Mapping) else {}

    strategy = section(config, "strategy")
    found = {
        "strategy": strategy.get("target"),
        "aggregator": section(strategy, "aggregator").get("target"),
        "selector": section(strategy, "block").get("selector"),
        "attack": section(config, "attack").get("target"),
    }
    if found["strategy"] in BUILTIN_STRATEGY_TARGETS:
        found["strategy"] = None
    if "." not in str(found["selector"] or ""):  # a registered name, not a user function
        found["selector"] = None
    return {role: str(path) for role, path in found.items() if path}


def run_labels(config: Mapping[Any, Any]) -> dict[str, Any]:
    """What summary.json says ran (every writer of a summary uses this one function)."""
    setting = setting_from_config(config)
    return {
        "strategy": setting["strategy"],
        "attack": setting["attack"],
        "fraction": setting["attack.fraction"],
        "setting": setting,
        "targets": plugin_targets(config),
        "seed": config.get("seed"),
    }


def write_failure_summary(
    run_dir: str | Path, error: str, config: Mapping[Any, Any], traceback: str | None = None
) -> None:
    """summary.json of a run that failed before its server wrote one (data not loadable, model
    not buildable, ...): status failed, the error and the config, so reports list the run and a
    re-run retries it."""
    summary: dict[str, Any] = {
        **summarize([]),
        **run_labels(config),
        "status": "failed",
        "error": error,
        "started_at": None,
        "finished_at": utc_now_iso(),
        "config": dict(config),
    }
    if traceback:
        summary["traceback"] = traceback
    text = json.dumps(_json_safe(summary), indent=2, sort_keys=True) + "\n"
    atomic_write_text(Path(run_dir) / SUMMARY_JSON, text)


def attack_label(name: Any, target: Any) -> str:
    """The attack a run used: a user class given by ``attack.target`` wins over the registry name
    (it is what gets built), so a target-only attack never reads as the clean run ``"none"``."""
    return str(target) if target else str(name)


def _number(value: Any, kind: Callable[[Any], Any]) -> Any:
    return None if value is None else kind(value)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Parse metrics.csv (a run folder or the file itself) back into typed rows.

    Empty cells -> None; INT_COLUMNS -> int; other columns -> float. A truncated last line
    (crash mid-write) is dropped.
    """
    path = _metrics_path(run_dir, METRICS_CSV)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            return []
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                continue  # partial line from an interrupted write
            rows.append({c: _parse_cell(c, t) for c, t in zip(header, cells)})
    return rows


def read_metrics_jsonl(run_dir: str | Path) -> list[dict[str, Any]]:
    """Parse metrics.jsonl (a run folder or the file itself); unparsable lines are dropped."""
    path = _metrics_path(run_dir, METRICS_JSONL)
    if not path.exists():
        return []
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """Load summary.json (a run folder or the file itself)."""
    with _metrics_path(run_dir, SUMMARY_JSON).open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{run_dir}: summary.json is not a JSON object")
    return data


def _pkg_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def source_commit(root: Path | None = None) -> str | None:
    """The git commit of fedbgmd's source tree (``+dirty`` if tracked files differ from it), or
    None when it is not a git checkout (an installed wheel) or git is unavailable.

    Why: the package version does not change between commits; a run's result must say which code
    produced it.
    """
    root = Path(__file__).resolve().parents[1] if root is None else root
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def environment_versions(device: str | None = None) -> dict[str, str | None]:
    """Versions for summary.json's ``versions`` field, without importing torch or flwr."""
    return {
        "python": sys.version.split()[0],
        "torch": _pkg_version("torch"),
        "flwr": _pkg_version("flwr"),
        "fedbgmd": _pkg_version("fedbgmd"),
        "fedbgmd_commit": source_commit(),
        "numpy": _pkg_version("numpy"),
        "platform": platform.platform(),
        "device": device,
    }
