"""Glue for two things egress-guard needs from mitmproxy's HTTP layer that its hooks do not give.

1. An `error` hook may answer. When a flow fails before any response reached the agent
   (upstream unreachable, TLS failed or hung, upstream hung up, a request head mitmproxy's
   validation refused), mitmproxy 12.2 sends its own HTML error page and ignores any
   response an addon set (mitmproxy PR #7999 proposes what is done here). The wrapped
   HttpStream methods put a `Failure` in the flow state before the `error` hook (what
   mitmproxy would send); if the hook sets a new `flow.response`, the agent gets that
   response in place of mitmproxy's page, in whatever protocol it speaks (HTTP/1, HTTP/2).
2. Refusals before any flow. A request head mitmproxy's HTTP/1 parser refuses (percent-encoded
   host, user:password@ URL, a broken header line) or an HTTP/2 protocol error from the agent
   (Host ≠ :authority) never becomes a flow, so no flow hook sees it. The wrappers raise the
   hook `egress_guard_parser_refusal` (a `ParserRefusal`) instead, so it can be recorded.

Only the commands the wrapped generators yield are looked at or replaced; mitmproxy's state
machine stays its own. Written against mitmproxy 12.2; `install()` refuses other versions
rather than guess, and the end-to-end tests fail if a new release changes what is wrapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import wsproto.events
from mitmproxy import connection, http, version
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import (
    ErrorCode,
    HttpErrorHook,
    HttpStream,
    RequestData,
    RequestHeaders,
    RequestProtocolError,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
    SendHttp,
)
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Connection
from mitmproxy.proxy.layers.websocket import WebsocketConnection
from mitmproxy.utils import human

from egress_guard.addons.flow import Failure, state

_Gen = Generator[Any, Any, Any]


@dataclass
class ParserRefusal:
    """A request refused by mitmproxy's parser before it became a flow."""

    client: connection.Client
    message: str  # mitmproxy's words; may quote the agent's bytes (pass it through safe_text)
    status: int | None  # what the agent got: 400 (HTTP/1 error page) or None (HTTP/2 GOAWAY)
    request: http.Request | None  # the head, when it parsed and only its body framing was refused


@dataclass
class EgressGuardParserRefusalHook(commands.StartHook):
    """Raised (without waiting for it) when the agent's request was refused by the parser."""

    refusal: ParserRefusal
    blocking = False


def _answering(original: Callable[..., _Gen], failure_of: Callable[..., Failure]) -> Callable[..., _Gen]:
    """Wrap an HttpStream generator that raises `error` and then sends mitmproxy's error page."""

    @functools.wraps(original)
    def wrapper(self: HttpStream, *args: Any) -> _Gen:
        flow = self.flow
        gen = original(self, *args)
        answer: http.Response | None = None
        answered = False
        try:
            command = next(gen)
            while True:
                if isinstance(command, HttpErrorHook) and answer is None:
                    failure = failure_of(self, *args)
                    state(flow).failure = failure
                    before = flow.response
                    reply = yield command
                    if failure.status is not None and flow.response is not None and flow.response is not before:
                        answer = flow.response
                    command = gen.send(reply)
                elif (
                    answer is not None
                    and not answered
                    and isinstance(command, SendHttp)
                    and command.connection is self.context.client
                    and isinstance(command.event, ResponseProtocolError)
                    and command.event.code.http_status_code() is not None
                ):
                    # mitmproxy's error page for the agent: send the hook's answer instead. Like
                    # the page, it ends the connection (HTTP/1): what follows a failure, e.g. a
                    # body whose framing the parser refused, is not read as a next request.
                    answered = True
                    answer.headers["connection"] = "close"
                    body = answer.raw_content or b""
                    yield SendHttp(ResponseHeaders(self.stream_id, answer, end_stream=not body), self.context.client)
                    if body:
                        yield SendHttp(ResponseData(self.stream_id, body), self.context.client)
                    command = next(gen)
                else:
                    reply = yield command
                    command = gen.send(reply)
        except StopIteration as stop:
            result = stop.value
        if answered:
            yield SendHttp(ResponseEndOfMessage(self.stream_id), self.context.client)
        return result

    return wrapper


def _protocol_error_failure(self: HttpStream, event: Any) -> Failure:
    # the agent hung up (its error may wait in the queue while the upstream's is handled)
    agent_gone = isinstance(event, RequestProtocolError) or any(
        isinstance(e, RequestProtocolError) for e in self._paused_event_queue
    )
    to_agent = (
        not agent_gone
        and self.client_state != self.state_errored
        and self.server_state != self.state_stream_response_body  # headers already went out
    )
    return Failure(event.code.http_status_code() if to_agent else None, agent_gone)


def _invalid_failure(self: HttpStream, request: bool) -> Failure:
    code = ErrorCode.REQUEST_VALIDATION_FAILED if request else ErrorCode.RESPONSE_VALIDATION_FAILED
    return Failure(code.http_status_code(), request)


def _body_size_failure(self: HttpStream, request: bool) -> Failure:
    code = ErrorCode.REQUEST_TOO_LARGE if request else ErrorCode.RESPONSE_TOO_LARGE
    return Failure(code.http_status_code(), request)


def _refusing_http1(original: Callable[..., _Gen]) -> Callable[..., _Gen]:
    """Http1Server.read_headers: a head the parser refused becomes a hook, not a half flow."""

    @functools.wraps(original)
    def read_headers(self: Http1Server, event: Any) -> _Gen:
        gen = original(self, event)
        refused = False
        try:
            command = next(gen)
            while True:
                reply = None
                if isinstance(command, commands.SendData) and command.data.startswith(b"HTTP/1.1 400 "):
                    refused = True  # the parser's 400 page; what follows says why
                    reply = yield command
                elif refused and isinstance(command, commands.Log):
                    message = command.message.removeprefix(f"{human.format_address(self.conn.peername)}: ")
                    yield EgressGuardParserRefusalHook(ParserRefusal(self.context.client, message, 400, None))
                    reply = yield command
                elif refused and isinstance(command, ReceiveHttp) and isinstance(command.event, RequestHeaders):
                    # The head parsed and its body framing did not: mitmproxy would go on with
                    # a flow that can only fail (and the guards would judge it). Record the
                    # refusal instead; the connection is already closing.
                    request = command.event.request
                    message = "invalid request"
                    command = next(gen)
                    reason = isinstance(command, ReceiveHttp) and isinstance(command.event, RequestProtocolError)
                    if reason:
                        message = command.event.message
                    yield EgressGuardParserRefusalHook(ParserRefusal(self.context.client, message, 400, request))
                    if reason:
                        command = next(gen)
                    continue
                else:
                    reply = yield command
                command = gen.send(reply)
        except StopIteration as stop:
            return stop.value

    return read_headers


def _refusing_http2(original: Callable[..., _Gen]) -> Callable[..., _Gen]:
    """Http2Connection.protocol_error: the agent's HTTP/2 protocol error becomes a hook."""

    @functools.wraps(original)
    def protocol_error(self: Http2Connection, message: str, *args: Any) -> _Gen:
        if self.conn is self.context.client:
            yield EgressGuardParserRefusalHook(ParserRefusal(self.context.client, message, None, None))
        return (yield from original(self, message, *args))

    return protocol_error


def _no_empty_data(original: Callable[..., _Gen]) -> Callable[..., _Gen]:
    """HttpStream.state_stream_*_body: an empty DATA frame (HTTP/2 allows one mid-stream) is
    dropped before the stream callable sees it. mitmproxy would call the callable with b"",
    its signal for the END of the body: a scrubber would release the start of a secret it
    held back, and the rest would follow unmasked."""

    @functools.wraps(original)
    def state(self: HttpStream, event: Any) -> _Gen:
        if isinstance(event, (RequestData, ResponseData)) and not event.data:
            return None
        return (yield from original(self, event))

    return state


# connection id (the agent's, the upstream's) -> the WebSocket guard's filter for control
# frames sent on it; set at websocket_start, dropped at websocket_end
WS_CONTROL: dict[str, Callable[[Any], Any]] = {}


def _blank(event: Any) -> Any:
    """A control frame without its payload or reason (what goes when no guard could check it)."""
    if isinstance(event, wsproto.events.CloseConnection):
        return wsproto.events.CloseConnection(code=event.code, reason=None)
    return type(event)(payload=b"")


def _filtering_send2(original: Callable[..., Any]) -> Callable[..., Any]:
    """WebsocketConnection.send2: mitmproxy relays ping/pong payloads and close reasons
    without any hook (websocket_message sees data messages only), so an upstream could send
    the secret back in one and an agent a key out. Each connection carries the WebSocket
    guard's filter (`WS_CONTROL`, by connection id); a connection without one sends them blank."""

    @functools.wraps(original)
    def send2(self: Any, event: Any) -> Any:
        if isinstance(event, (wsproto.events.Ping, wsproto.events.Pong, wsproto.events.CloseConnection)):
            check = WS_CONTROL.get(self.conn.id)
            try:
                event = check(event) if check is not None else _blank(event)
            except Exception:  # fail closed: the frame goes out empty
                event = _blank(event)
        return original(self, event)

    return send2


_PATCHES: list[tuple[type, str, Callable[[Callable[..., _Gen]], Callable[..., _Gen]]]] = [
    (WebsocketConnection, "send2", _filtering_send2),
    (HttpStream, "state_stream_request_body", _no_empty_data),
    (HttpStream, "state_stream_response_body", _no_empty_data),
    (HttpStream, "handle_protocol_error", lambda f: _answering(f, _protocol_error_failure)),
    (HttpStream, "check_invalid", lambda f: _answering(f, _invalid_failure)),
    (HttpStream, "check_body_size", lambda f: _answering(f, _body_size_failure)),
    (Http1Server, "read_headers", _refusing_http1),
    (Http2Connection, "protocol_error", _refusing_http2),
]


def install() -> None:
    """Wrap the methods above, once per process. Raises RuntimeError on a mitmproxy that is not 12.2."""
    if not version.VERSION.startswith("12.2."):
        raise RuntimeError(
            f"egress-guard's mitmproxy glue is written for mitmproxy 12.2, not {version.VERSION}: "
            "install mitmproxy>=12.2,<12.3"
        )
    for cls, name, wrap in _PATCHES:
        current = cls.__dict__[name]
        if not getattr(current, "_egress_guard", False):
            wrapped = wrap(current)
            wrapped._egress_guard = True  # type: ignore[attr-defined]
            setattr(cls, name, wrapped)
