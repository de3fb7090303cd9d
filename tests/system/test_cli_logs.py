"""`fabric site run --log-format json`: one JSON object a line, naming the site, the event, the peer and why."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from cli_support import FABRIC, STOP_DEADLINE, SiteProcess, fabric, ok

pytestmark = pytest.mark.system


def test_site_run_logs_json_lines_for_machines(tmp_path: Path):
    hub, edge = tmp_path / "hub", tmp_path / "edge"
    ok(fabric(hub, "site", "create", "hub", "--link-access", "--link-port", "0", "--no-service-sync"))
    ok(fabric(edge, "site", "create", "edge", "--no-service-sync"))
    log_path = tmp_path / "hub.jsonl"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [*FABRIC, "--site-dir", str(hub), "site", "run", "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
        edge_site = None
        try:
            ok(fabric(hub, "site", "status", "--wait", "--timeout", "30s"))
            edge_site = SiteProcess(edge)
            edge_site.wait_running()
            token = tmp_path / "edge.token"
            ok(fabric(hub, "token", "issue", str(token)))
            ok(fabric(edge, "token", "redeem", str(token), "--wait", "--timeout", "30s"))
            assert edge_site.stop()[0] == 0
            process.send_signal(signal.SIGTERM)
            assert process.wait(STOP_DEADLINE) == 0
        finally:
            if edge_site is not None:
                edge_site.kill()
            if process.poll() is None:
                process.kill()
                process.wait(10)

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert lines and all(line["site"] == "hub" for line in lines), text
    assert {"ts", "level", "logger", "event", "peer", "reason", "message"} <= lines[0].keys()
    events = {line["event"]: line for line in lines if line["event"]}
    assert events["token_redeemed"]["peer"].startswith("edge (127.0.0.1:")
    assert events["link_up"]["peer"].startswith("edge (")
    assert events["link_down"]["peer"].startswith("edge (") and events["link_down"]["reason"]
    assert any(line["message"] == "site hub stopping (SIGTERM)" for line in lines), text
