"""The console's web server: an aiohttp app in a process of its own (never the proxy's
listener: nothing is served on the agents' side), the pages and static files from the
package, the JSON API (`api.py`) and the live decision stream (server-sent events).

The pages are shells: static HTML holding no data and no token, served as they are; their
scripts fetch everything from `/api/*` with the token as a header. `serve(config, host,
port, token)` starts it on the running event loop and returns the runner (`await
runner.cleanup()` stops it) and its base address; `egress-guard console` runs it until
Ctrl-C. Access rules (token, Host, actions, headers) are in `auth.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
from pathlib import Path, PurePosixPath
from typing import Any

from aiohttp import web

from egress_guard.config import Config
from egress_guard.console import api
from egress_guard.console.auth import PAGES, Guard, add_headers, host_names, middleware
from egress_guard.store import Filters

STATIC = Path(__file__).resolve().parent / "static"  # resolved: an editable install links each file
POLL = 0.5  # seconds between two reads of the store for the stream
PING = 15.0  # seconds between two keep-alive comments on a quiet stream
MAX_STREAMS = 32  # open decision streams at once (each reads the store twice a second)
STREAM_BATCH = 1000  # rows a stream sends per read; more arrived at once: an `event: gap`

GUARD: web.AppKey[Guard] = web.AppKey("guard", Guard)


class Console:
    """The pages, the static files and the decision stream."""

    def __init__(self, config: Config, guard: Guard, static: Path) -> None:
        self.config, self.guard, self.static = config, guard, static
        self.api = api.Api(config)
        self.closing = asyncio.Event()  # set at shutdown: open streams end at once
        self.streams = 0  # open now

    async def on_shutdown(self, app: web.Application) -> None:
        self.closing.set()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.index),
            *(web.get(f"/{page}", self.page) for page in PAGES),
            web.get("/static/{path:.+}", self.static_file),
            web.get("/api/decisions/stream", self.stream),
            *self.api.routes(),
        ]

    async def index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/live")

    async def page(self, request: web.Request) -> web.StreamResponse:
        """A page's HTML as it is in the package: a shell its scripts fill from the API."""
        name = request.path.strip("/")
        path = self.static / f"{name}.html"
        if not path.is_file():
            return web.Response(
                status=404,
                content_type="text/html",
                text=f"<!doctype html><p>page {html.escape(name)} is not installed ({html.escape(str(path))})</p>",
            )
        return web.FileResponse(path, headers={"Content-Type": "text/html; charset=utf-8"})

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        rel = PurePosixPath(request.match_info["path"])
        if rel.is_absolute() or any(part in ("", "..") or part.startswith(".") for part in rel.parts):
            raise web.HTTPNotFound()
        path = self.static.joinpath(*rel.parts)
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """New audit rows as server-sent events (`event: row`, `id:` the row's id, `data:` the
        row as /api/decisions gives it), read every POLL seconds; a `: ping` comment every
        PING seconds keeps proxies and the browser from closing a quiet stream. Starts after
        the Last-Event-ID a reconnecting client sends, else `after`, else at the newest row:
        only rows written from now on. At most MAX_STREAMS are open at once: the slot is
        taken before the first await (else many arriving together all pass the check) and
        given back however the stream ends."""
        if self.streams >= MAX_STREAMS:
            raise api.ApiError(503, f"{MAX_STREAMS} live streams are open already: close a Live page")
        self.streams += 1
        try:
            return await self._stream(request)
        finally:
            self.streams -= 1

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        filters = api.filters_param(request)
        # A reconnecting client asks the same address again, with the last id it got in
        # Last-Event-ID: that one wins, or the rows since the first `after` would come twice.
        given = request.headers.get("Last-Event-ID") or request.query.get("after") or ""
        if given:
            try:
                after = int(given)
            except ValueError:
                raise api.ApiError(400, f"after={given!r} is not a whole number") from None
        else:
            after = await self.api.run(lambda db: db.last_id())
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "no"}
        )
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n\n")
            await self._send(request, response, filters, after)
        except ConnectionResetError:  # the browser went away
            pass
        return response

    async def _send(self, request: web.Request, response: web.StreamResponse, filters: Filters, after: int) -> None:
        quiet_since = time.monotonic()
        while not self.closing.is_set() and request.transport is not None and not request.transport.is_closing():
            rows = await self._next(filters, after)
            if len(rows) == STREAM_BATCH:
                await response.write(_event("gap", {"before": rows[0]["id"]}, None))
            for row in rows:
                after = row["id"]
                await response.write(_event("row", row, after))
            if rows:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= PING:
                await response.write(b": ping\n\n")
                quiet_since = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), POLL)

    async def _next(self, filters: Filters, after: int) -> list[dict[str, Any]]:
        try:
            return await self.api.run(lambda db: db.rows(filters, STREAM_BATCH, after_id=after))
        except api.ApiError:  # the store is away for a moment: try again at the next poll
            return []


def _event(kind: str, data: Any, event_id: int | None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def make_app(config: Config, guard: Guard, static: Path = STATIC) -> web.Application:
    app = web.Application(middlewares=[middleware(guard), api.errors])
    app[GUARD] = guard
    console = Console(config, guard, static)
    app.add_routes(console.routes())
    app.on_shutdown.append(console.on_shutdown)
    app.on_response_prepare.append(add_headers)
    return app


async def serve(
    config: Config, host: str, port: int, token: str, *, static: Path = STATIC
) -> tuple[web.AppRunner, str]:
    """Start the console on the running loop at host:port (0: a free port). Returns the
    runner (stop: `await runner.cleanup()`) and the base address, http://host:port (a
    browser opens `/#token=TOKEN`; a script sends `Authorization: Bearer TOKEN`)."""
    guard = Guard(token)
    runner = web.AppRunner(make_app(config, guard, static), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    guard.hosts = host_names(host, bound)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"
