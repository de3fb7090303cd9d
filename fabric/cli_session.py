"""What every `fabric` verb uses: failures as one line, option types, the handle on the site, output, waiting.

`fabric.cli` holds the command tree; this module the parts its commands share.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import click
import trio
import yaml

from .cli_tables import site_line
from .errors import FabricError, describe, sole_exception

DEFAULT_TIMEOUT = "60s"  # how long --wait waits, as Skupper's --timeout
# Seconds between status polls where no control operation waits for the
# condition itself (a routing key becoming reachable, a site starting).
POLL_INTERVAL = 0.2


NOT_RUNNING = "site is not running: saved; takes effect when it starts"

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


# -- errors ------------------------------------------------------------------------------


class Failure(click.ClickException):
    """An expected failure: one line on stderr, `error: ...`, exit code 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()) or "failed")  # one line, whatever the source said

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True, file=file)


class FabricGroup(click.Group):
    """A click group that turns FabricError and OSError into `error: ...` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (FabricError, OSError) as error:
            raise Failure(describe(error)) from None
        except BaseExceptionGroup as group:  # trio nurseries wrap what their tasks raise
            leaf = sole_exception(group)
            if isinstance(leaf, (click.ClickException, click.exceptions.Exit, click.Abort)):
                raise leaf from None
            if isinstance(leaf, (FabricError, OSError)):
                raise Failure(describe(leaf)) from None
            raise


FabricGroup.group_class = FabricGroup


# -- option types ------------------------------------------------------------------------


class Duration(click.ParamType):
    """A duration: 90s, 15m, 2h, 1d, 1h30m, or plain seconds; converted to seconds (float)."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        parts = _DURATION.findall(text)
        bare = len(parts) > 1 and any(not unit for _, unit in parts)  # "1m2": 2 what?
        if not text or "".join(a + u for a, u in parts) != text or bare:
            self.fail(f"{value!r} is not a duration: use a number with s, m, h or d, e.g. 90s, 15m, 2h", param, ctx)
        seconds = sum(float(amount) * _DURATION_UNITS[unit or "s"] for amount, unit in parts)
        if seconds <= 0 or not math.isfinite(seconds):
            self.fail(f"{value!r}: a duration must be more than 0", param, ctx)
        return seconds


DURATION = Duration()


def format_duration(seconds: float) -> str:
    """Seconds as people write them: 15m, 2h, 1d, 90s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def output_option(command: Callable) -> Callable:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["table", "json", "yaml"]),
        default="table",
        show_default=True,
        help="Output format: a table for people, json or yaml for programs.",
    )(command)


def wait_options(what: str, *, default: bool) -> Callable[[Callable], Callable]:
    def decorate(command: Callable) -> Callable:
        command = click.option(
            "--timeout",
            type=DURATION,
            default=DEFAULT_TIMEOUT,
            show_default=True,
            help="How long --wait waits before giving up (exit code 1): 90s, 5m, ...",
        )(command)
        return click.option(
            "--wait/--no-wait",
            default=default,
            show_default=True,
            help=f"Wait until {what} (running site only), showing progress.",
        )(command)

    return decorate


# -- the control API ---------------------------------------------------------------------


def control() -> Any:
    """fabric.control, imported when a verb needs it (so `--help`, `version`, `demo` never do)."""
    from . import control

    return control


class Cli:
    """What every verb gets from the top-level options."""

    def __init__(self, site_dir: Path) -> None:
        self.site_dir = site_dir

    def call(self, op: str, **args: Any) -> tuple[bool, Any]:
        """Run one control operation; (whether the site runs, the result)."""

        async def one() -> tuple[bool, Any]:
            async with control().open_handle(self.site_dir) as site:
                return site.running, await site.call(op, **args)

        return trio.run(one)

    def run(self, body: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run `await body(site)` with a handle on the site: for verbs that make several calls."""

        async def session() -> Any:
            async with control().open_handle(self.site_dir) as site:
                return await body(site)

        return trio.run(session)


pass_cli = click.make_pass_decorator(Cli)


def say(text: str = "") -> None:
    click.echo(text)


def emit(data: Any, output: str, table: Callable[[Any], str]) -> None:
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        plain = json.loads(json.dumps(data))  # tuples and the like as JSON has them, which safe_dump takes
        click.echo(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True), nl=False)
    else:
        click.echo(table(data).rstrip("\n"))


def wait_running(cli: Cli, timeout: float, *, quiet: bool) -> None:
    async def body() -> None:
        told = False
        try:
            with trio.fail_after(timeout):
                while True:
                    async with control().open_handle(cli.site_dir) as handle:
                        if handle.running:
                            return
                    if not told and not quiet:
                        say(f"waiting for the site in {cli.site_dir} to run...")
                        told = True
                    await trio.sleep(POLL_INTERVAL)
        except trio.TooSlowError:
            raise Failure(
                f"the site in {cli.site_dir} is not running after {format_duration(timeout)}: "
                "start it with `fabric site run`"
            ) from None

    trio.run(body)


async def _wait_for(
    site: Any, op: str, args: dict, *, timeout: float, waiting: str, too_slow: Callable[[str], str]
) -> Any:
    """A waiting operation with a progress line; past `timeout`, fails with too_slow("<timeout as 90s>")."""
    say(waiting)
    try:
        with trio.fail_after(timeout):
            return await site.call(op, **args)
    except trio.TooSlowError:
        raise Failure(too_slow(format_duration(timeout))) from None


async def wait_link(site: Any, link: str, timeout: float) -> None:
    await _wait_for(
        site,
        "wait_link",
        {"name": link},
        timeout=timeout,
        waiting=f"waiting for link {link} to come up...",
        too_slow=lambda after: f"link {link} is not up after {after} (it keeps trying: see `fabric link status`)",
    )
    say(f"link {link} is up")


def emit_part(cli: Cli, output: str, field: str, render: Callable[[list[dict]], str]) -> None:
    """One part of the site's status (its links, listeners or connectors), and whether it runs."""
    running, status = cli.call("status")
    data = {"running": running, field: status.get(field, [])}
    emit(data, output, lambda d: render(d[field]) + ("" if running else "\n" + site_line(status)))


def not_running_note(running: bool) -> None:
    if not running:
        say(NOT_RUNNING)


async def wait_routing_key(site: Any, key: str, timeout: float, *, listener: str) -> None:
    """Wait until a reachable site offers `key` (one that `listener`'s provider policy admits, if it has one)."""
    answer = await _wait_for(
        site,
        "wait_reachable",
        {"routing_key": key, "listener": listener},
        timeout=timeout,
        waiting=f"waiting for a site to offer routing key {key}...",
        too_slow=lambda after: f"no site offers routing key {key} after {after} "
        "(the listener stays; create a connector for the key at a linked site)",
    )
    say(f"routing key {key} is reachable at {', '.join(answer['providers'])}")
