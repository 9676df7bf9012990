"""Reference numbers (e.g. the seed paper's Table 2) to show next to the measured ones.

A reference CSV has the columns REFERENCE_COLUMNS (strategy, attack, fraction, accuracy_pct,
epochs) and optionally std_pct; each line is one cell (strategy, attack, fraction).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbgmd.reporting.runs import Group, num
from fedbgmd.reporting.setting import is_clean
from fedbgmd.reporting.stats import is_reduced

__all__ = ["REFERENCE_COLUMNS", "CellKey", "RefCell", "ReferenceFileError", "load_reference"]

REFERENCE_COLUMNS: tuple[str, ...] = ("strategy", "attack", "fraction", "accuracy_pct", "epochs")
REFERENCE_OPTIONAL_COLUMNS: tuple[str, ...] = ("std_pct",)

CellKey = tuple[str, str, float]  # (strategy, attack, fraction)


class ReferenceFileError(ValueError):
    """The --reference CSV cannot be read or has the wrong columns/values."""


@dataclass(frozen=True)
class RefCell:
    """One number of the reference table, e.g. the seed's BGMD accuracy under 20 % bit flips."""

    strategy: str
    attack: str
    fraction: float
    accuracy_pct: float
    epochs: float
    std_pct: float | None = None

    @property
    def key(self) -> CellKey:
        return cell_key(self.strategy, self.attack, self.fraction)


def cell_key(strategy: object, attack: object, fraction: float | None) -> CellKey:
    """Clean cells (attack none) match whatever fraction is recorded: nobody is Byzantine."""
    if is_clean(attack):
        return (str(strategy).strip(), "none", 0.0)
    return (str(strategy).strip(), str(attack).strip(), round(float(fraction or 0.0), 6))


def load_reference(path: Path | str) -> dict[CellKey, RefCell]:
    """Read a reference CSV (REFERENCE_COLUMNS, optional std_pct) into cells keyed by
    (strategy, attack, fraction). Raises ReferenceFileError naming the file (and line) on an
    unreadable file, missing or unknown columns, non-numeric values or duplicate cells."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceFileError(f"cannot read reference file {path}: {exc}") from exc
    try:
        lines = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise ReferenceFileError(f"reference file {path} is not valid CSV: {exc}") from exc
    if not lines or not any(c.strip() for c in lines[0]):
        raise ReferenceFileError(f"reference file {path} is empty (no header line)")
    header = [c.strip() for c in lines[0]]
    known = REFERENCE_COLUMNS + REFERENCE_OPTIONAL_COLUMNS
    missing = [c for c in REFERENCE_COLUMNS if c not in header]
    unknown = [c for c in header if c not in known]
    if missing or unknown or len(set(header)) != len(header):
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(unknown)}")
        if len(set(header)) != len(header):
            parts.append("duplicate column names")
        raise ReferenceFileError(
            f"reference file {path}: {'; '.join(parts)} "
            f"(expected {', '.join(REFERENCE_COLUMNS)}, optional {', '.join(REFERENCE_OPTIONAL_COLUMNS)})"
        )
    cells: dict[CellKey, RefCell] = {}
    for lineno, raw in enumerate(lines[1:], start=2):
        if not any(c.strip() for c in raw):
            continue
        if len(raw) != len(header):
            raise ReferenceFileError(
                f"{path}:{lineno}: {len(raw)} fields, the header has {len(header)}"
            )
        rec = {h: c.strip() for h, c in zip(header, raw)}

        def number(col: str, rec: dict[str, str] = rec, lineno: int = lineno) -> float | None:
            if rec.get(col, "") == "":
                return None
            v = num(rec[col])
            if v is None:
                raise ReferenceFileError(f"{path}:{lineno}: {col}={rec[col]!r} is not a number")
            return v

        fraction, acc, epochs = number("fraction"), number("accuracy_pct"), number("epochs")
        std = number("std_pct") if "std_pct" in rec else None
        if not rec["strategy"] or not rec["attack"]:
            raise ReferenceFileError(f"{path}:{lineno}: strategy and attack must not be empty")
        if acc is None or epochs is None:
            raise ReferenceFileError(
                f"{path}:{lineno}: accuracy_pct and epochs are required "
                "(leave a cell the reference does not give out of the file)"
            )
        if fraction is None:
            if not is_clean(rec["attack"]):
                raise ReferenceFileError(f"{path}:{lineno}: fraction is required for an attack")
            fraction = 0.0
        if not 0.0 <= acc <= 100.0 or epochs <= 0 or not 0.0 <= fraction < 1.0:
            raise ReferenceFileError(
                f"{path}:{lineno}: out of range (accuracy_pct in [0, 100], epochs > 0, "
                "fraction in [0, 1))"
            )
        cell = RefCell(rec["strategy"], rec["attack"], fraction, acc, epochs, std)
        if cell.key in cells:
            raise ReferenceFileError(f"{path}:{lineno}: duplicate cell {cell.key}")
        cells[cell.key] = cell
    return cells


def group_cell_key(g: Group) -> CellKey | None:
    """The reference cell a group stands for, when its setting pins strategy, attack, fraction."""
    s = g.setting
    if "strategy" not in s or "attack" not in s:
        return None
    frac = s.get("attack.fraction", s.get("fraction"))
    if not is_clean(s["attack"]) and num(frac) is None:
        return None
    return cell_key(s["strategy"], s["attack"], num(frac))


def match_reference(
    groups: Sequence[Group], stats: Sequence[dict[str, Any]], refs: dict[CellKey, RefCell]
) -> set[CellKey]:
    """Give each group's ``stats`` its reference cell's numbers (ref_accuracy_pct, ref_std_pct,
    ref_epochs) and the budget it is held to (target_epochs, reduced_budget); returns the
    reference cells some group matched."""
    # the budget a cell is held to: its reference's epochs, else (e.g. a cell the seed leaves
    # out because training diverged) the epochs of the reference's cells for the same corruption
    row_epochs: dict[tuple[str, float], set[float]] = {}
    for r in refs.values():
        row_epochs.setdefault(r.key[1:], set()).add(r.epochs)
    matched: set[CellKey] = set()
    for g, s in zip(groups, stats):
        ck = group_cell_key(g)
        ref = refs.get(ck) if ck is not None else None
        target = ref.epochs if ref is not None else None
        if target is None and ck is not None and len(row_epochs.get(ck[1:], ())) == 1:
            target = next(iter(row_epochs[ck[1:]]))
        s["target_epochs"] = target
        if target is not None:
            s["reduced_budget"] = int(is_reduced(s))
        if ref is not None:
            matched.add(ref.key)
            s.update(
                ref_accuracy_pct=ref.accuracy_pct, ref_std_pct=ref.std_pct, ref_epochs=ref.epochs
            )
    return matched
