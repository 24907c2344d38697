"""A local stand-in for the OpenAI, Anthropic, Gemini and GitHub APIs that accepts ONLY the
real keys (which only egress-guard knows) and answers in each API's own shapes, JSON and
SSE. `/echo` returns the credentials it received, in the body and in a header: the
"upstream that echoes the key" the scrubber must defend against."""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from helpers import _Handler

REAL = {
    "openai": "sk-proj-REALopenaiSECRET0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
    "anthropic": "sk-ant-api03-REALanthropicSECRET0123456789abcdefghijklmnopqrstuvwxyz-AA",
    "google-gemini": "AIzaREALgeminiSECRET0123456789abcdefgh",
    "github": "ghp_REALgithubSECRET0123456789abcdefghijkl",
}
REAL_ENV = {
    "OPENAI_API_KEY": REAL["openai"],
    "ANTHROPIC_API_KEY": REAL["anthropic"],
    "GEMINI_API_KEY": REAL["google-gemini"],
    "GH_TOKEN": REAL["github"],
}


class SlowStream:
    """Controls /v1/slow: events every `interval` seconds until `stop` is set."""

    stop = threading.Event()
    interval = 0.1


class LLMHandler(_Handler):
    def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    compress: str | None = None  # X-Test-Compress: gzip, br or deflate: the stream is sent compressed, whole
    buffer: bytearray

    def _sse_start(self) -> None:
        self.compress = self.headers.get("x-test-compress")
        self.split = bool(self.headers.get("x-test-split"))
        if self.compress:
            self.buffer = bytearray()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    split = False  # X-Test-Split: every byte of the stream goes out as its own HTTP chunk

    def _chunk(self, data: bytes) -> None:
        if self.compress:
            self.buffer += data
        elif self.split:
            for i in range(len(data)):
                super()._chunk(data[i : i + 1])
        else:
            super()._chunk(data)

    def _event(self, data: Any, event: str | None = None) -> None:
        text = (
            f"event: {event}\n" if event else ""
        ) + f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
        self._chunk(text.encode())

    def _end(self) -> None:
        if self.compress:
            import gzip
            import zlib

            import brotli

            encode = {"gzip": gzip.compress, "br": brotli.compress, "deflate": zlib.compress}[self.compress]
            body = encode(bytes(self.buffer))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Encoding", self.compress)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _runaway(self, n: int, event: Any) -> bool:
        """A model that writes `n` text events ("tok ", one token each), whatever max_tokens
        said, until the reader goes away. Records how many it wrote; True if it wrote all."""
        written = 0
        try:
            for _ in range(n):
                event("tok ")
                written += 1
                time.sleep(0.003)
            return True
        except OSError:  # the proxy cut the connection
            return False
        finally:
            with self.server.state.lock:
                self.server.state.runaway.append(written)

    def handle_any(self) -> None:
        raw = self._body()
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        seen = {
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": raw.decode(errors="replace"),
        }
        with self.server.state.lock:
            self.server.state.requests.append(seen)
        body = json.loads(raw) if raw.strip().startswith(b"{") else {}
        host = (self.headers.get("host") or "").split(":")[0]
        auth = self.headers.get("authorization", "")
        if url.path == "/echo-forms":
            # a hostile upstream: the injected key sent back in every encoding egress-guard
            # knows, in pieces of 1 to 7 bytes so that every form straddles pieces
            import base64
            import random

            key = REAL["openai"].encode()
            forms = [
                base64.b64encode(b"Bearer " + key),
                base64.b64encode(b"x" + key),
                base64.urlsafe_b64encode(b"xy" + key),
                key.hex().encode(),
                key.hex().upper().encode(),
                "".join(f"%{b:02X}" for b in key).encode(),
                "".join(f"\\u{b:04x}" if i % 2 else chr(b) for i, b in enumerate(key)).encode(),
                "".join(f"%{b:02x}" if i % 3 else chr(b) for i, b in enumerate(key)).encode(),
            ]
            text = b"data: " + b" | ".join(forms) + b"\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            rng, i = random.Random(7), 0
            while i < len(text):
                n = rng.randint(1, 7)
                super()._chunk(text[i : i + n])
                i += n
            self._end()
            return
        if url.path == "/echo":
            got = {"authorization": auth, "x-api-key": self.headers.get("x-api-key"), "query": url.query}
            # the key in the body, in a header, split across two chunks, base64'd: all must be scrubbed
            import base64

            key = REAL["openai"]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Echo-Authorization", auth)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            text = json.dumps({"received": got, "b64": base64.b64encode(key.encode()).decode()})
            self._chunk(text[: len(text) // 2].encode())
            time.sleep(0.05)
            self._chunk(text[len(text) // 2 :].encode())
            self._end()
            return
        if host in ("api.openai.com", "api.groq.com"):  # Groq: OpenAI's API under /openai/v1
            if auth != f"Bearer {REAL['openai']}":
                self._json(
                    401,
                    {
                        "error": {
                            "message": "Incorrect API key provided",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    },
                )
                return
            if url.path == "/v1/models":
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "openai"}],
                    },
                )
                return
            if url.path == "/v1/slow":
                self._sse_start()
                for i in range(200):
                    if SlowStream.stop.is_set():
                        break
                    self._event({"i": i})
                    time.sleep(SlowStream.interval)
                self._end()
                return
            if url.path == "/v1/embeddings":
                self._json(
                    200,
                    {
                        "object": "list",
                        "model": body.get("model"),
                        "usage": {"prompt_tokens": 8, "total_tokens": 8},
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                    },
                )
                return
            if url.path == "/v1/responses":
                out = body.get("max_output_tokens") or 1
                response = {
                    "id": "resp_1",
                    "object": "response",
                    "created_at": 1,
                    "status": "completed",
                    "model": body.get("model"),
                    "output": [
                        {
                            "type": "message",
                            "id": "msg_1",
                            "role": "assistant",
                            "status": "completed",
                            "content": [{"type": "output_text", "text": "pong", "annotations": []}],
                        }
                    ],
                    "usage": {
                        "input_tokens": 13,
                        "output_tokens": out,
                        "total_tokens": 13 + out,
                        "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens_details": {"reasoning_tokens": 0},
                    },
                }
                if body.get("stream"):
                    self._sse_start()
                    started = response | {"status": "in_progress", "output": [], "usage": None}
                    self._event(
                        {"type": "response.created", "sequence_number": 0, "response": started}, "response.created"
                    )
                    self._event(
                        {"type": "response.completed", "sequence_number": 1, "response": response}, "response.completed"
                    )
                    self._end()
                    return
                self._json(200, response)
                return
            model = body.get("model", "gpt-4o-mini")
            # the "model" writes as many tokens as it may (max_tokens): costs are predictable
            out = body.get("max_completion_tokens") or body.get("max_tokens") or 1
            usage = {"prompt_tokens": 11, "completion_tokens": out, "total_tokens": 11 + out}
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
            if body.get("stream"):
                self._sse_start()
                if body.get("x_runaway"):
                    text = lambda t: self._event(  # noqa: E731
                        chunk | {"choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
                    )
                    if not self._runaway(body["x_runaway"], text):
                        return
                    out = body["x_runaway"]
                    usage = {"prompt_tokens": 11, "completion_tokens": out, "total_tokens": 11 + out}
                for piece in ("po", "ng"):
                    self._event(chunk | {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                self._event(chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event(chunk | {"choices": [], "usage": usage})
                self._event("[DONE]")
                self._end()
                return
            message = {"role": "assistant", "content": "pong"}
            self._json(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                },
            )
            return
        if host == "api.anthropic.com":
            if REAL["anthropic"] not in (self.headers.get("x-api-key"), auth.removeprefix("Bearer ")):
                self._json(
                    401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
                )
                return
            model = body.get("model", "claude-haiku-4-5")
            out = body.get("max_tokens") or 1
            usage_in = {"input_tokens": 5, "cache_read_input_tokens": 2, "cache_creation_input_tokens": 3}
            message = {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage_in | {"output_tokens": 1},
            }
            if body.get("stream"):
                self._sse_start()
                self._event({"type": "message_start", "message": message}, "message_start")
                block = {"type": "text", "text": ""}
                self._event({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start")
                if body.get("x_runaway"):
                    text = lambda t: self._event(  # noqa: E731
                        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
                        "content_block_delta",
                    )
                    if not self._runaway(body["x_runaway"], text):
                        return
                    out = body["x_runaway"]
                delta = {"type": "text_delta", "text": "pong"}
                self._event({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
                self._event({"type": "content_block_stop", "index": 0}, "content_block_stop")
                self._event(
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": out},
                    },
                    "message_delta",
                )
                self._event({"type": "message_stop"}, "message_stop")
                self._end()
                return
            self._json(
                200,
                message
                | {
                    "content": [{"type": "text", "text": "pong"}],
                    "stop_reason": "end_turn",
                    "usage": usage_in | {"output_tokens": out},
                },
            )
            return
        if host == "generativelanguage.googleapis.com":
            if REAL["google-gemini"] not in (self.headers.get("x-goog-api-key"), query.get("key", [None])[0]):
                self._json(401, {"error": {"code": 401, "message": "API key not valid", "status": "UNAUTHENTICATED"}})
                return
            if url.path.endswith(":streamGenerateContent"):
                parts = [
                    {
                        "candidates": [{"content": {"parts": [{"text": "po"}], "role": "model"}}],
                        "modelVersion": "gemini-2.5-flash",
                        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": n, "totalTokenCount": 7 + n},
                    }
                    for n in (1, 2, 3)
                ]
                if query.get("alt") != ["sse"]:  # without alt=sse: one JSON array
                    self._json(200, parts)  # type: ignore[arg-type]
                    return
                self._sse_start()
                for part in parts:
                    self._event(part)
                self._end()
                return
            self._json(
                200,
                {
                    "candidates": [{"content": {"parts": [{"text": "pong"}], "role": "model"}}],
                    "modelVersion": "gemini-2.5-flash",
                    "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 10},
                },
            )
            return
        if host == "api.github.com":
            if auth not in (f"Bearer {REAL['github']}", f"token {REAL['github']}"):
                self._json(401, {"message": "Bad credentials"})
                return
            self._json(200, {"login": "octocat"})
            return
        self._json(200, seen)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any
