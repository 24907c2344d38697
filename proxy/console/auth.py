"""Who may use the console, and how: the access token, the Host check, the checks on an
action, and the headers every answer carries.

The token is a header credential, never an ambient one: every `/api/*` request needs
`Authorization: Bearer TOKEN`, and a cookie counts for nothing (no answer ever sets one).
A cookie would be the wrong place: a browser sends the cookies of 127.0.0.1 to every port on
it, so any local server the operator opens in the same browser (an agent's dev server, say)
would receive it. The pages and `/static/*` are shells holding no data and are served to
anyone who passes the Host check; their scripts read the token from the `#token=` fragment
of the address `egress-guard console` prints (never sent to a server), keep it in the tab's
sessionStorage (per origin: scheme, host and port) and send it as that header.

The Host header must name the address the console listens on (a page on another name that
resolves to 127.0.0.1 — DNS rebinding — is refused before anything else). An action is a
POST with the token, a JSON body, an Origin, when the browser sends one, equal to the
console's own, and a Sec-Fetch-Site, when sent, of same-origin. No CSRF token: a header the
page's script adds is not sent by a browser on another site's behalf. Never logs, echoes or
stores the token.
"""

from __future__ import annotations

import hmac
import html
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
PAGES = ("live", "spend", "denials", "approvals", "agents")
SHELLS = frozenset({"/", *(f"/{page}" for page in PAGES)})  # served without the token

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def is_shell(path: str) -> bool:
    """A page or a static file: no data in it, so no token needed (everything else needs it)."""
    return path in SHELLS or path.startswith("/static/")


@dataclass
class Guard:
    """The console's access rules. `hosts` is filled in once the port is known (port 0 in
    tests: the one the listener got)."""

    token: str
    hosts: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ValueError("the console token is too short: use at least 16 characters (secrets.token_urlsafe)")

    def __repr__(self) -> str:  # never the token
        return f"Guard(hosts={sorted(self.hosts)})"

    def authenticated(self, request: web.Request) -> bool:
        """`Authorization: Bearer TOKEN`, and nothing else (a cookie is ignored)."""
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() != "bearer ":
            return False
        return hmac.compare_digest(auth[7:].strip().encode(), self.token.encode())

    def action_problem(self, request: web.Request) -> str | None:
        """Why this POST is not a console page's action (None: it is)."""
        if request.content_type != "application/json":
            return "an action's body is JSON: send Content-Type: application/json"
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            return f"cross-origin request from {origin!r} refused"
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site != "same-origin":
            return f"a {site} request refused (actions come from the console's own pages)"
        return None


def refuse(request: web.Request, status: int, message: str) -> web.Response:
    """One place makes refusals: JSON for /api, a short page for the rest."""
    if request.path.startswith("/api/"):
        return web.json_response({"error": message}, status=status)
    return page(status, message)


def page(status: int, message: str) -> web.Response:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>egress-guard console</title></head>"
        f"<body><h1>egress-guard console</h1><p>{html.escape(message)}</p></body></html>"
    )
    return web.Response(text=body, status=status, content_type="text/html")


NOT_SIGNED_IN = (
    "Not signed in: send Authorization: Bearer TOKEN. In a browser, open the link "
    "`egress-guard console` printed when it started (http://…/#token=…): its pages send it."
)
QUERY_SIGN_IN = (
    "This address no longer signs in: a token in the query string stays in the browser's history "
    "and reaches the server. Open the link `egress-guard console` prints, with the token after "
    "#token= (http://…/#token=…): the part after # never leaves the browser."
)


def middleware(guard: Guard) -> Any:  # an aiohttp middleware
    """Host check first, for everything; then the pages and static files as they are; then
    the token on the rest, and the action checks on every POST."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.host not in guard.hosts:
            return refuse(
                request,
                421,
                f"this console answers only as {', '.join(sorted(guard.hosts))} (Host {request.host!r} refused)",
            )
        if request.path == "/" and "token" in request.query:
            return page(400, QUERY_SIGN_IN)
        if is_shell(request.path) and request.method in ("GET", "HEAD"):
            return await handler(request)
        if not guard.authenticated(request):
            return refuse(request, 401, NOT_SIGNED_IN)
        if request.method not in ("GET", "HEAD"):
            problem = guard.action_problem(request)
            if problem is not None:
                return refuse(request, 403, problem)
        return await handler(request)

    return check


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the security headers on every answer, refusals and errors too;
    never a cookie."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    response.headers.popall("Set-Cookie", None)
