"""CredentialGuard: swaps the agent's fake key for the real secret, and refuses every other
use of a credential.

Runs after RequestGuard, so the CONNECT target, SNI, Host and the vetted dialled address
already agree. On a service's host: the agent's key must be a genuine, unexpired, unrevoked
egress-guard key for that service and an agent allowed to use it; then the real secret
replaces it in the same place, the agent's proxy credentials are stripped, and the secret's
forms are handed to the response scrubber. Anywhere: an egress-guard key bound to other hosts,
in a header, the URL or the body, is refused as a possible exfiltration. Every refusal is
401/403/503 in the provider's error shape, never a forward.

What to answer is egress_guard.credential_verdict's (pure): this addon only looks up what a
verdict needs (key records, the clock), then swaps the secret in or refuses as told, with a
SECURITY log line when the verdict is flagged.

On a store shared by replicas, a key is used only while the replica can confirm its
revocations are current (`KeyCache.stale`): otherwise, and when the store cannot be read
for a key's record, the request is refused 503 with a reason naming the store — never
served from a possibly stale cache.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from mitmproxy import connection, http

from egress_guard.addons._flow import answered, fail_closed, reject
from egress_guard.addons.bodies import body_stream
from egress_guard.addons.flow import state
from egress_guard.credential_verdict import (
    CredentialVerdict,
    Presented,
    judge,
    present,
    secret_unavailable,
    unbound_host,
    undecodable_body,
    unreadable_stream,
)
from egress_guard.credentials import Credential, FakeKeyScanner, Found, Service, find_credentials, header_value
from egress_guard.decoding import StreamDecoder, decode_all
from egress_guard.fakekeys import KeyRecord
from egress_guard.forms import SecretForms
from egress_guard.keycache import KeyCache
from egress_guard.logscrub import LOG_SCRUBBER
from egress_guard.policy import Decision, Verdict
from egress_guard.secrets import SecretStore, SecretUnavailable
from egress_guard.store import AuditUnavailable, StoreError
from egress_guard.timeutil import now_iso

log = logging.getLogger("egress_guard")


class StreamScanner:
    """A request BodyStream stage: scans the body, decoded as its Content-Encoding says, for
    egress-guard keys bound elsewhere. On a hit — or a body it cannot decode — it drops
    that piece and everything after it and calls `on_hit`, which aborts the connection
    before the body's end is sent: the upstream never sees a complete request."""

    __slots__ = ("check", "decoder", "on_hit", "tail", "tripped", "window")

    def __init__(
        self,
        check: Callable[[bytes], CredentialVerdict | None],
        window: int,
        on_hit: Callable[[CredentialVerdict], None],
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
                self._trip(unreadable_stream(exc))

    def _trip(self, verdict: CredentialVerdict) -> None:
        self.tripped = True
        self.on_hit(verdict)

    def __call__(self, data: bytes, end: bool) -> bytes:
        if self.tripped:
            return b""
        try:
            for plain in self.decoder.feed(data, end) if self.decoder is not None else (data,):
                leak = self.check(self.tail + plain)
                if leak is not None:
                    self._trip(leak)
                    return b""
                self.tail = (self.tail + plain)[-self.window :]
        except ValueError as exc:
            self._trip(unreadable_stream(exc))
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
        origin: Callable[[connection.Client], str | None] = lambda client: None,
    ) -> None:
        self.services = services
        self.agents = agents
        self.by_host = {host: s for s in services for host in s.hosts}
        self.by_name = {s.name: s for s in services}
        self.hmac_key = hmac_key
        self.keys = keys
        self.store = store
        self.cut = cut  # closes a client connection by id (the kill switch's tool too)
        self.origin = origin  # the agent a connection came from by where it came in (a sandbox), else None
        self.scanner = FakeKeyScanner(hmac_key, services)
        self.clients: dict[str, set[str]] = {}  # key id -> client connection ids that used it
        self._forms: dict[str, tuple[str, SecretForms]] = {}  # service -> (its secret, its forms)

    # --- what is where -------------------------------------------------------------------

    def find_leak(self, host: str, data: bytes, where: str) -> CredentialVerdict | None:
        """The refusal of `data` going to `host` if it holds an egress-guard key bound
        elsewhere (in any encoding egress-guard recognises)."""
        for service, _key_id in self.scanner.scan(data):
            if host not in service.hosts:
                return unbound_host(service.name, host, where)
        return None

    def leak(self, host: str, data: bytes, where: str) -> str | None:
        """`find_leak`'s reason: what the WebSocket guard uses."""
        verdict = self.find_leak(host, data, where)
        return verdict.reason if verdict is not None else None

    def _headers_leak(self, host: str, req: http.Request) -> CredentialVerdict | None:
        # names too (a key can hide in a name); all in one pass (a pass per header cost 8x),
        # then, only on a hit, the header is found for the reason
        leak = self.find_leak(host, b"\r\n".join(n + b": " + v for n, v in req.headers.fields), "the headers")
        if leak is not None:
            for name, value in req.headers.fields:
                where = f"header {name[:40].decode(errors='replace')}"
                leak = self.find_leak(host, name + b": " + value, where) or leak
        return leak

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one guard per proxy; keys repeat on every request
    def _present(self, service: str, value: str) -> Presented:
        """What `value` in `service`'s slots is (cached by name: hashing a Service costs more)."""
        return present(self.hmac_key, self.services, self.by_name[service], value)

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
            st.secret_params = frozenset(s.name for s in service.slots if s.kind == "query")
        # The service's own credential slots first (a key there is judged as a credential:
        # wrong service, forged, ...); once swapped, any fake key left anywhere is a leak:
        # every header and the URL, in every encoding forms.views decodes (basic auth's
        # base64 and the URL's percent-encoding included)
        refusal = await self._swap(flow, service) if service is not None else None
        refusal = refusal or self._headers_leak(host, req) or self.find_leak(host, req.path.encode(), "the URL")
        if refusal is not None:
            self._refuse(flow, refusal)
            return
        if req.stream and self.scanner.max_len:
            body_stream(flow, req).add(
                StreamScanner(
                    lambda data: self.find_leak(host, data, "the body"),
                    self.scanner.window,
                    lambda verdict: self._cut_stream(flow, verdict),
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
                leak = self.find_leak(target[0].name, name + b": " + value, "a trailer")
                if leak is not None and flow.request.stream:  # the body went ahead: cut before its end
                    self._cut_stream(flow, leak)
                    return
                if leak is not None:
                    self._refuse(flow, leak)
                    return
        if flow.request.stream:
            return
        if target is None or not flow.request.raw_content:
            return
        encoding = flow.request.headers.get("content-encoding", "")
        try:  # decoded as its Content-Encoding says, every member of it: a key inside gzip is a key
            body = decode_all(encoding, flow.request.raw_content)
        except ValueError as exc:
            self._refuse(flow, undecodable_body(encoding, exc))
            return
        leak = self.find_leak(target[0].name, body, "the body")
        if leak is not None:
            self._refuse(flow, leak)

    def client_disconnected(self, client: connection.Client) -> None:
        for key_id, clients in list(self.clients.items()):
            clients.discard(client.id)
            if not clients:
                del self.clients[key_id]

    # --- the swap ------------------------------------------------------------------------

    async def _judge(self, flow: http.HTTPFlow, service: Service) -> tuple[CredentialVerdict, list[Found]]:
        """Looks up what judging the request's credentials takes, and judges them."""
        req = flow.request
        headers: dict[str, list[str]] = {}
        for name, value in req.headers.fields:
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        query = {k: req.query.get_all(k) for k in req.query} if "?" in req.path else {}
        found = find_credentials(service, headers, query)
        presented = [self._present(service.name, f.value) for f in found]
        records: dict[str, KeyRecord | None] = {}
        for p in presented:
            if p.key_id is not None and p.service == service.name and p.key_id not in records:
                records[p.key_id] = await self.keys.lookup(p.key_id)
        plain_http = None if req.scheme == "https" else req.pretty_host
        origin = self.origin(flow.client_conn)
        verdict = judge(service, presented, records, self.agents, now_iso(), plain_http=plain_http, origin=origin)
        return verdict, found

    async def _swap(self, flow: http.HTTPFlow, service: Service) -> CredentialVerdict | None:
        """Judges the request's credentials and, if they may be used, puts the real secret in
        their places; a refusal, or None."""
        try:
            verdict, found = await self._judge(flow, service)
        except (StoreError, AuditUnavailable, TimeoutError) as exc:  # a key's record cannot be read: fail closed
            why = str(exc) or f"store {self.keys.store.name} did not answer"
            return CredentialVerdict(Credential.STORE_UNAVAILABLE, why, 503)
        st = state(flow)
        key = verdict.key
        if key is not None:  # a usable key (swapped, or refused for plain HTTP) names the request
            st.agent, st.session, st.key_id = key.agent, key.session, key.key_id
        if verdict.refused:
            return verdict
        if key is None:  # anonymous: nothing to swap
            st.credential = verdict.outcome
            return None
        stale = self.keys.stale()  # a shared store: is the key's revocation state known current?
        if stale is not None:
            return CredentialVerdict(Credential.STORE_UNAVAILABLE, stale, 503, key=key)
        try:
            secret = await self.store.get(service.secret)
        except SecretUnavailable as exc:
            return secret_unavailable(service, exc, key)
        req = flow.request
        real = secret.reveal()
        if any(f.slot.kind == "query" for f in found):
            st.agent_path = req.path  # rows record this, never the path with the real key in it
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
        st.credential = verdict.outcome
        self.clients.setdefault(key.key_id, set()).add(flow.client_conn.id)
        return None

    def _refuse(self, flow: http.HTTPFlow, verdict: CredentialVerdict) -> None:
        state(flow).credential = verdict.outcome
        status = verdict.status if verdict.status is not None else 502  # never a forward
        if verdict.flagged:
            log.warning(
                "SECURITY %s: %s (client %s, id %s)",
                verdict.outcome.value,
                verdict.reason,
                flow.client_conn.peername,
                flow.id,
            )
        reject(flow, Decision(Verdict.ERROR if status >= 500 else Verdict.DENY, verdict.reason), status)

    def _cut_stream(self, flow: http.HTTPFlow, verdict: CredentialVerdict) -> None:
        st = state(flow)
        st.credential = verdict.outcome
        st.decision = Decision(Verdict.DENY, verdict.reason)
        st.upload_cut = True
        what = "SECURITY %s: %s (id %s); connection cut" if verdict.flagged else "%s: %s (id %s); connection cut"
        log.warning(what, verdict.outcome.value, verdict.reason, flow.id)
        self.cut(flow.client_conn.id)
