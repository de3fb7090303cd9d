"""Carry a flow's bytes between two ends: a TCP socket and a flow, or two flows.

`relay(a, b)` pumps both ways until both directions have ended (EOF is
passed on as a half-close, so the other way keeps working). If either end
fails, both are aborted: a flow gets RESET with the reason, a socket is
closed with an RST, so nobody mistakes a failure for a clean end.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import trio

from ..errors import FlowError, FlowRefused, FlowReset
from .frames import Reason

CHUNK = 64 * 1024  # bytes per read: one DATA frame
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class End(Protocol):
    """A half-closeable stream that can also be aborted with a reason."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...

    async def send_all(self, data: bytes) -> None: ...

    async def send_eof(self) -> None: ...

    def abort(self, code: int, text: str) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Watched(End, Protocol):
    """An end that reports its own failure even while nobody reads it: a flow's end (a socket has none)."""

    def on_failure(self, callback: Callable[[FlowReset | FlowRefused], None] | None) -> None: ...

    def attach_sink(self, sink: Callable[[bytes], int] | None, at_eof: Callable[[], None] | None = None) -> None: ...


class SocketEnd:
    """A TCP connection (client or target) as a relay end; `label` names it in reasons.

    It reads and writes the socket itself (`os.read`/`os.write` on its
    non-blocking descriptor) rather than through `trio.SocketStream`, whose
    every call that succeeds at once is also a trip through the scheduler: a
    relay checkpoints on its flow side anyway, once per chunk. After a short
    read the socket is known to be empty, so the next read waits for it to
    be readable first instead of trying a `recv` bound to fail.
    """

    def __init__(self, stream: trio.SocketStream, label: str) -> None:
        self.stream = stream
        self.label = label
        self._socket = stream.socket
        self._empty = False  # the last read emptied the socket's receive queue
        # No TCP_NODELAY here: trio.SocketStream has set it (a system call per connection saved).

    def __repr__(self) -> str:
        return f"<SocketEnd {self.label}>"

    def _fd(self) -> int:
        fd = self._socket.fileno()
        if fd == -1:  # closed here (aborted): never touch a descriptor number that may be reused
            raise trio.ClosedResourceError("the connection was closed")
        return fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        # Cancelled only before a read, never after (trio.SocketStream's rule): bytes read are returned.
        await trio.lowlevel.checkpoint_if_cancelled()
        max_bytes = max_bytes or CHUNK
        waited = self._empty
        if waited:
            await trio.lowlevel.wait_readable(self._socket)
        while True:
            try:
                data = os.read(self._fd(), max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._socket)
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket error: {exc}") from exc
            self._empty = len(data) < max_bytes
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()  # a busy connection must not starve the other tasks
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self._write(view) :]
            if view:
                await trio.lowlevel.wait_writable(self._socket)

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Write what the socket takes now, without waiting; bytes taken (0 on any error: `send_all` meets it)."""
        try:
            return self._write(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return 0

    def _write(self, data: bytes | memoryview) -> int:
        try:
            return os.write(self._fd(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    def abort(self, code: int, text: str) -> None:
        """Close with an RST: the application sees a reset, not a clean end of data."""
        sock = self._socket
        if sock.fileno() != -1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
            sock.close()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Broken(Exception):
    def __init__(self, code: int, text: str) -> None:
        self.code = code
        self.text = text


_FAILURES = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, FlowError)


def _describe(end: End, exc: BaseException) -> _Broken:
    if isinstance(exc, FlowError):
        return _Broken(getattr(exc, "code", Reason.UNSPECIFIED), str(exc))
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
    detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return _Broken(Reason.ENDPOINT_RESET, f"{getattr(end, 'label', 'peer')}: {detail}")


async def _pump(src: End, dst: End) -> None:
    # What the other end takes at once goes without a checkpoint of its own: receiving
    # was one (it waited, or checkpointed), and a second would cost a scheduler pass per chunk.
    send_nowait = getattr(dst, "send_nowait", None)
    while True:
        try:
            data = await src.receive_some(CHUNK)
        except _FAILURES as exc:
            raise _describe(src, exc) from None
        if not data:
            break
        if send_nowait is not None:
            taken = send_nowait(data)
            if taken == len(data):
                continue
            data = data[taken:]
        try:
            await dst.send_all(data)
        except _FAILURES as exc:
            raise _describe(dst, exc) from None
    try:
        await dst.send_eof()
    except _FAILURES as exc:
        raise _describe(dst, exc) from None


async def relay(a: End, b: End) -> None:
    """Pump a<->b until both ways end; on failure or cancellation abort both ends.

    Raises `FlowReset` with the first failure's reason (callers log it), so
    the caller can tell a clean end from a broken one.
    """
    failure: _Broken | None = None
    clean = False

    async def pump(src: End, dst: End, scope: trio.CancelScope) -> None:
        nonlocal failure
        try:
            await _pump(src, dst)
        except _Broken as broken:
            failure = failure or broken
            scope.cancel()

    # A flow hands its DATA to the other end straight from the link's reader while
    # that end takes it at once (a socket's or the next link's buffer has room):
    # the pump below then carries only what had to wait.
    for src, dst in ((a, b), (b, a)):
        if hasattr(src, "attach_sink") and hasattr(dst, "send_nowait"):
            src.attach_sink(dst.send_nowait)
    try:
        async with trio.open_nursery() as pumps:

            def failed(error: FlowReset | FlowRefused) -> None:
                nonlocal failure
                failure = failure or _Broken(error.code, str(error))
                pumps.cancel_scope.cancel()

            # A flow that has delivered its EOF is read by nobody, yet a later
            # RESET or link loss must still end the relay: flows say so at once.
            for end in (a, b):
                if isinstance(end, Watched):
                    end.on_failure(failed)
            pumps.start_soon(pump, b, a, pumps.cancel_scope)
            await pump(a, b, pumps.cancel_scope)  # this task is the other pump: one task fewer to start
        clean = failure is None
    finally:
        for end in (a, b):
            if isinstance(end, Watched):
                end.attach_sink(None)
                end.on_failure(None)
        if clean:
            with trio.move_on_after(1, shield=True):  # seconds; closing a socket does not block
                await a.aclose()
                await b.aclose()
        else:
            code, text = (failure.code, failure.text) if failure else (Reason.SHUTDOWN, "site is shutting down")
            a.abort(code, text)
            b.abort(code, text)
    if failure is not None:
        raise FlowReset(failure.code, failure.text)
