"""ConfigStore: the site's config as last saved, and the one way to change it on disk.

Every change is a function of the config as it is now, applied and written
under one lock, so that two changes never lose each other and an older
config never lands last. The write (YAML, fsync) runs on a worker thread:
never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from .config import SiteConfig, save_config


class ConfigStore:
    def __init__(self, site_dir: Path, config: SiteConfig) -> None:
        self.site_dir = site_dir
        self.config = config  # as last saved
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<ConfigStore {self.site_dir}>"

    async def update(self, change: Callable[[SiteConfig], SiteConfig]) -> SiteConfig:
        """Save `change(config)` and return it; `config` holds it once it is on disk."""
        async with self._lock:
            config = change(self.config)
            await trio.to_thread.run_sync(save_config, self.site_dir, config)
            self.config = config
            return config
