"""What a run's summary.json says besides its config: the metrics' summary, the outcome, the
segments of a resumed run, the versions of the code that ran.

Conventions: accuracies are fractions in [0, 1]; times are seconds. Plain python: no flwr, hydra
or torch imports here.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "completed_status",
    "environment_versions",
    "is_missing",
    "source_commit",
    "summarize",
    "utc_now_iso",
    "with_segments",
]


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
    root = Path(__file__).resolve().parents[2] if root is None else root
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
