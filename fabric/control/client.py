"""How the CLI reaches a site: over its control socket if it runs, from its directory if not."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import trio

from ..errors import FabricError
from ..site import Site, load_site
from .ops import perform
from .server import (
    MAX_REQUEST,
    START_WAIT,
    RunLock,
    read_line,
    site_answers,
    socket_path,
)

# Bytes of one answer; a network status of thousands of sites fits.
MAX_ANSWER = 64 * MAX_REQUEST


class SiteHandle(Protocol):
    running: bool

    async def call(self, op: str, **args: Any) -> Any: ...


class RunningSite:
    """A site process, reached through its control socket; changes apply at once."""

    running = True

    def __init__(self, site_dir: Path) -> None:
        self.site_dir = site_dir

    async def call(self, op: str, **args: Any) -> Any:
        try:
            stream = await trio.open_unix_socket(str(socket_path(self.site_dir)))
        except OSError as exc:
            raise FabricError(f"cannot reach the site at {self.site_dir}: {exc.strerror or exc}") from None
        async with stream:
            try:
                await stream.send_all(json.dumps({"op": op, "args": args}).encode() + b"\n")
                reply = json.loads(await read_line(stream, MAX_ANSWER))
            except (trio.BrokenResourceError, ValueError) as exc:
                raise FabricError(f"the site at {self.site_dir} stopped answering: {exc}") from None
        if not reply.get("ok"):
            raise FabricError(reply.get("error") or "the site refused without saying why")
        return reply.get("result")


class StoppedSite:
    """A site that is not running, read from and written to its directory."""

    running = False

    def __init__(self, site: Site) -> None:
        self.site = site

    async def call(self, op: str, **args: Any) -> Any:
        return await perform(self.site, op, args)


@asynccontextmanager
async def open_handle(site_dir: str | os.PathLike) -> AsyncIterator[SiteHandle]:
    """The site in `site_dir`, running or not. ConfigError if there is no site there.

    A stopped site is held (its run lock) while the caller uses it, so a site
    that starts meanwhile waits rather than overwriting the change; a site
    that is starting is waited for, then reached through its socket.
    """
    site_dir = Path(site_dir)
    await load_site(site_dir)  # raises, with a clear message, if there is no site there
    lock = RunLock(site_dir)
    if await _running_or_locked(site_dir, lock):
        yield RunningSite(site_dir)
        return
    try:
        yield StoppedSite(await load_site(site_dir))  # read again: holding the lock, this is current
    finally:
        lock.release()


async def _running_or_locked(site_dir: Path, lock: RunLock) -> bool:
    """True once the site answers on its socket; False once we hold its run lock (it is stopped)."""
    with trio.move_on_after(START_WAIT):
        while True:
            if await trio.to_thread.run_sync(site_answers, site_dir):
                return True
            if await trio.to_thread.run_sync(lock.try_acquire):
                return False
            await trio.sleep(0.05)  # the site is starting: its socket comes up in a moment
    raise FabricError(
        f"the site in {site_dir} is busy: it is starting (or stuck), or another fabric command is changing it; "
        f"nothing answered within {START_WAIT:g} s"
    )


def delete_site(site_dir: str | os.PathLike) -> None:
    """Remove a stopped site's directory, keys and all. Blocking."""
    site_dir = Path(site_dir)
    if site_answers(site_dir):
        raise FabricError(f"the site at {site_dir} is running: stop it first")
    if not (site_dir / "site.yaml").exists():
        raise FabricError(f"no site directory at {site_dir}")
    lock = RunLock(site_dir)
    if not lock.try_acquire():
        raise FabricError(f"the site at {site_dir} is starting, or another fabric command is changing it: try again")
    try:
        shutil.rmtree(site_dir)
    finally:
        lock.release()
