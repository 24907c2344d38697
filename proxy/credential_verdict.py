"""The credential verdict: what egress-guard answers to the credentials an agent sends to a
service's host, and to an egress-guard key found where it may not go.

Pure: no I/O, no clock and no mitmproxy. The addon says what each credential is (`present`,
by its HMAC tag), looks up the key records and reads the clock, and hands them in; it gets
back a `CredentialVerdict`: the audit log's `credential` outcome, the reason the agent and
the audit row see, the status, and whether it is flagged as a possible exfiltration (a
`SECURITY` log line). Every reason and status of the credential table in the docs is written
here and nowhere else; a flagged reason says so in its words too (`FLAG`), as the docs promise,
but `flagged` — not the words — decides the log line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from egress_guard.credentials import Agent, Credential, Service, identify
from egress_guard.fakekeys import KeyRecord, looks_like

FLAG = "; flagged as a possible exfiltration attempt"


class Origin(str):
    """The agent a connection came from by where it came in (a sandbox), as a `str`, with the
    sandbox's session: a key of the same agent but another session is refused there too."""

    session: str | None

    def __new__(cls, agent: str, session: str | None = None) -> Origin:
        self = super().__new__(cls, agent)
        self.session = session
        return self


@dataclass(frozen=True)
class CredentialVerdict:
    outcome: Credential
    reason: str = ""
    status: int | None = None  # None: the request goes on (swapped or anonymous)
    flagged: bool = False  # a possible exfiltration attempt: a SECURITY log line
    key: KeyRecord | None = None  # the genuine, usable key the request is attributed to

    @property
    def refused(self) -> bool:
        return self.status is not None


@dataclass(frozen=True)
class Presented:
    """One credential the agent sent, as its HMAC tag shows it (before any lookup): a genuine
    egress-guard key (its id and the service it was minted under), or not one — then either
    shaped like the service's keys (forged or altered) or something else (foreign)."""

    key_id: str | None = None
    service: str | None = None
    shaped: bool = False


def present(hmac_key: bytes, services: Iterable[Service], service: Service, value: str) -> Presented:
    """What `value`, sent in one of `service`'s credential slots, is."""
    hit = identify(hmac_key, (service,), value) or identify(hmac_key, services, value)
    if hit is not None:
        return Presented(key_id=hit[1], service=hit[0].name)
    return Presented(shaped=looks_like(service.shape, value))


def judge(
    service: Service,
    presented: Sequence[Presented],
    records: Mapping[str, KeyRecord | None],
    agents: Mapping[str, Agent],
    now: str,
    *,
    plain_http: str | None = None,
    origin: str | None = None,
) -> CredentialVerdict:
    """The verdict on the credentials a request to `service`'s host carries.

    `presented`: each credential found in the service's slots, in order; `records`: the key
    record of each genuine key's id (None: unknown to this proxy); `agents`: the configured
    agents; `now`: UTC ISO-8601 as in the records; `plain_http`: the request's host if it is
    plain HTTP (None: HTTPS); `origin`: the agent the connection came from, when egress-guard
    knows it by where it came in (an isolated sandbox of `run --isolate`: "" for a sandbox
    with no agent; an `Origin` also names the sandbox's session), None when only the key can
    say. Evaluated in this order, the first that applies deciding:

    1. nothing presented: anonymous if the service allows it, else denied-missing;
    2. each credential in turn — another service's genuine key (flagged), a forged or
       altered key (flagged), not an egress-guard key (flagged), a key unknown to this proxy,
       another agent's key from a sandbox (flagged, 403: whatever the key's state), or another
       session's key from a sandbox for a session (flagged, 403), a key
       revoked, expired, not minted for this service (flagged), an agent not (or no longer)
       permitted to use the service (403);
    3. more than one key (each valid) in one request: denied-forged;
    4. plain HTTP: denied-cleartext (403), attributed to the key;
    5. swapped, attributed to the key. (A secret that cannot be read is `secret_unavailable`,
       after this: the secret is fetched only for a request judged swapped.)
    """
    if not presented:
        if service.anonymous:
            return CredentialVerdict(Credential.ANONYMOUS)
        where = " or ".join(s.describe() for s in service.slots)
        return CredentialVerdict(
            Credential.MISSING, f"no {service.name} credential: send the agent's egress-guard key in {where}", 401
        )
    keys: list[KeyRecord] = []
    for p in presented:
        verdict = _one(service, p, records, agents, now, origin)
        if isinstance(verdict, CredentialVerdict):
            return verdict
        keys.append(verdict)
    if len({k.key_id for k in keys}) > 1:
        return CredentialVerdict(Credential.FORGED, f"more than one {service.name} credential in one request", 401)
    key = keys[0]
    if plain_http is not None:
        # The real secret only ever travels inside TLS that mitmproxy verifies (ssl_insecure
        # is off): a plain-HTTP request, even to a port a rule allows, would carry it in cleartext.
        return CredentialVerdict(
            Credential.CLEARTEXT,
            f"the {service.name} credential is only sent over HTTPS, and this request is plain HTTP "
            f"(http://{plain_http}); use https://",
            403,
            key=key,
        )
    return CredentialVerdict(Credential.SWAPPED, key=key)


def _one(
    service: Service,
    p: Presented,
    records: Mapping[str, KeyRecord | None],
    agents: Mapping[str, Agent],
    now: str,
    origin: str | None,
) -> CredentialVerdict | KeyRecord:
    """A refusal of one presented credential, or its key record if it may be used."""
    if p.key_id is None:
        if p.shaped:
            return CredentialVerdict(
                Credential.FORGED, f"forged or altered egress-guard key for {service.name}{FLAG}", 401, flagged=True
            )
        return CredentialVerdict(
            Credential.FOREIGN,
            f"the {service.name} credential is not an egress-guard key (a real key smuggled into the agent?)"
            f"{FLAG}; use the key from 'egress-guard keys mint'",
            401,
            flagged=True,
        )
    if p.service != service.name:
        return CredentialVerdict(
            Credential.WRONG_SERVICE,
            f"this egress-guard key is for {p.service}, not {service.name}{FLAG}",
            401,
            flagged=True,
        )
    key_id = p.key_id
    record = records.get(key_id)
    if record is None:
        return CredentialVerdict(Credential.REVOKED, f"egress-guard key {key_id} is unknown to this proxy", 401)
    if origin is not None and record.agent != origin:
        came_from = f"agent {origin!r}'s sandbox" if origin else "a sandbox with no agent"
        return CredentialVerdict(
            Credential.NOT_PERMITTED,
            f"egress-guard key {key_id} is agent {record.agent!r}'s, and this connection comes from {came_from}{FLAG}",
            403,
            flagged=True,
        )
    session = getattr(origin, "session", None)
    if session is not None and record.session != session:
        return CredentialVerdict(
            Credential.NOT_PERMITTED,
            f"egress-guard key {key_id} is session {record.session!r}'s, and this connection comes from "
            f"agent {origin!r}'s sandbox for session {session!r}{FLAG}",
            403,
            flagged=True,
        )
    if record.revoked_at:
        return CredentialVerdict(
            Credential.REVOKED, f"egress-guard key {key_id} was revoked ({record.revoked_reason})", 401
        )
    if record.expires_at <= now:
        return CredentialVerdict(
            Credential.EXPIRED, f"egress-guard key {key_id} expired at {record.expires_at}; mint a new one", 401
        )
    if service.name not in record.services:
        return CredentialVerdict(
            Credential.WRONG_SERVICE,
            f"egress-guard key {key_id} was not minted for {service.name}{FLAG}",
            401,
            flagged=True,
        )
    agent = agents.get(record.agent)
    if agent is None or service.name not in agent.services:
        return CredentialVerdict(
            Credential.NOT_PERMITTED,
            f"agent {record.agent!r} may not use {service.name} (agents.{record.agent}.services)",
            403,
        )
    return record


# --- the other rows of the table: decided by a scan or a lookup, not by the credential ----


def secret_unavailable(service: Service, why: object, key: KeyRecord | None = None) -> CredentialVerdict:
    """The request was judged swapped, but the service's secret cannot be read: 503, for that
    service only. `why` is the secret store's message (it never holds the secret)."""
    return CredentialVerdict(
        Credential.UNAVAILABLE, f"the {service.name} credential is unavailable: {why}", 503, key=key
    )


def unbound_host(key_service: str, host: str, where: str) -> CredentialVerdict:
    """A genuine egress-guard key of `key_service` found in `where` of a request to `host`,
    a host that key is not bound to."""
    return CredentialVerdict(
        Credential.UNBOUND_HOST,
        f"an egress-guard key for {key_service} was sent to {host} in {where}{FLAG}",
        403,
        flagged=True,
    )


def undecodable_body(encoding: str, why: object) -> CredentialVerdict:
    """A buffered body whose Content-Encoding does not decode, so it cannot be checked: 400."""
    return CredentialVerdict(
        Credential.UNREADABLE,
        f"the body's Content-Encoding {encoding!r} cannot be decoded ({why}), so it cannot be "
        "checked for egress-guard keys; send it unencoded or validly encoded",
        400,
    )


def unreadable_stream(why: object) -> CredentialVerdict:
    """A streamed body that cannot be decoded: it is cut where decoding failed."""
    return CredentialVerdict(Credential.UNREADABLE, f"the body cannot be checked for egress-guard keys: {why}", 400)
