"""The site directory: created once with a new identity, loaded at each start.

Blocking file I/O throughout: callers on the event loop run these in a thread.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import attrs

from . import pki
from .config import (
    DEFAULT_LINK_HOST,
    DEFAULT_LISTENER_HOST,
    STATE_DIR,
    Settings,
    SiteConfig,
    config_path,
    load_config,
    save_config,
)
from .errors import ConfigError
from .files import write_private_atomic
from .tokens import grants_path


@attrs.frozen
class SiteFiles:
    """What a site directory holds that a Site starts from."""

    site_dir: Path
    identity: pki.Identity
    config: SiteConfig
    incarnation: int
    grants: dict[str, pki.TokenGrant]


def load(site_dir: Path, *, name: str | None = None, overrides: dict | None = None, advance: bool = False) -> SiteFiles:
    """A site directory's files, checked: it must hold site `name` if given. `overrides` are saved
    into its config; `advance` raises its incarnation, as each start does."""
    if not site_dir.is_dir():
        raise ConfigError(f"no site directory at {site_dir}: create one with `fabric site create NAME`")
    config = load_config(site_dir)
    identity = pki.load_identity(site_dir)
    if name is not None and config.name != name:
        raise ConfigError(f"{site_dir} holds site {config.name!r}, not {name!r}")
    if overrides:
        config = attrs.evolve(config, **overrides)
        save_config(site_dir, config)
    return SiteFiles(site_dir, identity, config, _incarnation(site_dir, advance=advance), pki.load_grants(grants_path(site_dir)))


def _incarnation(site_dir: Path, *, advance: bool) -> int:
    counter = site_dir / STATE_DIR / "incarnation"
    try:
        current = int(counter.read_text()) if counter.exists() else 0
    except ValueError:
        raise ConfigError(f"{counter} does not hold a number") from None
    if advance:
        counter.parent.mkdir(exist_ok=True)
        # Atomically: `site status` reads it while the site starts, and a kill must not leave it empty.
        write_private_atomic(counter, f"{current + 1}\n".encode())
        return current + 1
    return current


def create_site(
    site_dir: str | os.PathLike,
    name: str,
    *,
    link_host: str = DEFAULT_LINK_HOST,
    link_port: int | None = None,
    ws_port: int | None = None,
    mode: str = "interior",
    service_sync: bool = True,
    service_host: str = DEFAULT_LISTENER_HOST,
    settings: Settings | None = None,
) -> None:
    """Write a new site directory (identity, CA, config); refuses to touch an existing one. Blocking."""
    site_dir = Path(site_dir)
    if config_path(site_dir).exists() or (site_dir.exists() and any(site_dir.iterdir())):
        raise ConfigError(f"{site_dir} is not empty: a site is there already, or other files are")
    try:
        config = SiteConfig(
            name=name,
            link_host=link_host,
            link_port=link_port,
            ws_port=ws_port,
            mode=mode,
            service_sync=service_sync,
            service_host=service_host,
            settings=settings or Settings(),
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    existed = site_dir.exists()
    site_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(site_dir, 0o700)
        pki.create_identity(site_dir, name)
        (site_dir / STATE_DIR).mkdir(exist_ok=True)
        save_config(site_dir, config)
    except BaseException:
        # Leave nothing half made, or a retry would find the directory "not empty".
        if not existed:
            shutil.rmtree(site_dir, ignore_errors=True)
        for child in site_dir.iterdir() if existed else ():  # it was empty
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        raise


def prepare(name: str, site_dir: Path, overrides: dict) -> SiteFiles:
    """Create the site directory on first use, load it otherwise; raise the incarnation."""
    if not config_path(site_dir).exists():
        create_site(site_dir, name, **overrides)
        overrides = {}
    return load(site_dir, name=name, overrides=overrides, advance=True)
