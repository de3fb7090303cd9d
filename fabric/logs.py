"""Log lines: one per event, naming the site, the peer and the reason; as text or as JSON.

Every task of a running site logs with the site's name (a context variable
set in `Site.run`, which every task it starts inherits), so several sites in
one process (tests, benchmarks) still tell their lines apart. Log calls that
concern a peer pass it, with the reason and a short event name, in `extra`:

    log.warning("link from %s refused: %s", where, exc, extra=event("link_refused", peer=where, reason=exc))

`--log-format text` (the default) is for people: the site in brackets, then
the message, which already says who and why. `--log-format json` is for
machines: one JSON object a line with `ts`, `level`, `site`, `event`,
`peer`, `reason`, `message` (and `exception`, a traceback as one string;
`routing_key` on service events).
"""

from __future__ import annotations

import collections
import contextvars
import datetime as dt
import json
import logging
from collections.abc import Hashable
from typing import IO, Any

FORMATS = ("text", "json")

# The name of the site whose task is logging (None outside any site).
SITE: contextvars.ContextVar[str | None] = contextvars.ContextVar("fabric_site", default=None)


def event(name: str, *, peer: Any = None, reason: Any = None, routing_key: str | None = None) -> dict[str, Any]:
    """`extra=` for a log call: the event's short name, the peer it concerns, and why.

    `routing_key`, for service events, becomes a field of its own in JSON
    (present only on lines that give one).
    """
    fields = {
        "event": name,
        "peer": None if peer is None else str(peer),
        "reason": None if reason is None else str(reason),
    }
    if routing_key is not None:
        fields["routing_key"] = routing_key
    return fields


# Seconds: at most one line per cause this often about what outsiders can make
# happen at will (failed handshakes, cut connections, refused keys); what is
# held back in between is counted and said with the next line.
LINE_INTERVAL = 10.0


class Throttle:
    """At most one line per `interval` seconds for each cause; the ones held back in between are counted.

    For what strangers can make happen at will (failed handshakes): each
    cause is still seen at once, but a flood of it costs one line per
    interval, not one per event. `cause` is any hashable; callers keep the
    set of causes bounded.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval  # seconds
        self._logged_at: dict[Hashable, float] = {}
        self._held: collections.Counter[Hashable] = collections.Counter()

    def admit(self, cause: Hashable, now: float) -> int | None:
        """None: hold this one back (it is counted). Otherwise log it, with how many were held back since the last."""
        logged_at = self._logged_at.get(cause)
        if logged_at is not None and now - logged_at < self.interval:
            self._held[cause] += 1
            return None
        self._logged_at[cause] = now
        return self._held.pop(cause, 0)


def held_back(count: int) -> str:
    """What a throttled line adds about the lines held back before it ("" for none)."""
    return f" ({count} more like it since the last such line)" if count else ""


class SiteFilter(logging.Filter):
    """Gives every record `site`, `event`, `peer` and `reason` (None where the call gave none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "site", None) is None:
            record.site = SITE.get()
        for key in ("event", "peer", "reason"):
            if not hasattr(record, key):
                setattr(record, key, None)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(site_tag)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        site = getattr(record, "site", None)
        record.site_tag = f"[{site}] " if site else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is one string in it)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "site": getattr(record, "site", None),
            "event": getattr(record, "event", None),
            "peer": getattr(record, "peer", None),
            "reason": getattr(record, "reason", None),
            "message": record.getMessage(),
        }
        if (routing_key := getattr(record, "routing_key", None)) is not None:
            document["routing_key"] = routing_key
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False, default=str)


def stream_handler(stream: IO[str], log_format: str = "text") -> logging.Handler:
    """A handler writing one line per record to `stream`, as `log_format` ("text" or "json") says."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(SiteFilter())
    return handler
