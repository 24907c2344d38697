"""CredentialGuard: swaps the agent's fake key for the real secret, and refuses every other
use of a credential.

Runs after RequestGuard, so the CONNECT target, SNI, Host and the vetted dialled address
already agree. On a service's host: the agent's key must be a genuine, unexpired, unrevoked
egress-guard key for that service and an agent allowed to use it; then the real secret
replaces it in the same place, the agent's proxy credentials are stripped, and the secret's
forms are handed to the response scrubber. Anywhere: an egress-guard key bound to other hosts,
in a header, the URL or the body, is refused as a possible exfiltration. Every refusal is
401/403/503 in the provider's error shape, never a forward.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.bodies import body_stream
from egress_guard.addons.flow import state
from egress_guard.audit import now_iso
from egress_guard.credentials import Credential, FakeKeyScanner, Service, find_credentials, header_value, identify
from egress_guard.decoding import StreamDecoder, decode_all
from egress_guard.fakekeys import looks_like
from egress_guard.forms import SecretForms
from egress_guard.keycache import KeyCache
from egress_guard.logscrub import LOG_SCRUBBER
from egress_guard.policy import Decision, Verdict
from egress_guard.secrets import SecretStore, SecretUnavailable

log = logging.getLogger("egress_guard")
FLAG = "; flagged as a possible exfiltration attempt"


class _Refusal(Exception):
    def __init__(self, credential: Credential, reason: str, status: int) -> None:
        super().__init__(reason)
        self.credential, self.reason, self.status = credential, reason, status


class StreamScanner:
    """A request BodyStream stage: scans the body, decoded as its Content-Encoding says, for
    egress-guard keys bound elsewhere. On a hit — or a body it cannot decode — it drops
    that piece and everything after it and calls `on_hit`, which aborts the connection
    before the body's end is sent: the upstream never sees a complete request."""

    __slots__ = ("check", "decoder", "on_hit", "tail", "tripped", "window")

    def __init__(
        self,
        check: Callable[[bytes], str | None],
        window: int,
        on_hit: Callable[[Credential, str], None],
        encoding: str,
    ) -> None:
        self.check, self.window, self.on_hit = check, window, on_hit
        self.tail = b""
        self.tripped = False
        self.decoder: StreamDecoder | None = None
        if encoding:
            try:
                self.decoder = StreamDecoder(encoding)
            except ValueError as exc:
                self._trip(Credential.UNREADABLE, f"the body cannot be checked for egress-guard keys: {exc}")

    def _trip(self, credential: Credential, why: str) -> None:
        self.tripped = True
        self.on_hit(credential, why)

    def __call__(self, data: bytes, end: bool) -> bytes:
        if self.tripped:
            return b""
        try:
            for plain in self.decoder.feed(data, end) if self.decoder is not None else (data,):
                leak = self.check(self.tail + plain)
                if leak:
                    self._trip(Credential.UNBOUND_HOST, leak)
                    return b""
                self.tail = (self.tail + plain)[-self.window :]
        except ValueError as exc:
            self._trip(Credential.UNREADABLE, f"the body cannot be checked for egress-guard keys: {exc}")
            return b""
        return data


class CredentialGuard:
    def __init__(
        self,
        services: tuple[Service, ...],
        agents: dict,
        hmac_key: bytes,
        keys: KeyCache,
        store: SecretStore,
        cut: Callable[[str], object],
    ) -> None:
        self.services = services
        self.agents = agents
        self.by_host = {host: s for s in services for host in s.hosts}
        self.hmac_key = hmac_key
        self.keys = keys
        self.store = store
        self.cut = cut  # closes a client connection by id (the kill switch's tool too)
        self.scanner = FakeKeyScanner(hmac_key, services)
        self.clients: dict[str, set[str]] = {}  # key id -> client connection ids that used it
        self._forms: dict[str, tuple[str, SecretForms]] = {}  # service -> (its secret, its forms)

    # --- what is where -------------------------------------------------------------------

    def leak(self, host: str, data: bytes, where: str) -> str | None:
        """Why `data` may not go to `host`: it holds an egress-guard key bound elsewhere
        (in any encoding egress-guard recognises). The WebSocket guard uses it too."""
        for service, _key_id in self.scanner.scan(data):
            if host not in service.hosts:
                return f"an egress-guard key for {service.name} was sent to {host} in {where}{FLAG}"
        return None

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one guard per proxy; keys repeat on every request
    def _identify(self, service: str | None, value: str) -> tuple[Service, str] | None:
        """The key's service and id if `value` is a genuine key of `service` (None: of any)."""
        services = self.services if service is None else tuple(s for s in self.services if s.name == service)
        return identify(self.hmac_key, services, value)

    async def _check(self, service: Service, value: str) -> tuple[str, Any]:
        hit = self._identify(service.name, value)  # cached by name: hashing a Service costs more than this
        if hit is None:
            other = self._identify(None, value)
            if other is not None:
                raise _Refusal(
                    Credential.WRONG_SERVICE,
                    f"this egress-guard key is for {other[0].name}, not {service.name}{FLAG}",
                    401,
                )
            if looks_like(service.shape, value):
                raise _Refusal(Credential.FORGED, f"forged or altered egress-guard key for {service.name}{FLAG}", 401)
            raise _Refusal(
                Credential.FOREIGN,
                f"the {service.name} credential is not an egress-guard key (a real key smuggled into the agent?)"
                f"{FLAG}; use the key from 'egress-guard keys mint'",
                401,
            )
        key_id = hit[1]
        record = await self.keys.lookup(key_id)
        if record is None:
            raise _Refusal(Credential.REVOKED, f"egress-guard key {key_id} is unknown to this proxy", 401)
        if record.revoked_at:
            raise _Refusal(Credential.REVOKED, f"egress-guard key {key_id} was revoked ({record.revoked_reason})", 401)
        if record.expires_at <= now_iso():
            raise _Refusal(
                Credential.EXPIRED, f"egress-guard key {key_id} expired at {record.expires_at}; mint a new one", 401
            )
        if service.name not in record.services:
            raise _Refusal(
                Credential.WRONG_SERVICE, f"egress-guard key {key_id} was not minted for {service.name}{FLAG}", 401
            )
        agent = self.agents.get(record.agent)
        if agent is None or service.name not in agent.services:
            raise _Refusal(
                Credential.NOT_PERMITTED,
                f"agent {record.agent!r} may not use {service.name} (agents.{record.agent}.services)",
                403,
            )
        return key_id, record

    # --- hooks ---------------------------------------------------------------------------

    @fail_closed("request")
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if answered(flow):
            return
        req = flow.request
        if "proxy-authorization" in req.headers:  # the agent's proxy credentials stop here
            del req.headers["proxy-authorization"]
        st = state(flow)
        target = st.target
        if target is None or st.dialed is None:
            reject(flow, Decision(Verdict.ERROR, "request reached the credential guard unvetted; refused"), 502)
            return
        host = target[0].name
        service = self.by_host.get(host)
        if service is not None:
            st.service = service.name
        try:
            # The service's own credential slots first (a key there is judged as a credential:
            # wrong service, forged, ...); once swapped, any fake key left anywhere is a leak.
            if service is not None:
                await self._swap(flow, service)
            # every header and the URL, in every encoding forms.views decodes (basic auth's
            # base64 and the URL's percent-encoding included)
            # names too (a key can hide in a name); all in one pass (a pass per header cost 8x),
            # then, only on a hit, the header is found for the reason
            leak = self.leak(host, b"\r\n".join(n + b": " + v for n, v in req.headers.fields), "the headers")
            if leak:
                for name, value in req.headers.fields:
                    leak = self.leak(host, name + b": " + value, f"header {name[:40].decode(errors='replace')}") or leak
                raise _Refusal(Credential.UNBOUND_HOST, leak, 403)
            leak = self.leak(host, req.path.encode(), "the URL")
            if leak:
                raise _Refusal(Credential.UNBOUND_HOST, leak, 403)
        except _Refusal as refusal:
            self._refuse(flow, refusal)
            return
        if req.stream and self.scanner.max_len:
            body_stream(flow, req).add(
                StreamScanner(
                    lambda data: self.leak(host, data, "the body"),
                    self.scanner.window,
                    lambda credential, why: self._cut_stream(flow, credential, why),
                    req.headers.get("content-encoding", ""),
                )
            )

    @fail_closed("request")
    def request(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        if st.upload_cut:
            # the body's end is sent upstream right after this hook: whatever upstream
            # connection opened since the cut (it may still have been connecting) goes too,
            # so the upstream never sees a complete request
            self.cut(flow.client_conn.id)
            return
        if answered(flow) or not self.scanner.max_len:
            return
        target = st.target
        trailers = flow.request.trailers
        if trailers and target is not None:  # HTTP/2 trailers: mitmproxy sends them after this hook
            for name, value in trailers.fields:
                leak = self.leak(target[0].name, name + b": " + value, "a trailer")
                if leak and flow.request.stream:  # the body went ahead: cut before its end
                    self._cut_stream(flow, Credential.UNBOUND_HOST, leak)
                    return
                if leak:
                    self._refuse(flow, _Refusal(Credential.UNBOUND_HOST, leak, 403))
                    return
        if flow.request.stream:
            return
        if target is None or not flow.request.raw_content:
            return
        encoding = flow.request.headers.get("content-encoding", "")
        try:  # decoded as its Content-Encoding says, every member of it: a key inside gzip is a key
            body = decode_all(encoding, flow.request.raw_content)
        except ValueError as exc:
            why = (
                f"the body's Content-Encoding {encoding!r} cannot be decoded ({exc}), so it cannot be "
                "checked for egress-guard keys; send it unencoded or validly encoded"
            )
            self._refuse(flow, _Refusal(Credential.UNREADABLE, why, 400))
            return
        leak = self.leak(target[0].name, body, "the body")
        if leak:
            self._refuse(flow, _Refusal(Credential.UNBOUND_HOST, leak, 403))

    def client_disconnected(self, client: connection.Client) -> None:
        for key_id, clients in list(self.clients.items()):
            clients.discard(client.id)
            if not clients:
                del self.clients[key_id]

    # --- the swap ------------------------------------------------------------------------

    async def _swap(self, flow: http.HTTPFlow, service: Service) -> None:
        req = flow.request
        headers: dict[str, list[str]] = {}
        for name, value in req.headers.fields:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        query = {k: req.query.get_all(k) for k in req.query} if "?" in req.path else {}
        found = find_credentials(service, headers, query)
        if not found:
            if service.anonymous:
                state(flow).credential = Credential.ANONYMOUS
                return
            where = " or ".join(s.describe() for s in service.slots)
            raise _Refusal(
                Credential.MISSING, f"no {service.name} credential: send the agent's egress-guard key in {where}", 401
            )
        checked = [await self._check(service, f.value) for f in found]
        if len({key_id for key_id, _ in checked}) > 1:
            raise _Refusal(Credential.FORGED, f"more than one {service.name} credential in one request", 401)
        key_id, record = checked[0]
        st = state(flow)
        st.agent, st.session, st.key_id = record.agent, record.session, key_id
        if req.scheme != "https":
            # The real secret only ever travels inside TLS that mitmproxy verifies
            # (ssl_insecure is off): a plain-HTTP request, even to a port a rule allows,
            # would carry it in cleartext.
            raise _Refusal(
                Credential.CLEARTEXT,
                f"the {service.name} credential is only sent over HTTPS, and this request is plain HTTP "
                f"(http://{req.pretty_host}); use https://",
                403,
            )
        try:
            secret = await self.store.get(service.secret)
        except SecretUnavailable as exc:
            raise _Refusal(
                Credential.UNAVAILABLE, f"the {service.name} credential is unavailable: {exc}", 503
            ) from None
        real = secret.reveal()
        for f in found:
            if f.slot.kind == "query":
                req.query.set_all(f.slot.name, [real])
            else:
                req.headers[f.slot.name] = header_value(f.slot, real, f.scheme)
        req.headers["accept-encoding"] = "identity"  # so the scrubber can read what comes back
        cached = self._forms.get(service.name)
        if cached is None or cached[0] != real:  # first use, or the secret was rotated
            cached = self._forms[service.name] = (real, SecretForms(real))
            LOG_SCRUBBER.remember(service.name, cached[1])  # an upstream may echo it into mitmproxy's log
        st.scrub = cached[1]
        st.credential = Credential.SWAPPED
        self.clients.setdefault(key_id, set()).add(flow.client_conn.id)

    def _refuse(self, flow: http.HTTPFlow, refusal: _Refusal) -> None:
        state(flow).credential = refusal.credential
        verdict = Verdict.ERROR if refusal.status >= 500 else Verdict.DENY
        if FLAG in refusal.reason:
            log.warning(
                "SECURITY %s: %s (client %s, id %s)",
                refusal.credential.value,
                refusal.reason,
                flow.client_conn.peername,
                flow.id,
            )
        reject(flow, Decision(verdict, refusal.reason), refusal.status)

    def _cut_stream(self, flow: http.HTTPFlow, credential: Credential, why: str) -> None:
        st = state(flow)
        st.credential = credential
        st.decision = Decision(Verdict.DENY, why)
        st.upload_cut = True
        log.warning("SECURITY %s: %s (id %s); connection cut", credential.value, why, flow.id)
        self.cut(flow.client_conn.id)
