"""The 60-second soak (tools/soak.py): a 4-site network under mixed traffic with links cut
every few seconds. No corruption, no client hung past its timeout, no growth of memory,
tasks, file descriptors or flow-table entries, and everything drains once traffic stops.

The 30-minute run is `python -m tools.soak` (see docs/reliability.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 60
DEADLINE = SECONDS + 180  # setup, drain and a slow, shared machine


@pytest.mark.system
def test_a_60_second_soak_loses_nothing_and_grows_nothing(tmp_path):
    result_path = tmp_path / "soak.json"
    process = subprocess.run(
        [sys.executable, "-m", "tools.soak", "--seconds", str(SECONDS), "--interval", "5", "--json", str(result_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    summary = json.loads(result_path.read_text())
    assert summary["pass"] and summary["failures"] == [], output
    outcomes = summary["outcomes"]
    assert outcomes["corrupt"] == 0 and outcomes["hung"] == 0, output
    assert outcomes["done"] > 100 and summary["cuts"] >= 5, output  # it did carry traffic, and did cut links
    assert len(summary["samples"]) >= SECONDS // 5 - 1, output
