"""A run's output folder: the file formats, the writer and the readers.

One run writes one folder, as the run goes::

    run_dir/
      config.yaml      resolved config (written by the caller, not here)
      metrics.csv      one row per round, fixed columns METRIC_COLUMNS, empty cell = missing
      metrics.jsonl    the same rows plus any extra keys (strict JSON: NaN/inf become null)
      summary.json     final summary, written atomically (tmp file + os.replace)

A folder that holds a run (metrics.csv or summary.json) is only ever appended to by that run's
resume: :class:`RunWriter` refuses it otherwise (:func:`check_fresh_run_dir`, the one place of
that rule; the CLI asks it before it writes anything).

Conventions: accuracies are fractions in [0, 1]; times are seconds; bytes are integers.
Plain python only: no flwr, hydra or torch imports here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedbgmd.reporting.setting import run_labels
from fedbgmd.reporting.summary import completed_status, is_missing, summarize, utc_now_iso

log = logging.getLogger("fedbgmd")

__all__ = [
    "INT_COLUMNS",
    "METRICS_CSV",
    "METRICS_JSONL",
    "METRIC_COLUMNS",
    "PARTITIONS_JSON",
    "SUMMARY_JSON",
    "RunFolderInUseError",
    "RunWriter",
    "atomic_write_text",
    "check_fresh_run_dir",
    "fs_error",
    "read_metrics",
    "read_metrics_jsonl",
    "read_summary",
    "write_failure_summary",
]

METRICS_CSV = "metrics.csv"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_JSON = "summary.json"
PARTITIONS_JSON = "partitions.json"  # each client's sample count and class histogram
PARTITIONS_JSON = "partitions.json"  # each client's sample count and class histogram

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
    "agg_iterations",
    "agg_converged",
    "memory_norm",
    "relative_residual",
)

# Columns read back as int (falling back to float when a cell is not an integer literal, e.g. a
# mean number of aggregator iterations over blocks). Every other column is read back as float.
# Booleans (e.g. agg_converged=True) are written as 1/0.
INT_COLUMNS: frozenset[str] = frozenset(
    {
        "round",
        "bytes_up",
        "bytes_down",
        "replies_accepted",
        "replies_rejected",
        "agg_iterations",
        "agg_converged",
    }
)


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


# the files whose presence says a folder holds a run (config.yaml alone does not: it is written
# before the run starts)
RUN_FILES: tuple[str, ...] = (METRICS_CSV, SUMMARY_JSON)


class RunFolderInUseError(FileExistsError):
    """A new run was asked to write into a folder that holds another run."""


def check_fresh_run_dir(run_dir: str | Path) -> None:
    """Raise RunFolderInUseError when ``run_dir`` holds a run (RUN_FILES): a new run would append
    its rounds to that run's metrics.csv (resume's mechanism) and its summary would mix both.
    The message says what to do instead (continue it with resume= when it has a checkpoint)."""
    run_dir = Path(run_dir)
    held = [f for f in RUN_FILES if (run_dir / f).exists()]
    if not held:
        return
    resumable = (run_dir / "checkpoint.pt").is_file()
    raise RunFolderInUseError(
        f"{run_dir} already holds a run ({', '.join(held)}); not mixing a new run into it. "
        "Choose another folder (hydra.run.dir / hydra.sweep.dir)"
        + (
            f", move that folder away, or continue it with resume={run_dir}"
            if resumable
            else " or move that folder away"
        )
    )


class RunWriter:
    """Writes one run's metrics and summary into ``run_dir`` (and never outside it).

    ``log_round`` appends one row to metrics.csv (known columns, empty cells for missing values)
    and to metrics.jsonl (all keys) and flushes both, so a crash loses at most the round in
    progress. If ``wall_time_s`` is absent from a row it is filled with the seconds elapsed since
    this writer was created.

    A folder that already holds a run is refused (RunFolderInUseError, nothing written) unless
    ``resume``: then the writer appends to that run's metrics (the CSV header must match
    METRIC_COLUMNS), as a resumed run does.
    """

    def __init__(self, run_dir: str | Path, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        if not resume:
            check_fresh_run_dir(self.run_dir)
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


def _metrics_path(run_dir: str | Path, name: str) -> Path:
    p = Path(run_dir)
    return p if p.is_file() else p / name


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
