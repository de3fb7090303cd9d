"""TCP listener and connector: where applications plug in.

A listener accepts clients on a local `host:port` and carries each
connection, as one flow, to a site that has a connector for its routing key.
A connector dials its target for each flow that arrives for its key.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from collections.abc import Callable

import trio

from ..config import ConnectorConfig, ListenerConfig
from ..errors import FabricError, FlowError, FlowRefused, NoProviderError
from ..router.frames import Reason
from ..router.relay import SocketEnd, relay
from ..router.router import PolicyView, Router
from ..router.transports import describe_connect_error, listen_tcp

log = logging.getLogger("fabric.proxy")

# Addresses this process's listeners accept on. A connector whose target is
# one of them would carry each flow back into the network, which would carry
# it to the connector again, without end (service sync on a host shared by
# several sites, with the real target down, makes exactly that): it refuses.
_listening: set[tuple[str, int]] = set()


async def connect_tcp(host: str, port: int) -> trio.SocketStream:
    """`trio.open_tcp_stream`, without its machinery for several addresses when the host is one IP address.

    A connector dials its target once per flow; happy eyeballs (a nursery and
    a task per attempt) is what most of that costs when there is nothing to
    choose between.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class TcpConnector:
    def __init__(self, config: ConnectorConfig, *, dial_timeout: float) -> None:
        self.config = config
        self.port = config.port
        self.protocol = config.protocol  # advertised: "http" makes other sites' service sync listen with HTTP
        self._dial_timeout = dial_timeout

    def __repr__(self) -> str:
        return f"<TcpConnector {self.config.name} -> {self.config.host}:{self.config.port}>"

    async def dial(self) -> SocketEnd:
        where = f"{self.config.host}:{self.config.port}"
        await self._check_not_a_listener(where)
        try:
            with trio.fail_after(self._dial_timeout):
                stream = await connect_tcp(self.config.host, self.config.port)
        except OSError as exc:
            why = describe_connect_error(exc)
            raise FlowRefused(Reason.DIAL_FAILED, f"connector {self.config.name}: target {where}: {why}") from None
        except trio.TooSlowError:
            raise FlowRefused(
                Reason.DIAL_FAILED,
                f"connector {self.config.name}: target {where} did not answer within {self._dial_timeout:g} s",
            ) from None
        return SocketEnd(stream, f"target {where}")

    async def _check_not_a_listener(self, where: str) -> None:
        """Refuse, before dialling, a target that is one of this process's own listeners."""
        port = self.config.port
        if not any(p == port for _, p in _listening):
            return  # the common case costs no lookup
        try:
            infos = await trio.socket.getaddrinfo(self.config.host, port, type=socket.SOCK_STREAM)
        except OSError:
            return  # the dial will say what is wrong with the name
        ours = {host for host, p in _listening if p == port}
        if ours & ({info[4][0] for info in infos} | {"0.0.0.0", "::"}):
            raise FlowRefused(
                Reason.DIAL_FAILED,
                f"connector {self.config.name}: target {where} is a fabric listener, not the service "
                "(is the service down, and service sync listening on its port?)",
            )


class TcpListener(trio.abc.AsyncResource):
    """Accepts clients only while some reachable site provides its routing key.

    Without a provider its socket is closed, so clients are refused at once
    (not accepted and left hanging); it keeps its port and binds it again
    when a provider appears. Connections already open carry on.
    """

    # A protocol that can say "no provider" to its clients (HTTP's 503) keeps accepting instead.
    answers_without_provider = False

    def __init__(
        self, config: ListenerConfig, router: Router | PolicyView, *, auto: bool = False, on_state: Callable[[], None] = lambda: None
    ) -> None:
        self.config = config
        self.auto = auto  # made by service sync, not configured
        self.port: int | None = None
        self.accepting = False
        self.error: str | None = None  # why it cannot accept now, when it cannot
        self.bind_failed = False  # the last attempt to bind its port failed (error says why)
        self._router = router
        self._scope = trio.CancelScope()
        self._state_changed = trio.Event()
        self._done = trio.Event()
        self._on_state = on_state
        self.connections = 0

    def __repr__(self) -> str:
        state = "accepting" if self.accepting else (self.error or "closed")
        return f"<TcpListener {self.config.name} {self.config.host}:{self.port} -> {self.config.routing_key!r} {state}>"

    async def run(self, *, task_status: trio.TaskStatus[TcpListener] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (learning the port when it is 0), report through `task_status`, serve until closed.

        A port in use when the listener is made is an error for the caller; later,
        when it is bound again, it is reported in `error` and tried at the next change.
        """
        what = f"listener {self.config.name}"
        listener: trio.SocketListener | None = None
        try:
            listener = await listen_tcp(self.config.host, self.config.port, what=what)
            self.port = listener.socket.getsockname()[1]
            key, router = self.config.routing_key, self._router
            with self._scope:
                async with trio.open_nursery() as handlers:  # outlives each bind: open connections carry on
                    task_status.started(self)
                    while True:
                        if not router.providers(key) and not self.answers_without_provider:
                            if listener is not None:
                                await listener.aclose()
                                listener = None
                            self._state(False, f"no reachable site offers routing key {key!r}")
                            await router.wait_reachable(key)
                        if listener is None:
                            try:
                                listener = await listen_tcp(self.config.host, self.port, what=what)
                            except FabricError as exc:
                                self._state(False, str(exc), bind_failed=True)
                                log.warning("%s", exc)
                                await router.wait_changed()
                                continue
                        self._state(True, None)
                        address = tuple(listener.socket.getsockname()[:2])
                        _listening.add(address)
                        try:
                            async with trio.open_nursery() as serving:
                                serving.start_soon(
                                    functools.partial(trio.serve_listeners, self._serve, [listener], handler_nursery=handlers)
                                )
                                if self.answers_without_provider:
                                    await trio.sleep_forever()
                                await router.wait_unreachable(key)
                                serving.cancel_scope.cancel()
                        finally:
                            _listening.discard(address)
                            self._state(False, self.error)
                        await listener.aclose()
                        listener = None
        finally:
            if listener is not None:
                listener.socket.close()  # also when cancelled: never left to the garbage collector
            self._done.set()

    def _state(self, accepting: bool, error: str | None, *, bind_failed: bool = False) -> None:
        self.accepting, self.error, self.bind_failed = accepting, error, bind_failed
        self._state_changed.set()
        self._state_changed = trio.Event()
        self._on_state()

    async def wait_accepting(self) -> None:
        """Return once the listener accepts clients, or has failed to bind its port (see `error`)."""
        while not (self.accepting or self.bind_failed):
            await self._state_changed.wait()

    async def aclose(self) -> None:
        """Stop accepting, reset its open connections, close the socket; returns once all is done."""
        self._scope.cancel()
        await self._done.wait()

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "unknown"
        client = SocketEnd(stream, f"client {peer}")
        self.connections += 1
        try:
            async with self._router.connect(self.config.routing_key, self.config.distribution) as end:
                await relay(client, end)
        except (NoProviderError, FlowError) as exc:
            log.info("listener %s: connection from %s ended: %s", self.config.name, peer, exc)
        except Exception:
            # A bug in one connection's handling must not take the listener down.
            log.exception("listener %s: connection from %s failed", self.config.name, peer)
        finally:
            self.connections -= 1
            client.abort(Reason.UNSPECIFIED, "connection ended")  # no-op once the relay closed it cleanly
