"""WebSocket messages guarded across message boundaries: the real secret masked on the way to
the agent (`Relay`), egress-guard keys bound elsewhere found on the way up (`KeyScan`).

A secret (or a key) may be split over messages: both keep what came before. Pure: no
mitmproxy (a message is anything with `content`, `is_text` and `drop()`); the Relay's hold
timer runs on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from egress_guard.forms import SecretForms

HOLD_MIN = 4  # a shorter tail that could begin a secret is let through: it is no secret yet
HOLD_SECONDS = 0.2  # how long a message may wait for the one that shows what its tail is


class Message(Protocol):
    """A WebSocket message as mitmproxy hands it to an addon."""

    content: bytes

    @property
    def is_text(self) -> bool: ...

    def drop(self) -> None: ...


class Relay:
    """Delivers the upstream's messages to the agent with every form of the secret masked.

    mitmproxy hands over whole messages: holding a tail back means holding the message.
    `held` are messages not yet delivered (their content already scrubbed as far as known);
    `in_flight` counts messages injected and not yet seen back in the hook — while any are,
    every new message is queued behind them (injected too), so order is kept. `tail` is the
    end of what the agent already has: a secret that began there is masked where it ends.
    """

    __slots__ = ("forms", "held", "in_flight", "inject", "tail", "timer")

    def __init__(self, forms: SecretForms | None, inject: Callable[[bytes, bool], None]) -> None:
        self.forms, self.inject = forms, inject
        self.tail = b""
        self.held: list[list[Any]] = []  # [content, is_text]
        self.in_flight = 0
        self.timer: asyncio.TimerHandle | None = None

    def upstream(self, msg: Message) -> None:
        if self.forms is None and not self.held and not self.in_flight:
            return  # nothing to mask, nothing queued before it: as it is
        queue = [*self.held, [msg.content, msg.is_text]]
        self.held = []
        keep_from = len(queue)
        if self.forms is not None:
            scrubbed = self.forms.scrub(self.tail + b"".join(c for c, _ in queue))
            pos = len(self.tail)
            for item in queue:
                item[0], pos = scrubbed[pos : pos + len(item[0])], pos + len(item[0])
            hold = self.forms.partial(scrubbed)
            if hold >= HOLD_MIN:  # hold each message that has a byte of that tail
                cut, pos = len(scrubbed) - hold, len(self.tail)
                for i, item in enumerate(queue):
                    if pos + len(item[0]) > cut:
                        keep_from = i
                        break
                    pos += len(item[0])
        release, self.held = queue[:keep_from], queue[keep_from:]
        if len(queue) == 1 and release and not self.in_flight:
            msg.content = release[0][0]  # the message itself goes on, masked
            self._delivered(release[0][0])
        else:
            msg.drop()
            for content, is_text in release:
                self.send(content, is_text)
        if self.held and self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(HOLD_SECONDS, self.flush)
        elif not self.held:
            self.stop()

    def send(self, content: bytes, is_text: bool) -> None:
        """Inject a message to the agent, behind everything already on its way."""
        self.in_flight += 1
        self.inject(content, is_text)
        self._delivered(content)

    def returned(self) -> None:
        """An injected message came back through the hook (it is being delivered)."""
        self.in_flight = max(0, self.in_flight - 1)

    def flush(self) -> None:
        """The hold expired: what was held goes as it is. Its tail was no secret so far; if
        the next message completes one, `tail` has it masked there."""
        self.timer = None
        held, self.held = self.held, []
        for content, is_text in held:
            self.send(content, is_text)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _delivered(self, content: bytes) -> None:
        if self.forms is not None:
            self.tail = (self.tail + content)[-self.forms.max_len :]


class KeyScan:
    """Finds an egress-guard key bound elsewhere in what the agent sends up a connection
    (messages, ping payloads, close reasons), also when it is split across them: each scan
    sees the end of what came before (`window` bytes, enough for any encoding of a key)."""

    __slots__ = ("leak", "tail", "window")

    def __init__(self, leak: Callable[[bytes], str | None], window: int) -> None:
        self.leak, self.window = leak, window
        self.tail = b""

    def __call__(self, data: bytes) -> str | None:
        """Why `data` may not go up (a key bound elsewhere is in it), or None."""
        joined = self.tail + data
        why = self.leak(joined)
        self.tail = joined[-self.window :]
        return why


# --- control frames: ping/pong payloads and close reasons (wsproto events) ----------------------


def masked_control(forms: SecretForms | None, event: Any) -> Any:
    """A control frame to the agent with every form of the secret masked (the same event if
    there was none)."""
    import wsproto.events

    if forms is None:
        return event
    if isinstance(event, wsproto.events.CloseConnection):
        reason = (event.reason or "").encode()
        masked = forms.scrub(reason)
        return event if masked is reason else wsproto.events.CloseConnection(event.code, masked.decode())
    payload = bytes(event.payload)
    masked = forms.scrub(payload)
    return event if masked is payload else type(event)(payload=masked)


def control_data(event: Any) -> bytes:
    """What a control frame carries: a close's reason, a ping's or pong's payload."""
    import wsproto.events

    if isinstance(event, wsproto.events.CloseConnection):
        return (event.reason or "").encode()
    return bytes(event.payload)


def blanked(event: Any, close_code: int) -> Any:
    """The control frame without what it carried (a close goes on with `close_code`)."""
    import wsproto.events

    if isinstance(event, wsproto.events.CloseConnection):
        return wsproto.events.CloseConnection(code=close_code, reason=None)
    return type(event)(payload=b"")
