"""A local stand-in for the OpenAI, Anthropic, Gemini and GitHub APIs that accepts ONLY the
real keys (which only egress-guard knows) and answers in each API's own shapes, JSON and
SSE. One fake per provider (`openai`, `anthropic`, `google`, `github`), each a key check and
a route table; `common` holds what they share, and the routes every host answers before any
key check (`/echo`, `/echo-forms`: the upstream that echoes the key, which the scrubber must
defend against). A host no fake claims gets back what it sent, as JSON."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from support.llm import anthropic, github, google, openai
from support.llm.common import ANY_HOST, Fake, FakeAPI, Request, route_for

FAKES: list[Fake] = [openai.FAKE, anthropic.FAKE, google.FAKE, github.FAKE]


def fake_for(host: str) -> Fake | None:
    return next((fake for fake in FAKES if host in fake.hosts), None)


class LLMHandler(FakeAPI):
    def handle_any(self) -> None:
        raw = self._body()
        url = urlsplit(self.path)
        seen = {
            "method": self.command,
            "path": url.path,
            "query": url.query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": raw.decode(errors="replace"),
        }
        with self.server.state.lock:
            self.server.state.requests.append(seen)
        req = Request(
            method=self.command,
            path=url.path,
            query=url.query,
            params=parse_qs(url.query),
            headers=self.headers,
            body=json.loads(raw) if raw.strip().startswith(b"{") else {},
        )
        if handle := route_for(ANY_HOST, req.method, req.path):
            handle(self, req)
            return
        fake = fake_for((self.headers.get("host") or "").split(":")[0])
        if fake is None:
            self._json(200, seen)
            return
        if not fake.authorized(req):
            self._json(401, fake.unauthorized)
            return
        if handle := route_for(fake.routes, req.method, req.path):
            handle(self, req)
            return
        self._json(404, {"error": f"no route for {req.method} {req.path}"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_any
