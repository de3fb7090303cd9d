"""`fabric debug dump`: what a bug report needs, in one tar.gz, with no secret in it.

The config (site.yaml, proxy passwords hidden), status, network status,
recent log lines and versions; of the site directory, site.yaml and a list of
the other files by name and mode. Private keys and token secrets never leave it.
"""

from __future__ import annotations

import io
import json
import os
import platform
import ssl
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from . import __version__
from .addresses import hide_password
from .errors import FabricError, describe
from .files import write_private_atomic

# How the dump reaches the site: `run(body)` awaits body(handle) on a control handle (see cli.Cli.run).
Session = Callable[[Callable[[Any], Awaitable[bool]]], bool]


def write_dump(site_dir: Path, file: Path, run: Session) -> tuple[bool, list[str], list[str]]:
    """Write the dump of the site in `site_dir` to `file` (mode 0600).

    Returns whether the site runs, the dump's member names, and what could not
    be collected, one line each. FabricError when there is no site or `file`
    cannot be written.
    """
    if not (site_dir / "site.yaml").is_file():
        raise FabricError(f"no site directory at {site_dir}: create one with `fabric site create NAME`")
    members: dict[str, bytes] = {}
    problems: list[str] = []
    proxies: set[str] = {os.environ[name] for name in _PROXY_VARIABLES if os.environ.get(name)}

    raw = _read_quietly(site_dir / "site.yaml", problems)
    if raw is not None:
        try:
            document = yaml.safe_load(raw)
        except yaml.YAMLError as error:  # its message quotes the file: say only where
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            why = getattr(error, "problem", None) or "unreadable"
            problems.append(f"site.yaml: not YAML{where} ({why}); left out, as it may hold a proxy password")
        else:
            hidden = _hide_proxies(document, proxies)
            members["site.yaml"] = raw if hidden == document else (
                "# site.yaml as read, with proxy passwords hidden (comments and layout are not the file's)\n"
                + yaml.safe_dump(hidden, sort_keys=False, allow_unicode=True)
            ).encode()

    async def gather(site: Any) -> bool:
        for op, member in (("status", "status.json"), ("network_status", "network-status.json"), ("config", "config.json")):
            try:
                result = _hide_proxies(await site.call(op), proxies)
                members[member] = json.dumps(result, indent=2).encode()
            except FabricError as error:
                problems.append(f"{op}: {describe(error)}")
        try:
            lines = (await site.call("logs")).get("lines", [])
            members["logs.txt"] = "".join(line.rstrip("\n") + "\n" for line in lines).encode()
        except FabricError as error:
            problems.append(f"logs: {describe(error)}")
        return site.running

    try:
        running = run(gather)
    except (FabricError, OSError) as error:  # a broken config is what a dump is often for: keep going
        problems.append(f"control: {describe(error)}")
        running = False
    members["versions.txt"] = _versions().encode()
    members["files.txt"] = _site_files(site_dir).encode()
    # Belt and braces: a password that shows anywhere else (a log line, an error) is hidden too.
    secrets = _password_spellings(proxies)
    for member in list(members):
        members[member] = _scrub(members[member], secrets)
        if b"PRIVATE KEY" in members[member]:  # keys never leave the site directory
            members[member] = b"(left out: it contained a private key)\n"
            problems.append(f"{member}: it contained a private key")
    if problems:
        members["errors.txt"] = _scrub("".join(f"{p}\n" for p in problems).encode(), secrets)
    _write_tar(file, f"fabric-debug-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}", members)
    return running, sorted(members), problems


# The environment's proxy settings: a link without its own dials through them (addresses.proxy_for).
_PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")


def _hide_proxies(data: Any, seen: set[str]) -> Any:
    """`data` (plain JSON or YAML data) with every `proxy` setting's password hidden; the settings go to `seen`."""
    if isinstance(data, dict):
        hidden = {}
        for key, value in data.items():
            if key == "proxy" and isinstance(value, str):
                seen.add(value)
                hidden[key] = hide_password(value)
            else:
                hidden[key] = _hide_proxies(value, seen)
        return hidden
    if isinstance(data, list):
        return [_hide_proxies(value, seen) for value in data]
    return data


def _password_spellings(proxies: Iterable[str]) -> set[bytes]:
    """The passwords of these proxy settings, as they may show in text: as given, %-decoded, and JSON-escaped."""
    spellings = set()
    for setting in proxies:
        hidden = hide_password(setting)
        if hidden == setting:
            continue  # no password
        before, _, after = hidden.partition(":***@")
        given = setting[len(before) + 1 : len(setting) - len(after) - 1]
        for password in filter(None, {given, unquote(given)}):
            for text in (password, json.dumps(password)[1:-1], json.dumps(password, ensure_ascii=False)[1:-1]):
                spellings.add(text.encode())
    return spellings


def _scrub(data: bytes, secrets: Iterable[bytes]) -> bytes:
    for secret in sorted(secrets, key=len, reverse=True):  # the longest first: one may hold another
        data = data.replace(secret, b"***")
    return data


def _read_quietly(path: Path, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as error:
        problems.append(f"{path.name}: {describe(error)}")
        return None


def _versions() -> str:
    from importlib import metadata

    def installed(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    lines = [
        ("fabric", __version__),
        ("python", sys.version.replace("\n", " ")),
        ("openssl", ssl.OPENSSL_VERSION),
        ("platform", platform.platform()),
        *((package, installed(package)) for package in ("trio", "cryptography", "attrs", "cattrs", "click", "pyyaml")),
    ]
    return "".join(f"{name}: {value}\n" for name, value in lines)


def _site_files(site_dir: Path) -> str:
    """The site directory's files (names, sizes, modes; no contents): what is there, and its permissions."""
    lines = []
    for path in sorted(site_dir.rglob("*")):
        try:
            info = path.lstat()
        except OSError:
            continue
        kind = "d" if path.is_dir() else "-"
        lines.append(f"{kind}{info.st_mode & 0o777:04o} {info.st_size:>8} {path.relative_to(site_dir)}")
    return "\n".join(lines) + "\n"


def _write_tar(file: Path, top: str, members: dict[str, bytes]) -> None:
    now = time.time()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    try:
        write_private_atomic(file, buffer.getvalue())  # 0600 from the first byte: it tells a lot about the site
    except OSError as error:
        raise FabricError(f"cannot write {file}: {describe(error)}") from None
