"""The control API: the same operations on a running site (control socket) and a stopped one (site dir)."""

from __future__ import annotations

import json
import stat

import pytest
import trio

import fabric
from fabric.control import create_site, open_handle, serve
from fabric.control.server import socket_path

DEADLINE = 15  # seconds; everything here is local and takes milliseconds


async def test_changes_to_a_stopped_site_are_saved_and_take_effect_at_its_start(tmp_path, echo_server, tcp):
    create_site(tmp_path / "hub", "hub", link_port=0)
    create_site(tmp_path / "edge", "edge")
    with trio.fail_after(DEADLINE):
        async with open_handle(tmp_path / "edge") as edge:
            assert not edge.running
            listener = await edge.call("create_listener", name="echo", port=0)
            assert listener["port"] == 0  # not bound yet: the site is stopped
        async with open_handle(tmp_path / "hub") as hub:
            await hub.call("create_connector", name="echo", port=echo_server, host="127.0.0.1")
            with pytest.raises(fabric.FabricError, match="start it once"):
                await hub.call("issue_token")  # its link port is picked at the first start
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, tmp_path / "hub")
            async with open_handle(tmp_path / "hub") as hub:
                assert hub.running
                token = (await hub.call("issue_token"))["token"]
            async with open_handle(tmp_path / "edge") as edge:  # redeemed while the edge is stopped
                assert (await edge.call("redeem_token", token=token)) == {"link": "hub"}
            edge_site = await nursery.start(serve, tmp_path / "edge")
            await edge_site.wait_reachable("echo")
            (listener,) = edge_site.status().listeners
            assert listener.port != 0
            stream = await tcp.connect(listener.port)
            async with stream:
                await tcp.echo_round_trip(stream, 10_000)
            nursery.cancel_scope.cancel()


async def test_changes_to_a_running_site_apply_at_once(tmp_path, echo_server, tcp):
    create_site(tmp_path / "hub", "hub", link_port=0)
    create_site(tmp_path / "edge", "edge")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            hub_site = await nursery.start(serve, tmp_path / "hub")
            edge_site = await nursery.start(serve, tmp_path / "edge")
            async with open_handle(tmp_path / "hub") as hub, open_handle(tmp_path / "edge") as edge:
                assert hub.running and edge.running
                await edge.call("redeem_token", token=(await hub.call("issue_token"))["token"])
                await edge.call("wait_link", name="hub")
                await hub.call("create_connector", name="echo", port=echo_server, host="127.0.0.1")
                listener = await edge.call("create_listener", name="echo", port=0)
                assert listener["port"] != 0  # bound now
                await edge_site.wait_reachable("echo")
                stream = await tcp.connect(listener["port"])
                async with stream:
                    await tcp.echo_round_trip(stream, 10_000)

                network = await edge.call("network_status")
                assert {s["name"] for s in network["sites"]} == {"hub", "edge"}
                assert network["services"] == [
                    {"routing_key": "echo", "providers": ["hub"], "listeners": ["echo"], "shared": False, "ignored": []}
                ]
                json.dumps(network)  # plain data all the way down

                # A cost change reaches the accepting end without dropping the link.
                await edge.call("update_link", name="hub", cost=7)
                (incoming,) = hub_site.status().links
                while incoming.cost != 7:
                    await hub_site.router.wait_changed()
                    (incoming,) = hub_site.status().links
                assert incoming.up and edge_site.status().links[0].cost == 7
                # ...and the new cost outlives the link: after a reconnect both ends still have it.
                hub_site.router.links[edge_site.site_id].close()
                await edge_site.wait_linked(hub_site.site_id, up=False)
                await edge_site.wait_linked(hub_site.site_id)
                (incoming,) = hub_site.status().links
                while incoming.cost != 7 or not incoming.up:
                    await hub_site.router.wait_changed()
                    (incoming,) = hub_site.status().links
                assert edge_site.status().links[0].cost == 7

                await edge.call("delete_listener", name="echo")
                with pytest.raises(fabric.FabricError, match="no listener named 'echo'"):
                    await edge.call("delete_listener", name="echo")
                with pytest.raises(OSError):  # the port is closed: nothing listens there any more
                    await trio.open_tcp_stream("127.0.0.1", listener["port"])
            nursery.cancel_scope.cancel()


async def test_a_revoked_site_is_dropped_and_refused_from_then_on(tmp_path):
    create_site(tmp_path / "hub", "hub", link_port=0)
    create_site(tmp_path / "edge", "edge")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            hub_site = await nursery.start(serve, tmp_path / "hub")
            edge_site = await nursery.start(serve, tmp_path / "edge")
            async with open_handle(tmp_path / "hub") as hub, open_handle(tmp_path / "edge") as edge:
                await edge.call("redeem_token", token=(await hub.call("issue_token"))["token"])
                await edge.call("wait_link", name="hub")
                assert (await hub.call("revoke_link", name="edge")) == {"revoked": 1}
                await hub_site.wait_linked(edge_site.site_id, up=False)
                # The edge redials once, is refused, says why, and stops dialling.
                while "not dialling again" not in (edge_site.status().links[0].error or ""):
                    await edge_site.wait_links_changed()
                assert "revoked" in edge_site.status().links[0].error
                assert not hub_site.router.linked(edge_site.site_id)
                with pytest.raises(fabric.FabricError, match="no certificate to a site named 'edge' that is not revoked"):
                    await hub.call("revoke_link", name="edge")
            nursery.cancel_scope.cancel()


async def test_the_control_socket_is_private_and_refuses_nonsense(tmp_path):
    create_site(tmp_path / "hub", "hub")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, tmp_path / "hub")
            assert stat.S_IMODE(socket_path(tmp_path / "hub").stat().st_mode) == 0o600
            async with open_handle(tmp_path / "hub") as hub:
                with pytest.raises(fabric.FabricError, match="unknown operation 'explode'"):
                    await hub.call("explode")
                with pytest.raises(fabric.FabricError, match="bad arguments for create_listener"):
                    await hub.call("create_listener", name="x", prot=1)
                with pytest.raises(fabric.FabricError, match="port must be a port number"):
                    await hub.call("create_listener", name="x", port=70000)
            stream = await trio.open_unix_socket(str(socket_path(tmp_path / "hub")))
            async with stream:
                await stream.send_all(b"{not json\n")
                assert b"malformed control request" in await stream.receive_some(4096)
            with pytest.raises(fabric.FabricError, match="already running"):
                await serve(tmp_path / "hub")
            nursery.cancel_scope.cancel()
    assert not socket_path(tmp_path / "hub").exists()  # removed when the site stops


async def test_a_hand_edited_config_with_a_typo_is_refused_naming_file_and_key(tmp_path):
    create_site(tmp_path / "hub", "hub")
    config = tmp_path / "hub" / "site.yaml"
    config.write_text(config.read_text().replace("link_host:", "link_hots:"))
    with pytest.raises(fabric.ConfigError, match=r"site\.yaml: unknown key link_hots"):
        await serve(tmp_path / "hub")
    with pytest.raises(fabric.ConfigError, match="no site directory at"):
        async with open_handle(tmp_path / "nowhere"):
            pass


async def test_a_site_starting_during_a_change_waits_for_it_and_keeps_it(tmp_path):
    create_site(tmp_path / "hub", "hub")
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            async with open_handle(tmp_path / "hub") as hub:
                assert not hub.running
                started = trio.Event()

                async def run() -> None:
                    await nursery.start(serve, tmp_path / "hub")
                    started.set()

                nursery.start_soon(run)
                await trio.sleep(0.3)  # give the site every chance to start (it must not, yet)
                assert not started.is_set()
                await hub.call("create_listener", name="late", port=0)
            await started.wait()
            async with open_handle(tmp_path / "hub") as hub:
                assert hub.running
                (listener,) = (await hub.call("status"))["listeners"]
                assert listener["name"] == "late" and listener["port"] != 0
            nursery.cancel_scope.cancel()
