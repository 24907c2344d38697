"""The escalation webhook: a POST that tells someone a request is waiting (`notify`), and the
signed callback by which they answer it (`CallbackServer`). Both directions are signed with
one HMAC key (`escalation.webhook.secret_file`), the way Stripe signs its webhooks, but each
over a message of its own, so that one can never stand in for the other:

    X-Egress-Guard-Signature: t=<unix seconds>,v1=<hex hmac-sha256(key, message)>
    notification:  message = f"{t}.notify.{body}"
    callback:      message = f"{t}.callback.{approval_id}.{body}"   (the id from the URL path)

A receiver recomputes it over the raw body, compares in constant time and refuses a `t`
more than TOLERANCE seconds away. The callback's message binds the approval id, so a signed
answer to one escalation cannot be replayed against another; and the server takes each
signature once (`Replays`): a captured answer cannot be sent again. The key, and the webhook URL
(whose path often is a token: Slack's, Teams'), never appear in a log line, an exception or
a repr: a failure names only the URL's scheme, host and port.

The notification is one try with a 5 s deadline: a webhook that is down costs one log line,
and the request still waits for an answer from the CLI. No proxy from the environment is
used (the proxy itself may be in HTTPS_PROXY).

The callback server is deliberately tiny: HTTP/1.1, one request per connection, `POST
/approvals/<id>` only, bodies up to 64 KiB, at most MAX_CONNECTIONS connections at once
(each may take READ_TIMEOUT to send its request: beyond the limit a connection is closed
unanswered, so a flood of idle sockets costs a bounded amount). What a decision does is not its business: it
hands (id, decision, scope, note, by) to the `decide` coroutine it was given (Escalations),
which writes the same DecideApproval the CLI writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from egress_guard.secrets import Secret

log = logging.getLogger("egress_guard.escalation")

HEADER = "X-Egress-Guard-Signature"
TOLERANCE = 300  # seconds a signature's timestamp may differ from now
NOTIFY_TIMEOUT = 5.0
MAX_BODY = 64 * 1024
MAX_HEAD = 8 * 1024
READ_TIMEOUT = 10.0
MAX_CONNECTIONS = 32  # callback connections served at once; one more is closed at once


# --- signatures ---------------------------------------------------------------------------


def read_secret(path: Path) -> Secret:
    """The HMAC key in `path` (surrounding whitespace stripped). Raises ValueError naming the
    file (never its content) if it cannot be read or is empty."""
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"webhook secret_file {path}: cannot be read ({type(exc).__name__})") from None
    if not value:
        raise ValueError(f"webhook secret_file {path} is empty: put a random key in it (e.g. openssl rand -hex 32)")
    return Secret(value)


NOTIFY = "notify"  # what a notification's signature covers: f"{t}.notify.{body}"


def callback_purpose(approval_id: str) -> str:
    """What a callback's signature covers, besides t and the body: its direction and the id."""
    return f"callback.{approval_id}"


def _mac(secret: Secret, t: int, purpose: str, body: bytes) -> str:
    message = f"{t}.{purpose}.".encode() + body
    return hmac.new(secret.reveal().encode(), message, hashlib.sha256).hexdigest()


def sign(secret: Secret, body: bytes, purpose: str, now: float | None = None) -> str:
    """The signature header's value for `body` sent for `purpose` (NOTIFY, or
    callback_purpose(id))."""
    t = int(time.time() if now is None else now)
    return f"t={t},v1={_mac(secret, t, purpose, body)}"


def _fields(header: str) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    return parts


def signed_at(header: str | None) -> int | None:
    """The signature header's t (the first one: what verify checks), or None."""
    try:
        return int(_fields(header or "")["t"][0])
    except (KeyError, ValueError):
        return None


def verify(secret: Secret, header: str | None, body: bytes, purpose: str, now: float | None = None) -> str | None:
    """None if `header` signs `body` for `purpose` with `secret` within TOLERANCE; else why
    not (for the 401's body: never the expected value)."""
    if not header:
        return f"missing {HEADER} header"
    parts = _fields(header)
    t = signed_at(header)
    if t is None:
        return f"{HEADER} has no t=<unix seconds>"
    if abs((time.time() if now is None else now) - t) > TOLERANCE:
        return f"{HEADER} timestamp is more than {TOLERANCE} s from now (a replay, or a clock off)"
    expected = _mac(secret, t, purpose, body)
    if not any(hmac.compare_digest(expected, v) for v in parts.get("v1", [])):
        return f"{HEADER} does not match (wrong key, the body or the approval id changed, or not signed as a callback)"
    return None


class Replays:
    """The callback signatures accepted within the last TOLERANCE seconds: each is taken once
    (a captured answer cannot be sent again; sign every attempt anew). Only a holder of the
    key can add one, and each leaves after TOLERANCE, so it stays small."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}  # what a signature signed -> when it may be forgotten

    def __len__(self) -> int:
        return len(self._seen)

    def take(self, header: str | None, purpose: str, body: bytes, now: float | None = None) -> bool:
        """Remember a verified signature; False if it was taken already. Keyed by what it
        signs (t, purpose, body), not by the header's text, which can be respelled."""
        now = time.time() if now is None else now
        key = f"{signed_at(header)}.{purpose}.{hashlib.sha256(body).hexdigest()}"
        if len(self._seen) > 1024:
            self._seen = {k: until for k, until in self._seen.items() if until > now}
        until = self._seen.get(key)
        if until is not None and until > now:
            return False
        self._seen[key] = now + 2 * TOLERANCE  # its t may be up to TOLERANCE in the future
        return True


# --- the notification ---------------------------------------------------------------------


def shown_url(url: str) -> str:
    """What a log line may say of a webhook URL: scheme, host and port (its path, query and
    user info may be a credential)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}"


async def post(url: str, body: bytes, headers: dict[str, str], timeout: float = NOTIFY_TIMEOUT) -> int:
    """POST `body` to `url` once (HTTP/1.1, no proxy); the response's status. Raises OSError,
    TimeoutError or ValueError (a URL it cannot use)."""
    return await asyncio.wait_for(_post(url, body, headers), timeout)


async def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the webhook URL must be http(s)://host/...")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=context, server_hostname=parts.hostname if context else None
    )
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        lines = [
            f"POST {target} HTTP/1.1",
            f"Host: {host}" + (f":{parts.port}" if parts.port else ""),
            "User-Agent: egress-guard",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        fields = status_line.split()
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
            raise OSError("the webhook did not answer HTTP")
        return int(fields[1])
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def notify(url: str, secret: Secret | None, payload: dict[str, Any], timeout: float = NOTIFY_TIMEOUT) -> bool:
    """POST `payload` (JSON, signed if there is a key) once; True on a 2xx. A failure is
    logged (the URL's host, never its path or the key) and returns False."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {HEADER: sign(secret, body, NOTIFY)} if secret is not None else {}
    where = shown_url(url)
    try:
        status = await post(url, body, headers, timeout)
    except TimeoutError:
        log.warning("escalation webhook %s: no answer within %g s; the request waits for the CLI", where, timeout)
        return False
    except (OSError, ValueError) as exc:
        log.warning(
            "escalation webhook %s failed (%s); the request waits for the CLI", where, type(exc).__name__ + _why(exc)
        )
        return False
    if not 200 <= status < 300:
        log.warning("escalation webhook %s answered %d; the request waits for the CLI", where, status)
        return False
    return True


def _why(exc: BaseException) -> str:
    # an OSError's text names an address at most; a ValueError here is ours (no URL in it)
    text = str(exc)
    return f": {text}" if text and "://" not in text else ""


# --- the callback server ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]


_ID = re.compile(r"[0-9a-f]{1,64}")
Decide = Callable[[str, str, str | None, str | None, str], Awaitable[Reply]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    503: "Service Unavailable",
}


class CallbackServer:
    """`POST /approvals/<id>` with a JSON body {"decision": "approve"|"deny", "scope":
    "once"|"session"|"always", "note": …, "by": …}, signed for this id (callback_purpose),
    each signature once. 401 before anything else if the
    signature is bad or stale (an unsigned caller learns nothing, not even whether an id
    exists); then `decide` answers (404 unknown, 409 not pending, 200 done)."""

    def __init__(self, listen: tuple[str, int], secret: Callable[[], Secret | None], decide: Decide) -> None:
        self.listen = listen
        self._secret = secret
        self._decide = decide
        self._server: asyncio.Server | None = None
        self.replays = Replays()
        self.connections = 0  # served now
        self.turned_away = 0  # closed at once: MAX_CONNECTIONS were being served

    def __repr__(self) -> str:
        return f"CallbackServer({self.listen[0]}:{self.listen[1]})"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen; raises OSError (the address in use, ...) naming the address."""
        host, port = self.listen
        try:
            self._server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            raise OSError(f"escalation callback_listen {host}:{port}: {exc.strerror or exc}") from None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            self.turned_away += 1
            if self.turned_away == 1 or self.turned_away % 1000 == 0:
                log.warning(
                    "escalation callback: %d connections open; closing new ones (%d so far)",
                    MAX_CONNECTIONS,
                    self.turned_away,
                )
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        self.connections += 1
        try:
            await self._answer(reader, writer)
        finally:
            self.connections -= 1

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                reply = await asyncio.wait_for(self._handle(reader), READ_TIMEOUT)
            except TimeoutError:
                reply = Reply(408, {"error": "request not received in time"})
            except Exception:
                log.exception("escalation callback: handling a request failed")
                reply = Reply(503, {"error": "the decision could not be handled; try again or use the CLI"})
            body = json.dumps(reply.body).encode()
            head = (
                f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, '')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader) -> Reply:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return Reply(413, {"error": "headers too large"})
        except asyncio.IncompleteReadError:
            return Reply(400, {"error": "incomplete request"})
        if len(head) > MAX_HEAD:
            return Reply(413, {"error": "headers too large"})
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        fields = request_line.split(" ")
        if len(fields) != 3 or not fields[2].startswith("HTTP/1."):
            return Reply(400, {"error": "not an HTTP/1.1 request"})
        method, target, _ = fields
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            return Reply(400, {"error": "send a Content-Length body (no Transfer-Encoding)"})
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return Reply(400, {"error": "bad Content-Length"})
        if length < 0 or length > MAX_BODY:
            return Reply(413, {"error": f"body over {MAX_BODY} bytes"})
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            return Reply(400, {"error": "incomplete body"})
        path = target.split("?", 1)[0]
        prefix = "/approvals/"
        approval_id = path[len(prefix) :]
        if not path.startswith(prefix) or not _ID.fullmatch(approval_id):
            return Reply(404, {"error": "not found: POST /approvals/<id> (the id in full, as the webhook sent it)"})
        if method != "POST":
            return Reply(405, {"error": "use POST"})
        secret = self._secret()
        if secret is None:
            return Reply(401, {"error": "callbacks need escalation.webhook.secret_file"})
        signature, purpose = headers.get(HEADER.lower()), callback_purpose(approval_id)
        problem = verify(secret, signature, body, purpose)
        if problem is None and not self.replays.take(signature, purpose, body):
            problem = f"{HEADER} was used already: sign each callback anew (a fresh t)"
        if problem is not None:
            log.warning("escalation callback refused: %s", problem)
            return Reply(401, {"error": problem})
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return Reply(400, {"error": "the body is not JSON"})
        if not isinstance(data, dict):
            return Reply(400, {"error": "the body is not a JSON object"})
        decision = data.get("decision")
        if decision not in ("approve", "deny"):
            return Reply(400, {"error": 'decision must be "approve" or "deny"'})
        scope = data.get("scope")
        if decision == "approve":
            scope = scope or "once"
            if scope not in ("once", "session", "always"):
                return Reply(400, {"error": 'scope must be "once", "session" or "always"'})
        elif scope is not None:
            return Reply(400, {"error": "a denial has no scope"})
        note, by = data.get("note"), data.get("by") or "webhook"
        if not isinstance(note, str | None) or not isinstance(by, str) or len(by) > 200 or len(note or "") > 2000:
            return Reply(400, {"error": "note and by must be short strings"})
        return await self._decide(approval_id, decision, scope, note, by)
