"""The WebSocket scrubbing relay, message by message: a secret is masked wherever the upstream
splits it, messages keep their order, boundaries and frame types, and ordinary messages are
never held or changed. Real mitmproxy WebSocketMessage objects; the proxy's part (an injected
message comes back through the hook, then goes out) is played by `Agent`."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.websocket import WebSocketMessage
from wsproto.frame_protocol import Opcode

from egress_guard.forms import SecretForms
from egress_guard.ws_relay import HOLD_MIN, HOLD_SECONDS, Relay

SECRET = "sk-proj-REALopenaiSECRET0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"
FORMS = SecretForms(SECRET)


class Agent:
    """What the agent receives, in order, through a Relay."""

    def __init__(self, forms: SecretForms | None = FORMS) -> None:
        self.got: list[tuple[bytes, bool]] = []
        self.injected: list[tuple[bytes, bool]] = []
        self.relay = Relay(forms, lambda content, is_text: self.injected.append((content, is_text)))

    def upstream(self, content: bytes, is_text: bool = True, *, deliver_injected: bool = True) -> None:
        msg = WebSocketMessage(Opcode.TEXT if is_text else Opcode.BINARY, False, content)
        self.relay.upstream(msg)
        if not msg.dropped:
            self.got.append((msg.content, msg.is_text))
        if deliver_injected:
            self.deliver()

    def deliver(self) -> None:
        """The proxy relays the injected messages: each passes the hook (returned), then out."""
        while self.injected:
            content, is_text = self.injected.pop(0)
            self.relay.returned()
            self.got.append((content, is_text))

    @property
    def stream(self) -> bytes:
        return b"".join(c for c, _ in self.got)


def no_secret(data: bytes) -> bool:
    return FORMS.scrub(data) == data and SECRET.encode() not in data


@pytest.mark.parametrize("k", range(1, len(SECRET)))
async def test_a_secret_split_at_any_offset_never_arrives_whole(k: int) -> None:
    agent = Agent()
    first, second = b"one " + SECRET[:k].encode(), SECRET[k:].encode() + b" two"
    agent.upstream(first)
    agent.upstream(second)
    agent.relay.stop()
    assert [len(c) for c, _ in agent.got] == [len(first), len(second)]  # boundaries kept
    assert no_secret(agent.stream)
    if k >= HOLD_MIN:  # the first was held for the second: none of the secret's start got out
        assert SECRET[:k].encode() not in agent.got[0][0]


async def test_a_secret_split_over_many_small_messages() -> None:
    agent = Agent()
    for i in range(0, len(SECRET), 5):
        agent.upstream(SECRET[i : i + 5].encode(), is_text=bool(i % 2))
    await asyncio.sleep(HOLD_SECONDS * 2)
    agent.deliver()
    assert b"".join(c for c, _ in agent.got) == FORMS.scrub(SECRET.encode())
    assert [t for _, t in agent.got] == [bool(i % 2) for i in range(0, len(SECRET), 5)]  # types kept


async def test_ordinary_json_is_never_held_or_changed() -> None:
    agent = Agent()
    for i in range(100):
        text = json.dumps({"type": "response.output_text.delta", "delta": "sk-proj-" if i % 3 else "s", "i": i})
        msg = WebSocketMessage(Opcode.TEXT, False, text.encode())
        agent.relay.upstream(msg)
        assert not msg.dropped and msg.content == text.encode()  # passed on in place
    assert agent.injected == [] and agent.relay.held == []


async def test_a_held_message_goes_on_after_the_hold_and_the_rest_is_masked_later() -> None:
    agent = Agent()
    agent.upstream(b"tail " + SECRET[:30].encode())
    assert agent.got == []  # held
    await asyncio.sleep(HOLD_SECONDS * 2)
    agent.deliver()
    assert agent.got == [(b"tail " + SECRET[:30].encode(), True)]  # as it was: no secret yet
    agent.upstream(SECRET[30:].encode() + b" end")
    assert agent.got[1][0] == FORMS.scrub(SECRET.encode())[30:] + b" end"
    assert no_secret(agent.stream)


async def test_messages_behind_an_injected_one_wait_their_turn() -> None:
    """While injected messages are on their way, later ones are queued behind them."""
    agent = Agent()
    agent.upstream(b"a " + SECRET[:20].encode(), deliver_injected=False)  # held
    agent.upstream(SECRET[20:].encode(), deliver_injected=False)  # releases both, injected
    agent.upstream(b"{}", deliver_injected=False)  # must not overtake them
    agent.deliver()
    assert [c for c, _ in agent.got][-1] == b"{}"
    assert len(agent.got) == 3 and no_secret(agent.stream)


async def test_without_a_secret_messages_pass_as_they_are() -> None:
    agent = Agent(forms=None)
    msg = WebSocketMessage(Opcode.BINARY, False, SECRET.encode())
    agent.relay.upstream(msg)
    assert not msg.dropped and msg.content == SECRET.encode()  # an unbound host: nothing to mask
