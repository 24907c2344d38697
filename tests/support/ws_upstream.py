"""A local stand-in for the WebSocket APIs egress-guard must guard, on the same TLS port as
the HTTP ones (`support.llm.LLMHandler`): a client that falls back from WebSocket to HTTP
(Codex CLI does) reaches the same fake API either way.

- `wss://api.openai.com/v1/responses` speaks the Responses API's WebSocket mode: every
  `response.create` gets `response.created`, a streamed message and `response.completed`
  with usage (a `generate: false` warm-up gets only the first and last); every usage it
  reported is recorded, so tests price it themselves. `metadata.x_test: refuse` gets an
  `error` event instead, `hang` a `response.created` and nothing more.
- `wss://api.openai.com/v1/realtime?model=M` speaks enough of the Realtime API: a session,
  `response.create` (and `input_audio_buffer.commit`, as server VAD would) answered with
  `response.done` carrying text and audio token usage.
- `/echo` on any host: echoes every message, and on command sends back the credential it
  received (the real key, on a service host) in a text or binary message, inside one
  message split across frames, split across two messages, or base64'd: the hostile upstream
  the scrubber must defend against.

Like LLMHandler it accepts only the real keys on the API paths. wsproto (a mitmproxy
dependency) speaks the protocol over the handler's own socket.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trustme
import wsproto
import wsproto.events as ev
from wsproto.extensions import PerMessageDeflate

from support.llm import LLMHandler
from support.llm.common import REAL
from support.upstream import Upstream

WS_KEY_HEADER = "sec-websocket-key"


def response_usage(body: dict[str, Any], generate: bool) -> dict[str, Any]:
    """The usage the fake Responses API reports: predictable from the request, with cached
    and reasoning tokens so cache pricing is exercised."""
    items = body.get("input") if isinstance(body.get("input"), list) else []
    input_tokens = 1200 + 10 * len(items)
    output = int(body.get("max_output_tokens") or 40) if generate else 0
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 1024},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": output // 2},
        "total_tokens": input_tokens + output,
    }


def start(ca: trustme.CA) -> Upstream:
    """The fake API, HTTP and WebSocket, on a free TLS port; `state.reported` lists every
    usage it reported."""
    server = Upstream(ca, WSHandler)
    server.state.reported = []  # type: ignore[attr-defined]
    return server


class WSHandler(LLMHandler):
    ws: wsproto.WSConnection
    sequence: int

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/sneaky-upgrade":
            self._sneaky_upgrade()
            return
        if self.headers.get("upgrade", "").lower() != "websocket":
            self.handle_any()
            return
        url = urlsplit(self.path)
        host = (self.headers.get("host") or "").split(":")[0]
        auth = self.headers.get("authorization", "")
        with self.server.state.lock:
            self.server.state.requests.append(
                {
                    "method": "GET",
                    "path": url.path,
                    "query": url.query,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
        if url.path in ("/v1/responses", "/v1/realtime") and auth != f"Bearer {REAL['openai']}":
            self._json(401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
            return
        if url.path not in ("/v1/responses", "/v1/realtime", "/echo"):
            self._json(404, {"error": {"message": f"no WebSocket endpoint {url.path}"}})
            return
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
        raw = f"{self.requestline}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n"
        self.ws.receive_data(raw.encode("latin-1"))
        request = next(e for e in self.ws.events() if isinstance(e, ev.Request))
        offered = "permessage-deflate" in request.extensions if request.extensions else False
        self.wfile.write(self.ws.send(ev.AcceptConnection(extensions=[PerMessageDeflate()] if offered else [])))
        self.wfile.flush()
        self.close_connection = True
        self.sequence = 0
        with contextlib.suppress(OSError):
            self._serve(host, url.path, parse_qs(url.query), auth)

    def _sneaky_upgrade(self) -> None:
        """Answer 101 WebSocket to a request that never asked for one (no Upgrade header):
        mitmproxy judges a WebSocket by the response, so a guard must not only read requests."""
        import hashlib

        key = self.headers.get(WS_KEY_HEADER, "")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.wfile.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            while self.connection.recv(65536):
                pass

    # --- the frame loop ------------------------------------------------------------------

    def _ws_send(self, data: str | bytes, finished: bool = True) -> None:
        message: ev.Event
        if isinstance(data, str):
            message = ev.TextMessage(data=data, message_finished=finished)
        else:
            message = ev.BytesMessage(data=data, message_finished=finished)
        self.wfile.write(self.ws.send(message))
        self.wfile.flush()

    def _ws_event(self, obj: dict[str, Any]) -> None:
        obj.setdefault("sequence_number", self.sequence)
        self.sequence += 1
        self._ws_send(json.dumps(obj))

    def _serve(self, host: str, path: str, query: dict[str, list[str]], auth: str) -> None:
        if path == "/v1/realtime":
            self.model = query.get("model", ["gpt-realtime"])[0]
            self._ws_event({"type": "session.created", "session": {"model": self.model, "object": "realtime.session"}})
        parts: list[str | bytes] = []
        while True:
            data = self.connection.recv(65536)
            if not data:
                return
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, ev.CloseConnection):
                    with self.server.state.lock:
                        self.server.state.requests.append({"ws_close": event.code, "reason": event.reason})
                    self.wfile.write(self.ws.send(event.response()))
                    self.wfile.flush()
                    return
                if isinstance(event, ev.Ping):
                    self.wfile.write(self.ws.send(event.response()))
                    continue
                if isinstance(event, ev.TextMessage | ev.BytesMessage):
                    parts.append(event.data)
                    if not event.message_finished:
                        continue
                    message = "".join(parts) if isinstance(event, ev.TextMessage) else b"".join(parts)  # type: ignore[arg-type]
                    parts = []
                    with self.server.state.lock:
                        self.server.state.requests.append({"ws_message": message, "path": path})
                    if path == "/echo":
                        self._echo(message, auth)
                    elif path == "/v1/responses":
                        self._responses(message)
                    else:
                        self._realtime(message)

    # --- /echo: the hostile upstream --------------------------------------------------------

    def _echo(self, message: str | bytes, auth: str) -> None:
        key = auth.removeprefix("Bearer ")
        if not isinstance(message, str) or not message.startswith("secret:"):
            self._ws_send(message)
            return
        command, _, arg = message.removeprefix("secret:").partition(":")
        if command == "text":
            self._ws_send(json.dumps({"type": "echo", "authorization": auth}))
        elif command == "binary":
            self._ws_send(b"\x00\x01binary " + key.encode() + b" end")
        elif command == "fragmented":  # one message, the key split across three frames
            self._ws_send('{"key": "' + key[:10], finished=False)
            self._ws_send(key[10:30], finished=False)
            self._ws_send(key[30:] + '"}')
        elif command == "split":  # two messages: the first ends with key[:k], the second starts with the rest
            k = int(arg)
            self._ws_send("first part " + key[:k])
            self._ws_send(key[k:] + " second part")
        elif command == "split-slow":  # the same, the second part a second later
            k = int(arg)
            self._ws_send("first part " + key[:k])
            time.sleep(1.0)
            self._ws_send(key[k:] + " second part")
        elif command == "base64":
            self._ws_send(json.dumps({"header": base64.b64encode(f"Bearer {key}".encode()).decode()}))
        elif command in ("close", "ping", "pong"):  # the key in a control frame (no message hook sees these)
            frame = ev.CloseConnection(code=1000, reason=key) if command == "close" else None
            frame = frame or (ev.Ping if command == "ping" else ev.Pong)(payload=key.encode())
            self.wfile.write(self.ws.send(frame))
            self.wfile.flush()
        elif command == "json":  # ordinary JSON messages, none of which may be touched
            for i in range(int(arg)):
                self._ws_send(json.dumps({"type": "ordinary", "i": i, "text": "sk-proj- is how keys start"}))

    # --- the Responses API in WebSocket mode -----------------------------------------------

    def _responses(self, message: str | bytes) -> None:
        try:
            body = json.loads(message)
        except ValueError:
            self._ws_event(
                {"type": "error", "status": 400, "error": {"type": "invalid_request_error", "message": "not JSON"}}
            )
            return
        if body.get("type") != "response.create":
            return  # response.processed and the like: nothing to answer
        test = (body.get("metadata") or {}).get("x_test")
        if test == "refuse":  # the API refuses the call before starting it
            self._ws_event(
                {"type": "error", "status": 400, "error": {"type": "invalid_request_error", "code": "bad_input"}}
            )
            return
        generate = body.get("generate") is not False
        usage = response_usage(body, generate)
        with self.server.state.lock:
            self.server.state.reported.append({"model": body.get("model"), "usage": usage})
        n = len(self.server.state.reported)
        response = {
            "id": f"resp_ws_{n}",
            "object": "response",
            "created_at": 1,
            "status": "in_progress",
            "model": body.get("model"),
            "output": [],
            "usage": None,
        }
        self._ws_event({"type": "response.created", "response": response})
        if test == "hang":  # started, and never finished: the agent gives up
            with self.server.state.lock:
                self.server.state.reported.pop()
            return
        output = []
        if generate:
            item = {"id": f"msg_{n}", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
            self._ws_event({"type": "response.output_item.added", "output_index": 0, "item": item})
            part = {"type": "output_text", "text": "", "annotations": []}
            self._ws_event(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "part": part,
                }
            )
            for piece in ("po", "ng"):
                self._ws_event(
                    {
                        "type": "response.output_text.delta",
                        "item_id": item["id"],
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece,
                    }
                )
            done_part = {"type": "output_text", "text": "pong", "annotations": []}
            self._ws_event(
                {
                    "type": "response.output_text.done",
                    "item_id": item["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "text": "pong",
                }
            )
            self._ws_event(
                {
                    "type": "response.content_part.done",
                    "item_id": item["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "part": done_part,
                }
            )
            item = item | {"status": "completed", "content": [done_part]}
            self._ws_event({"type": "response.output_item.done", "output_index": 0, "item": item})
            output = [item]
        self._ws_event(
            {
                "type": "response.completed",
                "response": response | {"status": "completed", "output": output, "usage": usage},
            }
        )

    # --- the Realtime API ------------------------------------------------------------------

    def _realtime(self, message: str | bytes) -> None:
        try:
            body = json.loads(message)
        except ValueError:
            return
        kind = body.get("type")
        if kind == "session.update":
            session = body.get("session") or {}
            self.model = session.get("model", self.model)
            self._ws_event({"type": "session.updated", "session": {"model": self.model}})
        elif kind in ("response.create", "input_audio_buffer.commit"):
            usage = {
                "total_tokens": 0,
                "input_tokens": 300,
                "output_tokens": 120,
                "input_token_details": {
                    "text_tokens": 100,
                    "audio_tokens": 200,
                    "cached_tokens": 64,
                    "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0},
                },
                "output_token_details": {"text_tokens": 20, "audio_tokens": 100},
            }
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
            with self.server.state.lock:
                self.server.state.reported.append({"model": self.model, "usage": usage})
            response = {"object": "realtime.response", "id": f"resp_rt_{len(self.server.state.reported)}"}
            self._ws_event({"type": "response.created", "response": response | {"status": "in_progress"}})
            self._ws_event({"type": "response.output_audio_transcript.delta", "delta": "hello"})
            self._ws_event({"type": "response.done", "response": response | {"status": "completed", "usage": usage}})
