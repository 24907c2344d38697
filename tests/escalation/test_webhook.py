"""The escalation webhook against a real local HTTP server (it receives the pending request,
signed), and the callback server over real HTTP: a signed answer is taken; a forged, stale
or unsigned one is refused 401 before anything else; an unknown id is 404; an answered one
409. A webhook that is down costs a log line (never its path or the key) and the request
still waits for the CLI."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from escalation_env import cli, make_home, request, running, wait_pending

from egress_guard import webhook
from egress_guard.secrets import Secret

KEY = "whsec-test-4f1c9a0b7e2d"


class Hook:
    """A webhook receiver: records each POST (path, headers, body), answers `status`."""

    def __init__(self, status: int = 204) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                hook.received.append((self.path, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


def callback(
    port: int,
    approval_id: str,
    payload: Any,
    key: str | None = KEY,
    *,
    now: float | None = None,
    method: str = "POST",
    raw: bytes | None = None,
    signed_for: str | None = None,
    signature: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST to the callback server, signed with `key` (None: unsigned) as a callback for
    `signed_for` (default: `approval_id`), or with the given `signature`; (status, JSON body)."""
    body = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers[webhook.HEADER] = signature
    elif key is not None:
        purpose = webhook.callback_purpose(signed_for or approval_id)
        headers[webhook.HEADER] = webhook.sign(Secret(key), body, purpose, now)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/approvals/{approval_id}", body, headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_sign_and_verify() -> None:
    key, body = Secret(KEY), b'{"decision":"approve"}'
    for_a = webhook.callback_purpose("aaaa000000000001")
    header = webhook.sign(key, body, for_a, now=1_800_000_000)
    assert webhook.verify(key, header, body, for_a, now=1_800_000_100) is None
    assert "does not match" in (webhook.verify(key, header, body + b" ", for_a, now=1_800_000_100) or "")
    assert "does not match" in (webhook.verify(Secret("other"), header, body, for_a, now=1_800_000_100) or "")
    # bound to the id, and to the direction: neither another escalation's nor a notification's
    for_b = webhook.callback_purpose("aaaa000000000002")
    assert "does not match" in (webhook.verify(key, header, body, for_b, now=1_800_000_100) or "")
    assert "does not match" in (webhook.verify(key, header, body, webhook.NOTIFY, now=1_800_000_100) or "")
    notified = webhook.sign(key, body, webhook.NOTIFY, now=1_800_000_000)
    assert "does not match" in (webhook.verify(key, notified, body, for_a, now=1_800_000_100) or "")
    assert "more than 300 s" in (webhook.verify(key, header, body, for_a, now=1_800_000_301) or "")
    assert "missing" in (webhook.verify(key, None, body, for_a) or "")
    assert "no t=" in (webhook.verify(key, "v1=abc", body, for_a) or "")
    assert KEY not in header and KEY not in repr(key)


async def test_the_documented_scheme_is_the_one_checked() -> None:
    """The Python an approver bot copies from docs/escalation.md answers the real server, and
    the notification's documented message is what `notify` signs."""
    import hashlib
    import hmac as hmac_
    import re

    docs = (Path(__file__).parents[2] / "docs" / "escalation.md").read_text()
    assert 'HMAC-SHA256(key, "<t>.notify.<raw body>")' in docs
    body, t = b'{"id":"1"}', 1_800_000_000
    mac = hmac_.new(KEY.encode(), f"{t}.notify.".encode() + body, hashlib.sha256).hexdigest()
    assert webhook.verify(Secret(KEY), f"t={t},v1={mac}", body, webhook.NOTIFY, now=t) is None
    (snippet,) = re.findall(r"```python\n(.*?)```", docs.split("## Signed callbacks")[1], re.S)
    scope: dict[str, Any] = {}
    exec(snippet, scope)  # our own docs
    seen: list[tuple[Any, ...]] = []

    async def decide(*args: Any) -> webhook.Reply:
        seen.append(args)
        return webhook.Reply(200, {"ok": True})

    server = webhook.CallbackServer(("127.0.0.1", 0), lambda: Secret(KEY), decide)
    await server.start()
    try:
        base, decision = f"http://127.0.0.1:{server.port}", {"decision": "approve", "scope": "once", "by": "bot"}
        assert await asyncio.to_thread(scope["answer"], base, KEY, "0123456789abcdef", decision) == 200
    finally:
        await server.close()
    assert seen == [("0123456789abcdef", "approve", "once", None, "bot")]


def test_replays_take_each_signature_once() -> None:
    replays, purpose, body = webhook.Replays(), webhook.callback_purpose("ab"), b"{}"
    header = webhook.sign(Secret(KEY), body, purpose, now=1_800_000_000)
    assert replays.take(header, purpose, body, now=1_800_000_000)
    assert not replays.take(header, purpose, body, now=1_800_000_100)
    assert not replays.take(f" {header},v1=00", purpose, body, now=1_800_000_100)  # respelled: the same
    assert replays.take(header, purpose, body, now=1_800_000_000 + 2 * webhook.TOLERANCE + 1)  # past any window


async def test_the_webhook_is_told_and_a_signed_callback_approves(
    tmp_path: Path, hook: Hook, secret_file: Path
) -> None:
    config = make_home(tmp_path)
    url = f"http://127.0.0.1:{hook.port}/hooks/T0K3N"
    async with running(
        config, timeout=20, webhook_url=url, webhook_secret_file=secret_file, callback_listen=("127.0.0.1", 0)
    ) as esc:
        asked = asyncio.create_task(esc.ask(request()))
        await until(lambda: hook.received)
        path, headers, body = hook.received[0]
        assert path == "/hooks/T0K3N"
        assert webhook.verify(Secret(KEY), headers[webhook.HEADER], body, webhook.NOTIFY) is None
        told = json.loads(body)
        assert (told["agent"], told["host"], told["port"], told["rule"]) == (
            "researcher",
            "new.example.com",
            443,
            "unknown_hosts",
        )
        assert told["approve"] == f"egress-guard approve {told['id']} [--scope once|session|always]"
        assert told["callback"] == f"/approvals/{told['id']}"
        assert KEY.encode() not in body
        assert esc.callback is not None
        status, answer_body = await asyncio.to_thread(
            callback,
            esc.callback.port,
            told["id"],
            {"decision": "approve", "scope": "session", "by": "ops-bot", "note": "ok"},
        )
        assert status == 200, answer_body
        assert answer_body == {"id": told["id"], "status": "approved", "scope": "session", "by": "ops-bot"}
        answer = await asyncio.wait_for(asked, 2)  # answered at once, not at the next poll
        assert answer.approved and answer.reason == f"approved by ops-bot (escalation {told['id']}, scope session: ok)"
        assert answer.by == "ops-bot"
        # the notification's own signature is no answer, even over an answer's body
        status, _ = await asyncio.to_thread(
            callback, esc.callback.port, told["id"], None, raw=body, signature=headers[webhook.HEADER]
        )
        assert status == 401
        # answered: the same callback again is a conflict naming who answered
        status, again = await asyncio.to_thread(callback, esc.callback.port, told["id"], {"decision": "deny"})
        assert (
            status == 409 and again["decided_by"] == "ops-bot" and "not pending: approved by ops-bot" in again["error"]
        )


async def test_forged_stale_and_unsigned_callbacks_are_refused(tmp_path: Path, hook: Hook, secret_file: Path) -> None:
    config = make_home(tmp_path)
    async with running(
        config,
        timeout=20,
        webhook_url=f"http://127.0.0.1:{hook.port}/",
        webhook_secret_file=secret_file,
        callback_listen=("127.0.0.1", 0),
    ) as esc:
        assert esc.callback is not None
        port = esc.callback.port
        asked = asyncio.create_task(esc.ask(request()))
        (shown,) = await wait_pending(config)
        approve = {"decision": "approve", "scope": "always", "by": "mallory"}
        for key, now in [("not-the-key", None), (KEY, time.time() - 1000), (KEY, time.time() + 1000), (None, None)]:
            status, body = await asyncio.to_thread(callback, port, shown["id"], approve, key, now=now)
            assert status == 401, (key, now, body)
            assert KEY not in json.dumps(body)
        # an unsigned caller cannot even learn whether an id exists
        assert (await asyncio.to_thread(callback, port, "00000000", approve, None))[0] == 401
        assert (await asyncio.to_thread(callback, port, "00000000", approve))[0] == 404
        status, body = await asyncio.to_thread(callback, port, shown["id"], None, raw=b"{not json")
        assert status == 400 and "not JSON" in body["error"]
        status, body = await asyncio.to_thread(callback, port, shown["id"], {"decision": "maybe"})
        assert status == 400 and "decision" in body["error"]
        assert not asked.done()  # none of that answered it
        code, out = await asyncio.to_thread(cli, config, "deny", shown["id"], "--by", "alice")
        assert code == 0, out
        answer = await asyncio.wait_for(asked, 5)
        assert answer.status == "denied" and answer.by == "alice"
        status, body = await asyncio.to_thread(callback, port, shown["id"], approve)
        assert status == 409 and body["status"] == "denied" and body["decided_by"] == "alice"


async def test_a_webhook_that_is_down_costs_a_log_line_and_the_cli_still_answers(
    tmp_path: Path, secret_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "egress_guard.escalation")
    down = Hook()
    port = down.port
    down.close()  # nothing listens there now
    config = make_home(tmp_path)
    async with running(
        config, timeout=20, webhook_url=f"http://127.0.0.1:{port}/hooks/T0K3N?sig=abc", webhook_secret_file=secret_file
    ) as esc:
        asked = asyncio.create_task(esc.ask(request()))
        (shown,) = await wait_pending(config)
        await until(lambda: any("escalation webhook" in r.getMessage() for r in caplog.records))
        code, out = await asyncio.to_thread(cli, config, "approve", shown["id"])
        assert code == 0, out
        assert (await asyncio.wait_for(asked, 5)).approved
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"escalation webhook http://127.0.0.1:{port} failed" in logged and "waits for the CLI" in logged
    assert "T0K3N" not in logged and "sig=abc" not in logged and KEY not in logged


async def test_a_webhook_answering_an_error_is_logged_with_its_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "egress_guard.escalation")
    failing = Hook(status=500)
    try:
        assert not await webhook.notify(f"http://127.0.0.1:{failing.port}/x", None, {"id": "1"})
        assert webhook.HEADER not in failing.received[0][1]  # no key: unsigned
    finally:
        failing.close()
    assert f"escalation webhook http://127.0.0.1:{failing.port} answered 500" in caplog.text


async def test_a_signed_answer_is_for_one_escalation_and_used_once(tmp_path: Path, secret_file: Path) -> None:
    """The review's replay: one signed {"decision": "approve"} sent to every pending id. The
    signature binds the id, and a signature is taken once."""
    config = make_home(tmp_path)
    async with running(config, timeout=20, webhook_secret_file=secret_file, callback_listen=("127.0.0.1", 0)) as esc:
        assert esc.callback is not None
        port = esc.callback.port
        asked = [asyncio.create_task(esc.ask(request(n))) for n in (1, 2)]
        ids = {p["request_id"]: p["id"] for p in await wait_pending(config, 2)}
        a, b = ids["req-1"], ids["req-2"]
        body = json.dumps({"decision": "approve", "by": "ops-bot"}).encode()
        signed_for_a = webhook.sign(Secret(KEY), body, webhook.callback_purpose(a))
        status, refused = await asyncio.to_thread(callback, port, b, None, raw=body, signature=signed_for_a)
        assert status == 401 and "does not match" in refused["error"]
        status, _ = await asyncio.to_thread(callback, port, a, None, raw=body, signature=signed_for_a)
        assert status == 200
        # the same signed request again: refused before the store is asked (not a 409)
        status, again = await asyncio.to_thread(callback, port, a, None, raw=body, signature=signed_for_a)
        assert status == 401 and "used already" in again["error"]
        first = await asyncio.wait_for(asked[0], 5)
        assert first.approved and first.approval_id == a
        assert not asked[1].done()  # b was not answered by a's signature
        (still,) = await wait_pending(config)
        assert still["id"] == b
        status, _ = await asyncio.to_thread(callback, port, b, {"decision": "deny"})
        assert status == 200
        assert (await asyncio.wait_for(asked[1], 5)).status == "denied"


async def test_the_callback_server_serves_at_most_max_connections() -> None:
    async def decide(*args: Any) -> webhook.Reply:
        return webhook.Reply(404, {"error": "none"})

    server = webhook.CallbackServer(("127.0.0.1", 0), lambda: Secret(KEY), decide)
    await server.start()
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(webhook.MAX_CONNECTIONS):  # idle: each holds a slot until READ_TIMEOUT
            _, w = await asyncio.open_connection("127.0.0.1", server.port)
            idle.append(w)
        await until(lambda: server.connections == webhook.MAX_CONNECTIONS)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed at once, unanswered
        writer.close()
        assert server.turned_away == 1 and server.connections == webhook.MAX_CONNECTIONS
        for w in idle:
            w.close()
        await until(lambda: server.connections == 0)
        status, body = await asyncio.to_thread(callback, server.port, "abcdef", {"decision": "deny"})
        assert status == 404 and body == {"error": "none"}
    finally:
        for w in idle:
            w.close()
        await server.close()
