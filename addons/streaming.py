"""ResponseStreamer: responses pass through chunk by chunk (SSE, chunked, downloads), with
the real secret scrubbed out on the way.

Plain mitmproxy buffers a response until it is complete, so an SSE stream's first event
would only arrive at the end. A pass-through callable streams every response and counts
its bytes for the audit row. On a swapped request the callable also replaces every form of
the injected secret with a mask of the same length (the body's framing stays valid), holding
back only a tail that could be the start of a secret. A compressed response on a swapped
request, and any small response of known length, is buffered instead (scrubbed after
decoding, then re-encoded). Stream callables must never
raise: mitmproxy drops a chunk on an exception and carries on.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from egress_guard.addons._flow import OWN_RESPONSE, RESPONSE_BYTES, SCRUB, fail_closed
from egress_guard.addons.request_guard import ByteCounter

log = logging.getLogger("egress_guard")
SCRUB_BUFFERED = "egress_guard.scrub_buffered"
# A small response of known length is forwarded in one piece: streaming it would cost extra
# writes (and TLS records) per response for nothing. Event streams always stream.
BUFFER_UP_TO = 256 * 1024


def mask(length: int) -> bytes:
    return b"[REDACTED-by-egress-guard]"[:length].ljust(length, b"*")


def scrub(data: bytes, forms: list[bytes]) -> bytes:
    for form in forms:
        if form in data:
            data = data.replace(form, mask(len(form)))
    return data


class Scrubber:
    """A stream callable removing `forms` even when one is split across chunks."""

    __slots__ = ("forms", "inner", "pending")

    def __init__(self, forms: list[bytes], inner: ByteCounter) -> None:
        self.forms, self.inner, self.pending = forms, inner, b""

    def _hold(self, data: bytes) -> int:
        """Length of the longest tail of `data` that is a proper prefix of a form."""
        best = 0
        for form in self.forms:
            for k in range(min(len(form) - 1, len(data)), best, -1):
                if data.endswith(form[:k]):
                    best = k
                    break
        return best

    def __call__(self, chunk: bytes) -> bytes:
        try:
            data = scrub(self.pending + chunk, self.forms)
            hold = self._hold(data) if chunk else 0
            out, self.pending = data[: len(data) - hold], data[len(data) - hold :]
        except Exception:  # never let a chunk through unscrubbed
            log.exception("scrubber failed; dropping the chunk")
            out, self.pending = b"", b""
        return self.inner(out)


class ResponseStreamer:
    @fail_closed("response")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # mitmproxy also calls this hook for responses an addon set (our refusals): leave those.
        response = flow.response
        if response is None or response.stream or flow.metadata.get(OWN_RESPONSE):
            return
        forms: list[bytes] | None = flow.metadata.get(SCRUB)
        length = response.headers.get("content-length", "")
        if (
            length.isdigit()
            and int(length) <= BUFFER_UP_TO
            and "event-stream" not in response.headers.get("content-type", "")
        ):
            if forms:
                self._scrub_headers(response, forms)
                flow.metadata[SCRUB_BUFFERED] = True
            return
        if forms:
            self._scrub_headers(response, forms)
            if response.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
                flow.metadata[SCRUB_BUFFERED] = True  # decoded, scrubbed, re-encoded in `response`
                return
            response.stream = Scrubber(forms, ByteCounter(flow.metadata, RESPONSE_BYTES))
            return
        response.stream = ByteCounter(flow.metadata, RESPONSE_BYTES)

    @staticmethod
    def _scrub_headers(response: http.Response, forms: list[bytes]) -> None:
        for name, value in list(response.headers.fields):
            if scrub(value, forms) != value:
                key = name.decode("latin-1")
                response.headers.set_all(
                    key, [scrub(v.encode("latin-1"), forms).decode("latin-1") for v in response.headers.get_all(key)]
                )

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.get(SCRUB_BUFFERED) or flow.response is None:
            return
        content = flow.response.get_content(strict=True) or b""  # undecodable -> exception -> killed
        scrubbed = scrub(content, flow.metadata[SCRUB])
        if scrubbed is not content:  # re-encoding costs: only when a secret was found
            flow.response.content = scrubbed
