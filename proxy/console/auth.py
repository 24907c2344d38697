"""Who may use the console, and how: the access token, the Host check, CSRF, and the
headers every answer carries.

Every request (pages, API, the decision stream, static files) needs the token: `Authorization:
Bearer TOKEN`, or the cookie COOKIE that `GET /?token=TOKEN` sets (HttpOnly, SameSite=Strict)
before redirecting to /live, so the token leaves the address bar and the history. The Host
header must name the address the console listens on (a page on another name that resolves to
127.0.0.1 — DNS rebinding — is refused before the token is even looked at). An action is a
POST with the header `X-CSRF-Token` (an HMAC of the token, put in each page's
`<meta name="csrf">`), a JSON body, and an Origin, when the browser sends one, equal to the
console's own. Never logs, echoes or stores the token.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any

from aiohttp import web

COOKIE = "eg_console"
CSRF_HEADER = "X-CSRF-Token"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def csrf_for(token: str) -> str:
    """The CSRF value of a token: HMAC-SHA256(token, "csrf"), hex. A page carries it; the
    token itself never appears in a page."""
    return hmac.new(token.encode(), b"csrf", hashlib.sha256).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_names(listen_host: str, port: int) -> frozenset[str]:
    """The Host headers the console answers: its listen address (and, on loopback, the
    loopback names: 127.0.0.1, localhost, [::1]) with its port."""
    bare = listen_host.strip("[]")
    shown = f"[{bare}]" if ":" in bare else bare
    names = {f"{shown}:{port}"}
    if is_loopback(bare):
        names |= {f"{name}:{port}" for name in LOOPBACK_NAMES}
    return frozenset(names)


@dataclass
class Guard:
    """The console's access rules. `hosts` is filled in once the port is known (port 0 in
    tests: the one the listener got)."""

    token: str
    hosts: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ValueError("the console token is too short: use at least 16 characters (secrets.token_urlsafe)")
        self.csrf = csrf_for(self.token)

    def __repr__(self) -> str:  # never the token
        return f"Guard(hosts={sorted(self.hosts)})"

    def token_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def authenticated(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return self.token_ok(auth[7:].strip())
        return self.token_ok(_cookie(request))

    def csrf_problem(self, request: web.Request) -> str | None:
        """Why this POST is not a console page's action (None: it is)."""
        given = request.headers.get(CSRF_HEADER)
        if given is None:
            return f"missing {CSRF_HEADER} header (actions come from the console's pages)"
        if not hmac.compare_digest(given.encode(), self.csrf.encode()):
            return f"wrong {CSRF_HEADER} header: reload the page"
        if request.content_type != "application/json":
            return "an action's body is JSON: send Content-Type: application/json"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return f"cross-origin request from {origin!r} refused"
        if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return "cross-site request refused"
        return None


def _cookie(request: web.Request) -> str | None:
    # One parse of the raw header: aiohttp's request.cookies drops a cookie it cannot parse.
    raw = request.headers.get("Cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:  # a malformed Cookie header: no token
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


def refuse(request: web.Request, status: int, message: str) -> web.Response:
    """One place makes refusals: JSON for /api, a short page for the rest."""
    if request.path.startswith("/api/"):
        return web.json_response({"error": message}, status=status)
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>egress-guard console</title></head>"
        f"<body><h1>egress-guard console</h1><p>{html.escape(message)}</p></body></html>"
    )
    return web.Response(text=body, status=status, content_type="text/html")


NOT_SIGNED_IN = (
    "Not signed in. Open the address `egress-guard console` printed when it started "
    "(http://…/?token=…), or send Authorization: Bearer TOKEN."
)


def middleware(guard: Guard) -> Any:  # an aiohttp middleware
    """Host check, then the token (or the token's exchange for the cookie at /?token=),
    then CSRF for every POST."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.host not in guard.hosts:
            return refuse(
                request,
                421,
                f"this console answers only as {', '.join(sorted(guard.hosts))} (Host {request.host!r} refused)",
            )
        if request.path == "/" and "token" in request.query:
            if not guard.token_ok(request.query["token"]):
                return refuse(request, 401, "Wrong token. " + NOT_SIGNED_IN)
            response = web.Response(status=303, headers={"Location": "/live"})
            response.set_cookie(COOKIE, guard.token, httponly=True, samesite="Strict", path="/")
            return response
        if not guard.authenticated(request):
            return refuse(request, 401, NOT_SIGNED_IN)
        if request.method not in ("GET", "HEAD"):
            problem = guard.csrf_problem(request)
            if problem is not None:
                return refuse(request, 403, problem)
        return await handler(request)

    return check


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the security headers on every answer, refusals and errors too."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
