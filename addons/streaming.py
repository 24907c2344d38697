"""ResponseStreamer: responses pass through chunk by chunk (SSE, chunked, downloads), with
the real secret scrubbed out on the way.

Plain mitmproxy buffers a response until it is complete, so an SSE stream's first event
would only arrive at the end. Every response of unknown or large size streams through the
message's BodyStream (addons/bodies.py), which counts its bytes for the audit row. On a
swapped request a scrub stage masks every form of the injected secret (egress_guard.forms:
raw, base64 at any offset, hex, percent and JSON escapes) with a mask of the same length,
holding back only a tail that could be the start of one. A compressed response on a
swapped request, and any small response of known length, is buffered instead (scrubbed
after decoding, then re-encoded). Scrubbing cannot be skipped: if another addon set
`response.stream` first, its setting becomes a stage before the scrub.
"""

from __future__ import annotations

from mitmproxy import http

from egress_guard.addons._flow import OWN_RESPONSE, RESPONSE_BYTES, SCRUB, fail_closed
from egress_guard.addons.bodies import body_stream
from egress_guard.forms import ScrubStream, SecretForms

SCRUB_BUFFERED = "egress_guard.scrub_buffered"
# A small response of known length is forwarded in one piece: streaming it would cost extra
# writes (and TLS records) per response for nothing. Event streams always stream.
BUFFER_UP_TO = 256 * 1024


class Counter:
    """A stage that counts the bytes that pass into flow.metadata[key]."""

    __slots__ = ("key", "metadata")

    def __init__(self, metadata: dict, key: str) -> None:
        self.metadata, self.key = metadata, key
        metadata[key] = 0

    def __call__(self, data: bytes, end: bool) -> bytes:
        self.metadata[self.key] += len(data)
        return data


class Scrubber:
    """A stage that masks every form of the secret, also when one is split across pieces."""

    __slots__ = ("stream",)

    def __init__(self, forms: SecretForms) -> None:
        self.stream = ScrubStream(forms)

    def __call__(self, data: bytes, end: bool) -> bytes:
        out = self.stream.feed(data)
        return out + self.stream.flush() if end else out


def scrub_headers(headers: http.Headers, forms: SecretForms) -> None:
    for name, value in list(headers.fields):
        if forms.scrub(value) != value:
            key = name.decode("latin-1")
            headers.set_all(key, [forms.scrub(v.encode("latin-1")).decode("latin-1") for v in headers.get_all(key)])


class ResponseStreamer:
    @fail_closed("response")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # mitmproxy also calls this hook for responses an addon set (our refusals): leave those.
        response = flow.response
        if response is None or flow.metadata.get(OWN_RESPONSE):
            return
        forms: SecretForms | None = flow.metadata.get(SCRUB)
        if forms is not None:
            scrub_headers(response.headers, forms)
        compressed = response.headers.get("content-encoding", "identity").lower() not in ("identity", "")
        if forms is not None and compressed:
            # a compressed body cannot be scrubbed piece by piece: buffer it, whatever any
            # other addon asked for; decoded, scrubbed and re-encoded in `response`
            response.stream = False
            flow.metadata[SCRUB_BUFFERED] = True
            return
        length = response.headers.get("content-length", "")
        if (
            not response.stream
            and length.isdigit()
            and int(length) <= BUFFER_UP_TO
            and "event-stream" not in response.headers.get("content-type", "")
        ):
            if forms is not None:
                flow.metadata[SCRUB_BUFFERED] = True
            return
        stream = body_stream(flow, response)
        if forms is not None:
            stream.add(Scrubber(forms))
        stream.add(Counter(flow.metadata, RESPONSE_BYTES))

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.metadata.get(SCRUB_BUFFERED) or flow.response is None:
            return
        content = flow.response.get_content(strict=True) or b""  # undecodable -> exception -> killed
        scrubbed = flow.metadata[SCRUB].scrub(content)
        if scrubbed is not content:  # re-encoding costs: only when a secret was found
            flow.response.content = scrubbed
