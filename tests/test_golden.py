"""The in-process engine's per-round metrics for fixed seeds stay what they were before the
architecture refactor (issue 20): numbers recorded by tests/golden/record.py on the earlier code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))
from record import CASES, run_case

PINNED = json.loads((Path(__file__).parent / "golden" / "metrics.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_round_metrics_match_the_recorded_run(name, tmp_path):
    assert set(PINNED) == set(CASES), "re-record tests/golden/metrics.json after changing CASES"
    got, want = run_case(CASES[name], tmp_path / name), PINNED[name]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), g["round"]
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-8), (g["round"], key)
            else:
                assert g[key] == value, (g["round"], key)
