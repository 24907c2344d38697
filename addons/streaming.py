"""ResponseStreamer: responses pass through chunk by chunk (SSE, chunked, downloads).

Plain mitmproxy buffers a response until it is complete, so an SSE stream's first event
would only arrive at the end. A pass-through callable streams every response and counts
its bytes for the audit row. It must never raise: mitmproxy drops a chunk on an exception
in a stream callable and carries on.
"""

from __future__ import annotations

from mitmproxy import http

from egress_guard.addons._flow import OWN_RESPONSE, RESPONSE_BYTES, fail_closed
from egress_guard.addons.request_guard import ByteCounter


class ResponseStreamer:
    @fail_closed("response")
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # mitmproxy also calls this hook for responses an addon set (our refusals): leave those.
        if flow.response is not None and not flow.response.stream and not flow.metadata.get(OWN_RESPONSE):
            flow.response.stream = ByteCounter(flow.metadata, RESPONSE_BYTES)
