"""The `fabric` command as a user runs it: a real process, its output and exit code."""

import concurrent.futures
import json
import os
import subprocess
import sys

import click
import pytest
import yaml

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
    assert "edge redeemed a token of transit naming ws://127.0.0.1:" in out  # the edge's link is a WebSocket
    assert result.stderr == ""


def test_version_names_fabric_and_its_runtime():
    result = run_fabric("version")
    assert result.returncode == 0
    assert result.stdout.startswith("fabric ") and "trio" in result.stdout


def test_an_unknown_command_is_a_usage_error():
    result = run_fabric("demoo")
    assert result.returncode == 2
    assert "No such command 'demoo'" in result.stderr


def command_paths(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command of the tree under `command`, with the words that invoke it."""
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            found += command_paths(sub, (*path, name))
    return found


def test_every_verb_has_help_for_itself_and_each_option():
    from fabric.cli import main

    commands = command_paths(main)
    verbs = {" ".join(path) for path, _ in commands}
    for expected in (
        "site create", "site run", "site status", "site delete", "token issue", "token redeem",
        "link status", "link update", "link delete", "link revoke",
        "listener create", "listener status", "listener delete", "connector create", "connector status",
        "connector delete", "network status", "debug dump", "version", "demo",
    ):
        assert expected in verbs
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        helps = list(pool.map(lambda item: run_fabric(*item[0], "--help", timeout=60), commands))
    for (path, command), result in zip(commands, helps):
        where = f"`fabric {' '.join(path)} --help`"
        assert result.returncode == 0 and result.stderr == "", f"{where}: {result.stderr}"
        assert (command.help or "").strip(), f"{where}: the command has no help text"
        assert " ".join(command.help.split("\n\n")[0].split()) in " ".join(result.stdout.split())
        for option in command.params:
            if not isinstance(option, click.Option):
                continue
            name = option.opts[-1]
            assert (option.help or "").strip(), f"{where}: option {name} has no help"
            assert name in result.stdout, f"{where} does not describe {name}"
            default = option.get_default(click.Context(command), call=False)
            unset = option.required or default is None or type(default).__name__ == "Sentinel"  # click 8.3: UNSET
            has_default = not unset and not (option.is_flag and not option.secondary_opts)
            if has_default:
                assert option.show_default or "[default:" in option.help, f"{where}: {name} hides its default"
        for argument in command.params:
            if isinstance(argument, click.Argument):
                assert argument.human_readable_name in result.stdout
    top = helps[0].stdout
    assert "Getting started" in top and "fabric token redeem" in top


def test_help_fits_80_columns():
    result = subprocess.run(
        [sys.executable, "-m", "fabric.cli", "listener", "create", "--help"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_a_stopped_site_is_changed_through_its_files(tmp_path):
    """Create a site, change it while stopped (saved for its next start), delete it."""
    site = str(tmp_path / "quiet")

    def fabric(*args: str) -> str:
        result = run_fabric("--site-dir", site, *args, timeout=60)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return result.stdout

    created = fabric("site", "create", "quiet", "--link-access")
    assert "site quiet created" in created and "accepts links on 127.0.0.1:7443" in created  # the default port
    assert "Link access: tls://127.0.0.1:7443 (when running)" in fabric("site", "status")
    saved = "site is not running: saved; takes effect when it starts"
    assert saved in fabric("listener", "create", "db", "15432", "--routing-key", "postgres", "--distribution", "closest")
    assert saved in fabric("connector", "create", "cache", "6379")
    status = json.loads(fabric("site", "status", "-o", "json"))
    assert status["running"] is False
    listeners = [(item["name"], item["routing_key"], item["host"], item["port"], item["distribution"]) for item in status["listeners"]]
    assert listeners == [("db", "postgres", "127.0.0.1", 15432, "closest")]
    assert yaml.safe_load(fabric("connector", "status", "-o", "yaml"))["connectors"][0]["host"] == "localhost"
    table = fabric("listener", "status")
    assert "127.0.0.1:15432" in table and "not running" in table and "closest" in table
    assert saved in fabric("listener", "delete", "db")
    assert json.loads(fabric("listener", "status", "-o", "json"))["listeners"] == []
    refused = run_fabric("--site-dir", site, "site", "delete", timeout=60)  # no terminal to confirm on
    assert refused.returncode == 1 and os.path.isdir(site)
    assert "deleted" in fabric("site", "delete", "--yes")
    assert not os.path.exists(site)


def test_durations_and_tables():
    from fabric.cli_session import DURATION, format_duration
    from fabric.cli_tables import table

    assert [DURATION.convert(text, None, None) for text in ("90s", "15m", "2h", "1d", "1h30m", "45", "1.5m")] == [
        90, 900, 7200, 86400, 5400, 45, 90
    ]
    for bad in ("", "soon", "m", "15x", "0s", "1m2"):
        with pytest.raises(click.BadParameter):
            DURATION.convert(bad, None, None)
    assert [format_duration(s) for s in (90, 900, 7200, 86400, 1.5)] == ["90s", "15m", "2h", "1d", "1.5s"]
    rows = [("a-very-long-listener-name-" * 3, "key", "127.0.0.1:5432", 0, "an error that goes on and on " * 3)]
    lines = table(("NAME", "ROUTING KEY", "ADDRESS", "CONNECTIONS", "ERROR"), rows).splitlines()
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines)
    assert "127.0.0.1:5432" in lines[1] and "…" in lines[1]  # short columns kept whole, long ones clipped
