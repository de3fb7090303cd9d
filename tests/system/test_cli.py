"""The `fabric` command as a user runs it: a real process, its output and exit code."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.system


def run_fabric(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fabric.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_demo_sends_traffic_through_three_sites_and_exits_0():
    result = run_fabric("demo", "--connections", "5", "--size", "200000", "--round-trips", "20")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "edge -> hub (interior): cost 2 via transit" in out  # the edge reaches the hub only through transit
    assert "bytes intact:  5/5 connections" in out
    assert "demo passed" in out
    assert result.stderr == ""


def test_version_names_fabric_and_its_runtime():
    result = run_fabric("version")
    assert result.returncode == 0
    assert result.stdout.startswith("fabric ") and "trio" in result.stdout


def test_an_unknown_command_is_a_usage_error():
    result = run_fabric("demoo")
    assert result.returncode == 2
    assert "No such command 'demoo'" in result.stderr
