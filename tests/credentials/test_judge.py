"""The credential verdict, one row per row of the credential table in the docs (plus the rows
behind its footnotes): outcome, reason, status and whether it is flagged. Real fake keys,
made and identified with the real HMAC; no proxy, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from egress_guard.credential_verdict import (
    FLAG,
    CredentialVerdict,
    Origin,
    Presented,
    judge,
    present,
    secret_unavailable,
    unbound_host,
    undecodable_body,
    unreadable_stream,
)
from egress_guard.credentials import Agent, Credential, Service, Slot
from egress_guard.fakekeys import KeyRecord, KeyShape, make_key
from egress_guard.secrets import SecretRef

HMAC = b"k" * 32
NOW = "2026-02-01T12:00:00.000Z"
OPENAI = Service(
    "openai",
    frozenset({"api.openai.com"}),
    (Slot("header", "authorization", "Bearer"),),
    KeyShape("sk-proj-", 156, "base64url"),
    "OPENAI_API_KEY",
    SecretRef("env", name="OPENAI_API_KEY"),
)
ANTHROPIC = Service(
    "anthropic",
    frozenset({"api.anthropic.com"}),
    (Slot("header", "x-api-key"),),
    KeyShape("sk-ant-api03-", 93, "base64url", "AA"),
    "ANTHROPIC_API_KEY",
    SecretRef("env", name="ANTHROPIC_API_KEY"),
)
SERVICES = (OPENAI, ANTHROPIC)
AGENTS = {"researcher": Agent("researcher", ("openai", "anthropic")), "writer": Agent("writer", ("anthropic",))}
KID, KID2 = "0a" * 10, "1b" * 10  # key ids: 80 bits
REAL_OPENAI_KEY = "sk-proj-" + "R" * 40 + "-real"


def record(key_id: str = KID, agent: str = "researcher", **kw: object) -> KeyRecord:
    fields: dict = {
        "key_id": key_id,
        "agent": agent,
        "session": "s1",
        "services": ("openai", "anthropic"),
        "created_at": "2026-02-01T00:00:00.000Z",
        "expires_at": "2026-02-02T00:00:00.000Z",
    }
    fields.update(kw)
    return KeyRecord(**fields)


def key(service: Service, key_id: str = KID) -> str:
    return make_key(HMAC, service.shape, service.name, key_id)


def tampered(text: str) -> str:
    return text[:-1] + ("B" if text[-1] != "B" else "C")


def sent(*values: str, to: Service = OPENAI) -> list[Presented]:
    return [present(HMAC, SERVICES, to, v) for v in values]


def on_openai(
    *values: str,
    rec: KeyRecord | None = None,
    plain_http: str | None = None,
    service: Service = OPENAI,
    origin: str | None = None,
) -> CredentialVerdict:
    records = {rec.key_id: rec} if rec is not None else {}
    return judge(service, sent(*values, to=service), records, AGENTS, NOW, plain_http=plain_http, origin=origin)


ANONYMOUS_OPENAI = Service(**{**OPENAI.__dict__, "anonymous": True})


@dataclass(frozen=True)
class Row:
    the_agent_sent: str
    verdict: Callable[[], CredentialVerdict]
    outcome: Credential
    reason: str  # a stable part of the reason ("" for none)
    status: int | None
    flagged: bool


ROWS = [
    Row(
        "a valid key for this service",
        lambda: on_openai(key(OPENAI), rec=record()),
        Credential.SWAPPED,
        "",
        None,
        False,
    ),
    Row(
        "nothing",
        lambda: on_openai(),
        Credential.MISSING,
        "no openai credential: send the agent's egress-guard key in header authorization (Bearer …)",
        401,
        False,
    ),
    Row(
        "nothing, to an anonymous service",
        lambda: on_openai(service=ANONYMOUS_OPENAI),
        Credential.ANONYMOUS,
        "",
        None,
        False,
    ),
    Row(
        "a key with a wrong tag (forged)",
        lambda: on_openai("sk-proj-" + "A" * 156),
        Credential.FORGED,
        "forged or altered egress-guard key for openai" + FLAG,
        401,
        True,
    ),
    Row(
        "a key with a wrong tag (altered)",
        lambda: on_openai(tampered(key(OPENAI)), rec=record()),
        Credential.FORGED,
        "forged or altered egress-guard key for openai" + FLAG,
        401,
        True,
    ),
    Row(
        "an expired key",
        lambda: on_openai(key(OPENAI), rec=record(expires_at=NOW)),
        Credential.EXPIRED,
        f"egress-guard key {KID} expired at {NOW}; mint a new one",
        401,
        False,
    ),
    Row(
        "a revoked key",
        lambda: on_openai(key(OPENAI), rec=record(revoked_at=NOW, revoked_reason="kill --agent researcher")),
        Credential.REVOKED,
        f"egress-guard key {KID} was revoked (kill --agent researcher)",
        401,
        False,
    ),
    Row(
        "a key unknown to this proxy (revoked by deletion)",
        lambda: on_openai(key(OPENAI)),
        Credential.REVOKED,
        f"egress-guard key {KID} is unknown to this proxy",
        401,
        False,
    ),
    Row(
        "another service's key",
        lambda: on_openai(key(ANTHROPIC), rec=record()),
        Credential.WRONG_SERVICE,
        "this egress-guard key is for anthropic, not openai" + FLAG,
        401,
        True,
    ),
    Row(
        "a key of this service's shape minted for other services",
        lambda: on_openai(key(OPENAI), rec=record(services=("anthropic",))),
        Credential.WRONG_SERVICE,
        f"egress-guard key {KID} was not minted for openai" + FLAG,
        401,
        True,
    ),
    Row(
        "something that is not an egress-guard key",
        lambda: on_openai(REAL_OPENAI_KEY),
        Credential.FOREIGN,
        "the openai credential is not an egress-guard key (a real key smuggled into the agent?)"
        + FLAG
        + "; use the key from 'egress-guard keys mint'",
        401,
        True,
    ),
    Row(
        "a key whose agent may no longer use the service",
        lambda: on_openai(key(OPENAI), rec=record(agent="writer")),
        Credential.NOT_PERMITTED,
        "agent 'writer' may not use openai (agents.writer.services)",
        403,
        False,
    ),
    Row(
        "a key whose agent is no longer configured",
        lambda: on_openai(key(OPENAI), rec=record(agent="gone")),
        Credential.NOT_PERMITTED,
        "agent 'gone' may not use openai (agents.gone.services)",
        403,
        False,
    ),
    Row(
        "another agent's valid key, from an isolated agent's sandbox",
        lambda: on_openai(key(OPENAI), rec=record(agent="writer"), origin="researcher"),
        Credential.NOT_PERMITTED,
        f"egress-guard key {KID} is agent 'writer''s, and this connection comes from agent 'researcher''s sandbox"
        + FLAG,
        403,
        True,
    ),
    Row(
        "a valid key, from a sandbox with no agent",
        lambda: on_openai(key(OPENAI), rec=record(), origin=""),
        Credential.NOT_PERMITTED,
        f"egress-guard key {KID} is agent 'researcher''s, and this connection comes from a sandbox with no agent"
        + FLAG,
        403,
        True,
    ),
    Row(
        "the agent's key for another session, from its sandbox for a session",
        lambda: on_openai(key(OPENAI), rec=record(), origin=Origin("researcher", "s2")),
        Credential.NOT_PERMITTED,
        f"egress-guard key {KID} is session 's1''s, and this connection comes from agent 'researcher''s sandbox"
        " for session 's2'" + FLAG,
        403,
        True,
    ),
    Row(
        "the agent's key for its session, from its sandbox for that session",
        lambda: on_openai(key(OPENAI), rec=record(), origin=Origin("researcher", "s1")),
        Credential.SWAPPED,
        "",
        None,
        False,
    ),
    Row(
        "a valid key, from its own agent's sandbox",
        lambda: on_openai(key(OPENAI), rec=record(), origin="researcher"),
        Credential.SWAPPED,
        "",
        None,
        False,
    ),
    Row(
        "a fake key to a host it is not bound to",
        lambda: unbound_host("openai", "api.test.local", "the body"),
        Credential.UNBOUND_HOST,
        "an egress-guard key for openai was sent to api.test.local in the body" + FLAG,
        403,
        True,
    ),
    Row(
        "a valid key on a plain-HTTP request",
        lambda: on_openai(key(OPENAI), rec=record(), plain_http="api.openai.com:80"),
        Credential.CLEARTEXT,
        "the openai credential is only sent over HTTPS, and this request is plain HTTP "
        "(http://api.openai.com:80); use https://",
        403,
        False,
    ),
    Row(
        "a body whose Content-Encoding does not decode",
        lambda: undecodable_body("gzip", "not a gzip file"),
        Credential.UNREADABLE,
        "the body's Content-Encoding 'gzip' cannot be decoded (not a gzip file), so it cannot be checked",
        400,
        False,
    ),
    Row(
        "a streamed body whose Content-Encoding does not decode (cut)",
        lambda: unreadable_stream("unknown Content-Encoding 'x'"),
        Credential.UNREADABLE,
        "the body cannot be checked for egress-guard keys: unknown Content-Encoding 'x'",
        400,
        False,
    ),
    Row(
        "a valid key, but the secret cannot be read",
        lambda: secret_unavailable(OPENAI, "environment variable OPENAI_API_KEY is not set"),
        Credential.UNAVAILABLE,
        "the openai credential is unavailable: environment variable OPENAI_API_KEY is not set",
        503,
        False,
    ),
    # not a row of its own in the table: the outcome is denied-forged, but nothing is flagged
    Row(
        "two different valid keys in one request",
        lambda: judge(
            OPENAI,
            sent(key(OPENAI), key(OPENAI, KID2)),
            {KID: record(), KID2: record(KID2)},
            AGENTS,
            NOW,
        ),
        Credential.FORGED,
        "more than one openai credential in one request",
        401,
        False,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.the_agent_sent for r in ROWS])
def test_the_credential_table(row: Row) -> None:
    verdict = row.verdict()
    assert (verdict.outcome, verdict.status, verdict.flagged) == (row.outcome, row.status, row.flagged)
    assert row.reason in verdict.reason and (row.reason or not verdict.reason)
    assert verdict.refused == (row.status is not None)
    # the docs: "flagged reasons say so in the audit row" — the words follow the flag
    assert (FLAG in verdict.reason) == verdict.flagged


def test_a_swapped_or_cleartext_verdict_names_the_key_and_no_refusal_of_a_key_does() -> None:
    rec = record()
    assert on_openai(key(OPENAI), rec=rec).key == rec
    assert on_openai(key(OPENAI), rec=rec, plain_http="api.openai.com").key == rec
    assert on_openai(key(OPENAI), rec=record(expires_at=NOW)).key is None
    assert on_openai(key(ANTHROPIC), rec=rec).key is None


def test_the_first_refused_credential_decides_before_the_count_of_keys() -> None:
    # a valid key and a real one: the real one is refused (flagged), not "more than one"
    verdict = on_openai(key(OPENAI), REAL_OPENAI_KEY, rec=record())
    assert (verdict.outcome, verdict.flagged) == (Credential.FOREIGN, True)
    # the same key twice (two slots, or the header repeated) is one credential
    assert on_openai(key(OPENAI), key(OPENAI), rec=record()).outcome == Credential.SWAPPED
    # revocation is checked before expiry, and both before the service
    both = record(revoked_at=NOW, revoked_reason="r", expires_at=NOW, services=("anthropic",))
    assert on_openai(key(OPENAI), rec=both).outcome == Credential.REVOKED
    # another agent's key in a sandbox is flagged whatever the key's state: a stolen key
    stolen = on_openai(key(OPENAI), rec=record(agent="writer", revoked_at=NOW, revoked_reason="r"), origin="researcher")
    assert (stolen.outcome, stolen.flagged, stolen.key) == (Credential.NOT_PERMITTED, True, None)


def test_present_says_what_a_value_is() -> None:
    assert present(HMAC, SERVICES, OPENAI, key(OPENAI)) == Presented(key_id=KID, service="openai")
    assert present(HMAC, SERVICES, OPENAI, key(ANTHROPIC)) == Presented(key_id=KID, service="anthropic")
    assert present(HMAC, SERVICES, OPENAI, tampered(key(OPENAI))) == Presented(shaped=True)
    assert present(HMAC, SERVICES, OPENAI, REAL_OPENAI_KEY) == Presented()
    assert present(b"other" * 8, SERVICES, OPENAI, key(OPENAI)) == Presented(shaped=True)  # another proxy's key
