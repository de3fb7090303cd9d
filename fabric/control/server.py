"""The control socket of a running site, and `serve`: a site in the foreground.

The socket is `control.sock` in the site directory, mode 0600 (inside a
0700 directory). One request per connection: a JSON line
`{"op": ..., "args": {...}}`, answered by `{"ok": true, "result": ...}` or
`{"ok": false, "error": "one line"}`. A client that hangs up cancels its
request (that is how `--timeout` stops a wait).
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import trio

from .. import logs
from ..errors import FabricError
from ..site import Site, load_site, open_site
from .ops import perform

log = logging.getLogger("fabric.control")

SOCKET_NAME = "control.sock"
LOCK_NAME = "state/run.lock"  # held (flock) by a running site, and by a command changing a stopped one
START_WAIT = 10.0  # seconds a command waits for a starting site's socket, or a site for a command's edit
MAX_REQUEST = 1024 * 1024  # bytes in one request line (a token is ~2 KiB)
RECENT_LINES = 1000  # log lines kept for `fabric debug dump`


def socket_path(site_dir: Path) -> Path:
    return Path(site_dir) / SOCKET_NAME


class RunLock:
    """An exclusive flock on the site's run.lock: one writer of a site directory at a time.

    A running site holds it for its whole life; a command that changes a
    stopped site holds it while it edits, so a site that starts meanwhile
    waits for the edit instead of overwriting it.
    """

    def __init__(self, site_dir: Path) -> None:
        self.path = Path(site_dir) / LOCK_NAME
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None


def site_answers(site_dir: Path) -> bool:
    """Whether a site process is serving this directory's control socket now. Blocking, but instant."""
    path = socket_path(site_dir)
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False  # left over from a site that crashed
    return True


class RecentLog(logging.Handler):
    """The last log lines of this process, for debug dumps."""

    def __init__(self, capacity: int = RECENT_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def read_line(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    """One newline-terminated line (without it); FabricError past `limit` bytes or at EOF before it."""
    buffer = bytearray()
    while b"\n" not in buffer:
        if len(buffer) > limit:
            raise FabricError(f"control message longer than {limit} bytes")
        data = await stream.receive_some(65536)
        if not data:
            raise FabricError("control connection closed before a whole message arrived")
        buffer += data
    return bytes(buffer[: buffer.index(b"\n")])


class ControlServer:
    def __init__(self, site: Site, logs: RecentLog) -> None:
        self.site = site
        self.logs = logs

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        path = socket_path(self.site.site_dir)
        path.unlink(missing_ok=True)  # serve() holds the run lock: no live site has it
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(str(path))
        except OSError as exc:
            sock.close()
            raise FabricError(f"cannot make the control socket {path}: {exc.strerror or exc}") from None
        os.chmod(path, 0o600)
        sock.listen(16)
        try:
            task_status.started(path)
            await trio.serve_listeners(self._serve, [trio.SocketListener(sock)])
        finally:
            path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                request = json.loads(await read_line(stream, MAX_REQUEST))
                op, args = request["op"], request.get("args", {})
                if not isinstance(op, str) or not isinstance(args, dict):
                    raise ValueError("op must be a string and args an object")
            except FabricError as exc:
                return await self._reply(stream, {"ok": False, "error": str(exc)})
            except (ValueError, KeyError, TypeError) as exc:
                return await self._reply(stream, {"ok": False, "error": f"malformed control request: {exc}"})
            reply: dict[str, Any] = {"ok": False, "error": "the client hung up"}
            async with trio.open_nursery() as nursery:

                async def hang_up_cancels() -> None:
                    while await stream.receive_some(1024):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(hang_up_cancels)
                try:
                    reply = {"ok": True, "result": await perform(self.site, op, args, logs=self.logs.lines)}
                except FabricError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:
                    log.exception("control operation %s failed", op)
                    reply = {"ok": False, "error": f"internal error in {op}: {exc!r} (see the site's log)"}
                nursery.cancel_scope.cancel()
            await self._reply(stream, reply)

    async def _reply(self, stream: trio.SocketStream, reply: dict) -> None:
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; nobody to tell


async def serve(site_dir: str | os.PathLike, *, task_status: trio.TaskStatus[Site] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the site in `site_dir` with its control socket until SIGINT or SIGTERM, then stop gracefully."""
    site_dir = Path(site_dir)
    name = (await load_site(site_dir)).name  # checks the directory and its config
    lock = RunLock(site_dir)
    with trio.move_on_after(START_WAIT):  # a command may be changing the stopped site: let it finish
        while not await trio.to_thread.run_sync(lock.try_acquire):
            if await trio.to_thread.run_sync(site_answers, site_dir):
                raise FabricError(f"site {name} is already running from {site_dir}")
            await trio.sleep(0.05)  # no cross-process event tells when a flock is released
    if not lock.held:
        raise FabricError(f"site {name} could not start: another fabric process holds {lock.path}")
    try:
        await _serve(site_dir, name, task_status)
    finally:
        lock.release()


async def _serve(site_dir: Path, name: str, task_status: trio.TaskStatus[Site]) -> None:
    logs.SITE.set(name)  # this process's lines about the site (running, stopping) name it too
    recent = RecentLog()
    fabric_log = logging.getLogger("fabric")
    fabric_log.addHandler(recent)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_site(name, site_dir) as site:
                async with trio.open_nursery() as nursery:
                    await nursery.start(ControlServer(site, recent).run)
                    where = site.status().link_address or "no link access"
                    log.info("site %s (%s) running; links: %s", site.name, site.site_id[:8], where)
                    task_status.started(site)
                    async for signum in signals:
                        log.info("site %s stopping (%s)", site.name, signal.Signals(signum).name)
                        break
                    nursery.cancel_scope.cancel()
        log.info("site %s stopped", name)
    finally:
        fabric_log.removeHandler(recent)
