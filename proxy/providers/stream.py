"""The stream tap: reads a metered response's usage as it passes (SSE events, or a JSON body
streamed through), follows its running cost, and ends it cleanly at a budget.

Pure (no I/O, no mitmproxy): the SpendGuard addon adds a `StreamTap` as a stage of the
response's BodyStream, and what each API's events mean comes from its provider module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from egress_guard import providers
from egress_guard.pricing import MTOK, Cost, price
from egress_guard.providers.base import Metered, StreamEnd, input_estimate
from egress_guard.spend import SpendSettings

log = logging.getLogger("egress_guard")
ACCUMULATE_LIMIT = 16 * 1024 * 1024  # a JSON body is read for its usage up to this size


class SSEEvents:
    """Splits a byte stream into complete SSE events (any of \\n, \\r\\n, \\r line ends;
    multi-line data joined with \\n). Keeps an incomplete event for the next feed."""

    _BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> Iterator[tuple[bytes, str | None, str]]:
        """(raw event bytes incl. its blank line, event name, data) for each complete event."""
        self.pending += data
        while True:
            m = self._BOUNDARY.search(self.pending)
            if not m:
                return
            raw, self.pending = self.pending[: m.end()], self.pending[m.end() :]
            name, lines = None, []
            for line in re.split(rb"\r\n|\n|\r", raw[: m.start()]):
                key, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if key == b"data":
                    lines.append(value.decode("utf-8", "replace"))
                elif key == b"event":
                    name = value.decode("utf-8", "replace")
            yield raw, name, "\n".join(lines)

    def rest(self) -> bytes:
        out, self.pending = self.pending, b""
        return out


def decode_event(text: str) -> dict[str, Any] | None:
    if not text or text == "[DONE]":
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class RunningCost:
    """What a stream has cost so far, while it runs: the last usage the provider reported
    (Anthropic's message_start, every Gemini chunk), else the reservation's prompt estimate,
    plus the output streamed since, at one token per 4 characters (at least one per event).
    An estimate: it decides when a stream is ended (`spend.on_overrun: cut`), and is what
    such a stream is billed unless the upstream still reports its usage."""

    def __init__(self, settings: SpendSettings, m: Metered) -> None:
        self.settings, self.m = settings, m
        self.api = providers.get(m.api)
        self.input_tokens = input_estimate(m)
        self.base = price(settings, m.pricing, m.model, self.input_tokens, 0)
        self.per_output = (price(settings, m.pricing, m.model, self.input_tokens, 1_000_000) - self.base) / MTOK
        self.reported: Cost | None = None
        self.output_since = 0  # tokens streamed since the last usage report

    def observe(self, data: dict[str, Any], usage: dict[str, Any] | None) -> bool:
        """One event; `usage` is the response object if this event reported usage. True if
        the event carried generated output (only those can be followed by more)."""
        chars = self.api.streamed_text(self.m.flavor, data)
        if chars:
            self.output_since += max(1, math.ceil(chars / 4))
        if usage is not None:
            cost = self.api.cost(self.settings, self.m, usage)
            if cost is not None:
                self.reported, self.output_since = cost, 0
        return chars > 0

    @property
    def output_tokens(self) -> int:
        return (self.reported.output_tokens if self.reported else 0) + self.output_since

    @property
    def usd(self) -> Decimal:
        return (self.reported.usd if self.reported else self.base) + self.per_output * self.output_since

    def cost(self) -> Cost:
        r = self.reported
        return Cost(
            self.usd,
            r.input_tokens if r else self.input_tokens,
            self.output_tokens,
            r.cached_tokens if r else 0,
            r.model if r else self.m.model,
        )


@dataclass
class Overrun:
    """What a tap needs to end an SSE stream that crosses a budget (`spend.on_overrun: cut`)."""

    running: RunningCost
    end: StreamEnd
    over: Callable[[Decimal], str | None]  # the budget a stream costing this much breaks, if any
    cut: Callable[[str, Cost], None]  # called once, when the stream is ended


class StreamTap:
    """A response BodyStream stage that reads usage from SSE events (or a streamed JSON body)
    as they pass, drops the events only a request rewrite made the upstream send (OpenAI's
    usage-only chunk), and hands everything else on unchanged. With an `Overrun`, an SSE
    stream whose running cost breaks a budget is ended after the event that broke it, with
    the API's own closing events; what the upstream sends after that is dropped. An event
    split across pieces is held until it is complete (so a piece may come out empty:
    BodyStream sends nothing for it). It never raises."""

    def __init__(
        self,
        m: Metered,
        sse: bool,
        drop: bool,
        done: Callable[[dict | None], None],
        overrun: Overrun | None = None,
    ) -> None:
        self.m, self.sse, self.drop, self.done = m, sse, drop, done
        self.api = providers.get(m.api)
        self.overrun = overrun if sse else None
        self.events = SSEEvents()
        self.usage = self.api.stream_usage(m.flavor)
        self.body = bytearray()
        self.broken = False
        self.ended = False

    def __call__(self, chunk: bytes, end: bool) -> bytes:
        if self.ended:  # nothing more reaches the agent; usage is still read, to bill it if it comes
            with contextlib.suppress(Exception):
                for _raw, _name, data in self.events.feed(chunk):
                    obj = decode_event(data)
                    if obj is not None:
                        self.usage.observe(obj)
                if end:  # the upstream finished after all (it was not cut): its usage is real
                    self.done(self.usage.response)
            return b""
        if self.broken:
            return chunk
        try:
            if not self.sse:
                if len(self.body) < ACCUMULATE_LIMIT:
                    self.body += chunk
                if end:
                    self.done(self._json_usage())
                return chunk
            out = bytearray()
            for raw, _name, data in self.events.feed(chunk):
                obj = decode_event(data)
                if obj is not None:
                    reported = self.usage.observe(obj)
                    if self.drop and self.api.added(obj):
                        continue
                    if self.overrun is not None and self._crossed(obj, reported, out, raw):
                        return bytes(out)
                out += raw
            if end:
                out += self.events.rest()
                self.done(self.usage.response)
            return bytes(out)
        except Exception:
            log.exception("usage tap failed; passing the stream through unparsed")
            self.broken = True
            return self.events.rest() + chunk

    def _crossed(self, obj: dict, reported: bool, out: bytearray, raw: bytes) -> bool:
        """Follow the running cost; if this event breaks a budget, end the stream after it."""
        o = self.overrun
        assert o is not None
        o.end.observe(obj)
        # Only an event with output is checked: the usage reported at the end (OpenAI's usage
        # chunk, Anthropic's message_delta, response.completed) comes when nothing is left to
        # save, and ending the stream after it would send the agent a second end.
        if not o.running.observe(obj, self.usage.response if reported else None):
            return False
        reason = o.over(o.running.usd)
        if reason is None:
            return False
        self.ended = True
        out += raw + o.end.events(f"stream ended: {reason}", o.running.output_tokens)
        o.cut(reason, o.running.cost())
        return True

    def _json_usage(self) -> dict | None:
        try:
            value = json.loads(bytes(self.body))
        except ValueError:
            return None
        if isinstance(value, list):  # Gemini's streamGenerateContent without alt=sse: a JSON array
            for item in value:
                if isinstance(item, dict):
                    self.usage.observe(item)
            return self.usage.response
        return value if isinstance(value, dict) else None
