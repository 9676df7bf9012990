"""The Quickstart's environment script refuses to start a multi-GB install on a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("df") is None, reason="needs bash, df"
)
def test_env_sh_stops_before_installing_when_the_disk_is_too_full(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    marker = tmp_path / "python-was-run"
    fake = venv / "bin" / "python"  # an existing venv whose install stamp is stale
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    env = {**os.environ, "FEDBGMD_VENV": str(venv), "FEDBGMD_MIN_FREE_GB": "100000000"}
    proc = subprocess.run(
        ["bash", "-c", f"source {ROOT / '.ci' / 'env.sh'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "MB free where" in proc.stderr and "needs about 100000000 GB" in proc.stderr
    assert "FEDBGMD_VENV" in proc.stderr
    assert not marker.exists()  # pip (through the venv's python) never started
    assert not (venv / ".fedbgmd-install").exists()
