"""TCP listener and connector: where applications plug in.

A listener accepts clients on a local `host:port` and carries each
connection, as one flow, to a site that has a connector for its routing key.
A connector dials its target for each flow that arrives for its key.
"""

from __future__ import annotations

import logging

import trio

from ..config import ConnectorConfig, ListenerConfig
from ..errors import FlowError, FlowRefused, NoProviderError
from ..router.frames import Reason
from ..router.relay import SocketEnd, relay
from ..router.router import Router
from ..router.transports import listen_tcp

log = logging.getLogger("fabric.proxy")


class TcpConnector:
    def __init__(self, config: ConnectorConfig, *, dial_timeout: float) -> None:
        self.config = config
        self.port = config.port
        self._dial_timeout = dial_timeout

    def __repr__(self) -> str:
        return f"<TcpConnector {self.config.name} -> {self.config.host}:{self.config.port}>"

    async def dial(self) -> SocketEnd:
        where = f"{self.config.host}:{self.config.port}"
        try:
            with trio.fail_after(self._dial_timeout):
                stream = await trio.open_tcp_stream(self.config.host, self.config.port)
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise FlowRefused(Reason.DIAL_FAILED, f"connector {self.config.name}: target {where}: {why}") from None
        except trio.TooSlowError:
            raise FlowRefused(
                Reason.DIAL_FAILED,
                f"connector {self.config.name}: target {where} did not answer within {self._dial_timeout:g} s",
            ) from None
        return SocketEnd(stream, f"target {where}")


class TcpListener(trio.abc.AsyncResource):
    def __init__(self, config: ListenerConfig, router: Router) -> None:
        self.config = config
        self.port: int | None = None
        self._router = router
        self._scope = trio.CancelScope()
        self.connections = 0

    def __repr__(self) -> str:
        return f"<TcpListener {self.config.name} {self.config.host}:{self.port} -> {self.config.routing_key!r}>"

    async def run(self, *, task_status: trio.TaskStatus[TcpListener] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the bound port through `task_status`, and serve until closed."""
        listener = await listen_tcp(self.config.host, self.config.port, what=f"listener {self.config.name}")
        self.port = listener.socket.getsockname()[1]
        with self._scope:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                await trio.serve_listeners(self._serve, [listener], handler_nursery=nursery)

    async def aclose(self) -> None:
        self._scope.cancel()
        await trio.lowlevel.checkpoint()

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "unknown"
        client = SocketEnd(stream, f"client {peer}")
        self.connections += 1
        try:
            async with self._router.connect(self.config.routing_key) as end:
                await relay(client, end)
        except (NoProviderError, FlowError) as exc:
            log.info("listener %s: connection from %s ended: %s", self.config.name, peer, exc)
        except Exception:
            # A bug in one connection's handling must not take the listener down.
            log.exception("listener %s: connection from %s failed", self.config.name, peer)
        finally:
            self.connections -= 1
            client.abort(Reason.UNSPECIFIED, "connection ended")  # no-op once the relay closed it cleanly
