"""ConfigStore: every change of site.yaml is applied to the config as it is then, one at a time."""

from __future__ import annotations

import attrs
import pytest
import trio

from fabric.config import ConnectorConfig, SiteConfig, load_config, save_config
from fabric.store import ConfigStore


async def test_concurrent_changes_are_all_kept_in_memory_and_on_disk(tmp_path):
    config = SiteConfig(name="a")
    save_config(tmp_path, config)
    store = ConfigStore(tmp_path, config)

    async def add(name: str) -> None:
        connector = ConnectorConfig(name=name, routing_key=name, port=80)
        await store.update(lambda c: attrs.evolve(c, connectors=(*c.connectors, connector)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for name in ("a", "b", "c", "d"):
                nursery.start_soon(add, name)
    assert sorted(c.name for c in store.config.connectors) == ["a", "b", "c", "d"]
    assert load_config(tmp_path) == store.config


async def test_a_change_that_fails_to_be_written_is_not_taken(tmp_path):
    store = ConfigStore(tmp_path / "gone", SiteConfig(name="a"))  # no directory to write into
    with pytest.raises(OSError):
        await store.update(lambda c: attrs.evolve(c, service_sync=False))
    assert store.config.service_sync
