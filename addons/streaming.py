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

from egress_guard.addons._flow import fail_closed
from egress_guard.addons.bodies import body_stream
from egress_guard.addons.flow import FlowState, state
from egress_guard.decoding import decode_all
from egress_guard.forms import ScrubStream, SecretForms
from egress_guard.policy import Decision, Verdict

# A small response of known length is forwarded in one piece: streaming it would cost extra
# writes (and TLS records) per response for nothing. Event streams always stream.
BUFFER_UP_TO = 256 * 1024


class Counter:
    """A stage that counts the bytes that pass (into the flow state's `response_bytes`)."""

    __slots__ = ("n", "state")

    def __init__(self, st: FlowState) -> None:
        self.state, self.n = st, 0
        st.response_bytes = 0

    def __call__(self, data: bytes, end: bool) -> bytes:
        self.n += len(data)
        self.state.response_bytes = self.n
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
    """Mask the secret in every value; drop a field whose NAME holds it (a name cannot be
    masked into another valid one)."""
    fields = headers.fields
    joined = b"\n".join(name + b"\n" + value for name, value in fields)
    if forms.scrub(joined) is joined:  # nothing anywhere: one pass instead of two a field
        return
    clean = tuple((name, forms.scrub(value)) for name, value in fields if forms.scrub(name) is name)
    if clean != fields:
        headers.fields = clean


def scrub_response_head(response: http.Response, forms: SecretForms) -> None:
    scrub_headers(response.headers, forms)
    reason = response.data.reason
    if forms.scrub(reason) is not reason:
        response.data.reason = forms.scrub(reason)


class ResponseStreamer:
    @fail_closed("response")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # mitmproxy also calls this hook for responses an addon set (our refusals): leave those.
        response, st = flow.response, state(flow)
        if response is None or st.own_response:
            return
        forms = st.scrub
        if forms is not None:
            scrub_response_head(response, forms)
        if forms is not None and response.headers.get("transfer-encoding", "").replace(" ", "").lower() not in (
            "",
            "chunked",
        ):
            # a transfer coding (gzip, chunked) mitmproxy would pass through undecoded: the
            # secret could hide in it. Refused: the flow is killed before anything is sent.
            st.decision = Decision(
                Verdict.ERROR, "the upstream used a Transfer-Encoding other than chunked on a credentialed response"
            )
            flow.kill()
            return
        compressed = response.headers.get("content-encoding", "identity").lower() not in ("identity", "")
        if forms is not None and compressed:
            # a compressed body cannot be scrubbed piece by piece: buffer it, whatever any
            # other addon asked for; decoded, scrubbed and re-encoded in `response`
            response.stream = False
            st.scrub_buffered = True
            return
        length = response.headers.get("content-length", "")
        if (
            not response.stream
            and length.isdigit()
            and int(length) <= BUFFER_UP_TO
            and "event-stream" not in response.headers.get("content-type", "")
        ):
            if forms is not None:
                st.scrub_buffered = True
            return
        if (
            "content-length" in response.headers
            and flow.request.http_version != "HTTP/1.0"
            and flow.request.method != "HEAD"
            and response.status_code not in (204, 304)
        ):
            # With a Content-Length the last body byte IS the end for the agent (curl stops
            # there over HTTP/2 too): it would hold a complete response before its audit row
            # is committed. Without one, the end is the final chunk (HTTP/2: END_STREAM),
            # which mitmproxy sends only after the `response` hook has waited for the row.
            del response.headers["content-length"]
            if not flow.request.is_http2:
                response.headers["transfer-encoding"] = "chunked"
        stream = body_stream(flow, response)
        if forms is not None:
            stream.add(Scrubber(forms))
        stream.add(Counter(st))

    @fail_closed("response")
    def response(self, flow: http.HTTPFlow) -> None:
        st = state(flow)
        forms = st.scrub
        if forms is not None and flow.response is not None and flow.response.trailers:
            scrub_headers(flow.response.trailers, forms)  # HTTP/2 trailers go out after this hook
        if not st.scrub_buffered or forms is None or flow.response is None:
            return
        # every member, or an exception (undecodable, too big) and the flow is killed
        content = decode_all(flow.response.headers.get("content-encoding", ""), flow.response.raw_content or b"")
        scrubbed = forms.scrub(content)
        if scrubbed is not content:  # re-encoding costs: only when a secret was found
            flow.response.content = scrubbed
