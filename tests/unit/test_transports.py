"""Link addresses, proxy settings and the WebSocket byte stream, without sockets (trio's memory streams)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websocket_support import exchange, websocket_pair

from fabric import addresses
from fabric.addresses import Address, Proxy, parse_address, parse_proxy, proxy_for
from fabric.errors import LinkError
from fabric.router import transports
from fabric.router.transports import WebSocketStream


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("tls://hub.example.com:7443", Address("tls", "hub.example.com", 7443)),
        ("tls://[::1]:7443", Address("tls", "::1", 7443)),
        ("ws://127.0.0.1:8080/fabric", Address("ws", "127.0.0.1", 8080, "/fabric")),
        ("ws://127.0.0.1:8080", Address("ws", "127.0.0.1", 8080, "/fabric")),
        ("wss://proxy.example", Address("wss", "proxy.example", 443, "/fabric")),
        ("wss://proxy.example/", Address("wss", "proxy.example", 443, "/fabric")),
        ("wss://proxy.example:8443/tunnels/hub-1", Address("wss", "proxy.example", 8443, "/tunnels/hub-1")),
        ("ws://[fe80::1]/x", Address("ws", "fe80::1", 80, "/x")),
    ],
)
def test_parse_address(text: str, address: Address) -> None:
    assert parse_address(text) == address
    assert parse_address(str(address)) == address  # what status and tokens print reads back the same


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("hub:7443", "must start with one of: tls://, ws://, wss://"),
        ("http://hub:80", "must start with one of"),
        ("tls://hub", "no port"),
        ("tls://hub:0", "no port"),
        ("tls://hub:65536", "no port"),
        ("tls://hub:7443/fabric", "a tls:// address has no path"),
        ("tls://::1:7443", "no port"),
        ("tls://[::g]:7443", "bad IPv6 address"),
        ("ws://a b:80/fabric", "bad host name"),
        ("ws://hub:80/fa bric", "the path has characters"),
        ("wss://:443/fabric", "bad host name"),
    ],
)
def test_parse_address_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_address(text)


def test_parse_proxy_reads_credentials_and_never_prints_the_password() -> None:
    proxy = parse_proxy("http://alice:s%40cret@proxy.corp:3128/")
    assert proxy == Proxy("proxy.corp", 3128, "alice", "s@cret")
    assert str(proxy) == repr(proxy) == "http://alice:***@proxy.corp:3128"
    assert parse_proxy("proxy.corp:8080") == Proxy("proxy.corp", 8080)
    assert addresses.hide_password("http://alice:s3cret@proxy:1") == "http://alice:***@proxy:1"


@pytest.mark.parametrize(
    ("text", "hidden", "password"),
    [
        ("http://alice:s3cret@proxy:1", "http://alice:***@proxy:1", "s3cret"),
        ("http://alice:se/cr@t:x@proxy:1/", "http://alice:***@proxy:1/", "se/cr@t:x"),  # "/", "@", ":" unquoted
        ("alice:s3cret@proxy:1", "alice:***@proxy:1", "s3cret"),  # no scheme: curl's convention, as parse_proxy
        ("http://alice:@proxy:1", "http://alice:***@proxy:1", ""),
        ("http://alice@proxy:1", "http://alice@proxy:1", ""),  # a user, no password
        ("http://proxy:3128", "http://proxy:3128", None),
    ],
)
def test_hide_password_hides_what_parse_proxy_reads_as_the_password(text: str, hidden: str, password) -> None:
    assert addresses.hide_password(text) == hidden
    assert parse_proxy(text).password == password


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("https://proxy:3128", "only http:// proxies"),
        ("http://proxy", "needs a port"),
        ("http://proxy:3128/path", "no path"),
        ("socks5://user:hunter2@proxy:1080", "only http://"),
    ],
)
def test_parse_proxy_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as caught:
        parse_proxy(text)
    assert "hunter2" not in str(caught.value)


HUB = parse_address("wss://hub.example.com/fabric")


@pytest.mark.parametrize(
    ("address", "setting", "environ", "expected"),
    [
        (HUB, None, {}, None),
        (HUB, None, {"HTTPS_PROXY": "http://p:3128"}, Proxy("p", 3128)),
        (HUB, None, {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"}, Proxy("low", 1)),
        (HUB, None, {"HTTP_PROXY": "http://p:3128"}, None),  # wss goes by HTTPS_PROXY
        (parse_address("ws://hub:80/fabric"), None, {"HTTP_PROXY": "http://p:3128"}, Proxy("p", 3128)),
        (parse_address("tls://hub:7443"), None, {"HTTPS_PROXY": "http://p:3128"}, Proxy("p", 3128)),
        (HUB, None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "example.com"}, None),
        (HUB, None, {"HTTPS_PROXY": "http://p:3128", "no_proxy": ".example.com"}, None),
        (HUB, None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "ample.com"}, Proxy("p", 3128)),
        (HUB, None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "other, *"}, None),
        (HUB, None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "hub.example.com:8443"}, Proxy("p", 3128)),
        (HUB, None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "hub.example.com:443"}, None),
        (parse_address("tls://10.1.2.3:7443"), None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "10.0.0.0/8"}, None),
        (parse_address("tls://[::1]:7443"), None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "::1"}, None),
        (parse_address("tls://10.1.2.3:7443"), None, {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "10.1.2.4"}, Proxy("p", 3128)),
        (HUB, "none", {"HTTPS_PROXY": "http://p:3128"}, None),
        (HUB, "http://mine:8080", {"HTTPS_PROXY": "http://p:3128", "NO_PROXY": "*"}, Proxy("mine", 8080)),
    ],
)
def test_proxy_for(address: Address, setting: str | None, environ: dict[str, str], expected: Proxy | None) -> None:
    assert proxy_for(address, setting, environ) == expected


def test_a_malformed_proxy_in_the_environment_is_named_as_such() -> None:
    with pytest.raises(ValueError, match=r"only http:// proxies are supported .*\(from the environment\)"):
        proxy_for(HUB, None, {"HTTPS_PROXY": "https://p:3128"})


# -- the WebSocket stream -------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    up=st.lists(st.binary(min_size=1, max_size=70_000), max_size=6),
    down=st.lists(st.binary(min_size=1, max_size=70_000), max_size=6),
    max_bytes=st.integers(1, 100_000),
    keepalive=st.sampled_from([0.0, 25.0]),
)
def test_bytes_cross_a_websocket_intact_both_ways_whatever_the_message_sizes(up, down, max_bytes, keepalive) -> None:
    async def main() -> None:
        client, server = await websocket_pair(trio.testing.memory_stream_pair(), keepalive)
        with trio.fail_after(10):
            # keepalive 0: a ping goes with every message, and each side answers them while it reads
            assert await exchange(client, server, up, down, max_bytes) == (b"".join(up), b"".join(down))
        await client.aclose()
        assert await server.receive_some() == b""  # the close frame is the end of the stream

    trio.run(main)


async def test_a_request_for_another_path_is_refused_with_404_and_the_client_says_so() -> None:
    client_side, server_side = trio.testing.memory_stream_pair()
    errors = {}

    async def server() -> None:
        with pytest.raises(LinkError, match="a WebSocket request for '/other', not '/fabric'") as caught:
            await WebSocketStream.accept(server_side, path="/fabric", keepalive=25, peer="test")
        errors["server"] = caught.value
        await server_side.aclose()

    async def client() -> None:
        with pytest.raises(LinkError, match="refused the WebSocket: HTTP 404 Not Found: fabric: links are at /fabric, not /other"):
            await WebSocketStream.connect(client_side, parse_address("ws://hub:80/other"), keepalive=25)
        errors["client"] = True

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            nursery.start_soon(client)
    assert set(errors) == {"server", "client"}


async def test_a_plain_http_request_gets_400_and_a_line_saying_what_the_port_is_for() -> None:
    client_side, server_side = trio.testing.memory_stream_pair()

    async def server() -> None:
        with pytest.raises(LinkError, match="not a WebSocket request"):
            await WebSocketStream.accept(server_side, path="/fabric", keepalive=25, peer="test")
        await server_side.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        await client_side.send_all(b"GET /fabric HTTP/1.1\r\nHost: hub\r\n\r\n")
        answer = b""
        while data := await client_side.receive_some():
            answer += data
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.endswith(b"fabric: this port takes WebSocket links only\n")


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=300))
def test_malformed_websocket_frames_break_the_stream_and_nothing_else(garbage: bytes) -> None:
    async def main() -> None:
        client, server = await websocket_pair(trio.testing.memory_stream_pair())
        await client.transport.send_all(garbage)  # raw bytes, not frames
        await client.transport.aclose()
        with trio.fail_after(5):
            try:
                while await server.receive_some():
                    pass
            except trio.BrokenResourceError:
                pass  # the only error a malformed frame may raise: the link then ends like any lost connection

    trio.run(main)


# -- CONNECT through a forward proxy --------------------------------------------------


@pytest.mark.parametrize(
    ("proxy", "answer", "why"),
    [
        (Proxy("p", 3128), b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
         r"proxy http://p:3128 requires credentials \(http://user:password@host:port\): 407 Proxy Authentication Required"),
        (Proxy("p", 3128, "alice", "wrong"), b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
         r"proxy http://alice:\*\*\*@p:3128 refused the credentials given: 407"),
        (Proxy("p", 3128, "alice", "wrong"), b"HTTP/1.0 401 Unauthorized\r\n\r\n",
         r"refused the credentials given: 401 Unauthorized"),
        (Proxy("p", 3128), b"HTTP/1.0 403 Forbidden\r\n\r\n", "does not allow a tunnel to hub.example.com:443: 403 Forbidden"),
        (Proxy("p", 3128), b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "could not reach hub.example.com:443: 502 Bad Gateway"),
        (Proxy("p", 3128), b"HTTP/1.1 200 OK\r\n\r\nsurprise", "sent data into the tunnel"),
        (Proxy("p", 3128), b"SSH-2.0-OpenSSH\r\n", "answered CONNECT with something that is not HTTP"),
        (Proxy("p", 3128), b"", "closed the connection instead of answering CONNECT hub.example.com:443"),
    ],
)
async def test_a_proxys_refusal_is_reported_as_such(proxy: Proxy, answer: bytes, why: str) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:

        async def proxy_side() -> None:
            request = await theirs.receive_some()
            assert request.startswith(b"CONNECT hub.example.com:443 HTTP/1.1\r\n")
            assert (b"proxy-authorization: basic" in request.lower()) == (proxy.username is not None)
            await theirs.send_all(answer)
            await theirs.aclose()

        nursery.start_soon(proxy_side)
        with pytest.raises(LinkError, match=why):
            await transports._open_tunnel(ours, proxy, HUB)
