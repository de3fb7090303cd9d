"""Log lines: text for people, JSON for machines; each names the site, and the peer and reason when given."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fabric import logs


def emit(log_format: str, message: str, *args, site: str | None = "hub", exc: bool = False, **extra) -> str:
    stream = io.StringIO()
    logger = logging.getLogger(f"fabric.test_logs.{log_format}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = logs.stream_handler(stream, log_format)
    logger.addHandler(handler)
    token = logs.SITE.set(site)
    try:
        if exc:
            try:
                raise RuntimeError("boom\nsecond line")
            except RuntimeError:
                logger.exception(message, *args, extra=extra or None)
        else:
            logger.warning(message, *args, extra=extra or None)
    finally:
        logs.SITE.reset(token)
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_lines_carry_site_event_peer_and_reason():
    out = emit("json", "link from %s refused: %s", "10.0.0.1:4000", "bad cert",
               **logs.event("link_refused", peer="10.0.0.1:4000", reason="bad cert"))
    assert out.count("\n") == 1
    line = json.loads(out)
    assert line["site"] == "hub" and line["level"] == "warning" and line["event"] == "link_refused"
    assert line["peer"] == "10.0.0.1:4000" and line["reason"] == "bad cert"
    assert line["message"] == "link from 10.0.0.1:4000 refused: bad cert"
    assert line["ts"].endswith("+00:00")


def test_a_json_line_without_extra_has_nulls_and_a_traceback_stays_on_one_line():
    out = emit("json", "plain", site=None, exc=True)
    assert out.count("\n") == 1
    line = json.loads(out)
    assert (line["site"], line["event"], line["peer"], line["reason"]) == (None, None, None, None)
    assert "RuntimeError: boom" in line["exception"]


def test_text_lines_name_the_site_in_brackets():
    out = emit("text", "link to %s up", "hub", site="edge", **logs.event("link_up", peer="hub"))
    assert out.rstrip().endswith("WARNING [edge] link to hub up")
    assert "[" not in emit("text", "no site here", site=None)


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        logs.stream_handler(io.StringIO(), "xml")


def test_a_throttle_lets_one_line_a_cause_through_per_interval_and_counts_the_rest():
    throttle = logs.Throttle(10.0)
    seen = [
        (throttle.admit(cause, now), cause, now)
        for cause, now in [("a", 0.0), ("a", 1.0), ("b", 1.5), ("a", 9.9), ("a", 10.0), ("a", 12.0), ("a", 25.0)]
    ]
    assert [admitted for admitted, _, _ in seen] == [0, None, 0, None, 2, None, 1]  # b has a line of its own
    assert logs.held_back(0) == "" and logs.held_back(2) == " (2 more like it since the last such line)"
