"""The console in a real browser (Debian's Chromium driven by Playwright) against a real proxy
with real traffic (the openai SDK and httpx through it): the live page shows a new decision
within 2 s, the spend page's total is `audit spend`'s, an escalated request approved by a
click completes, Kill on the Agents page cuts a running stream. Each page is saved as a
screenshot (the test's tmp dir; docs/img/console-*.png are copies).

One browser, proxy, upstream and console for the module; the tests share its traffic and
run in order (the kill comes last of the actions: it revokes its own agent only).

The browser signs in as an operator does, with the printed `/#token=…` link: the token lives
in the tab's sessionStorage and goes out only as a header to the console's own origin; another
server on 127.0.0.1 opened in the same browser gets neither a cookie nor the token."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from console_env import RunningConsole
from support.llm import LLMHandler
from support.llm.common import REAL_ENV
from support.llm.openai import SlowStream
from support.proxy import RunningProxy, write_config
from support.upstream import Upstream

from egress_guard import keys
from egress_guard.cli import main

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "Debian's chromium is missing (apt-get install chromium; ./dev test installs it)", allow_module_level=True
    )

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402

SERVICE_HOSTS = ["api.openai.com", "api.anthropic.com"]
ESCALATE_GPT4O = {
    "name": "gpt-4o",
    "hosts": ["api.openai.com"],
    "match": "model == 'gpt-4o'",
    "action": "escalate",
    "reason": "gpt-4o needs a human",
}
PAGES = ["live", "spend", "denials", "approvals", "agents"]


@dataclass
class World:
    proxy: RunningProxy
    upstream: Upstream
    console: RunningConsole
    page: Page
    shots: Path
    errors: list[str]

    @property
    def config_path(self) -> str:
        return str(self.proxy.config.path)

    def http(self) -> httpx.Client:
        return httpx.Client(
            proxy=self.proxy.url, verify=self.proxy.client_context(), trust_env=False, timeout=httpx.Timeout(40)
        )

    def key(self, agent: str) -> str:
        return keys.mint(self.proxy.config, agent).env["OPENAI_API_KEY"]

    def openai(self, agent: str = "researcher") -> openai.OpenAI:
        return openai.OpenAI(
            api_key=self.key(agent),
            base_url=f"https://api.openai.com:{self.upstream.port}/v1",
            max_retries=0,
            http_client=self.http(),
        )

    def ask(self, model: str = "gpt-4o-mini", agent: str = "researcher", max_tokens: int = 5) -> str:
        reply = self.openai(agent).chat.completions.create(
            model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "hi"}]
        )
        return reply.choices[0].message.content or ""

    def cli(self, *args: str) -> str:
        result = CliRunner().invoke(main, [*args, "--config", self.config_path], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    def open(self, name: str) -> Page:
        self.page.goto(f"{self.console.url}/{name}")
        self.page.wait_for_selector('body[data-ready="1"]')  # the page's first load is done
        return self.page

    def shot(self, name: str) -> Path:
        path = self.shots / f"console-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def world(browser: Browser, test_ca: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    SlowStream.stop.clear()
    upstream = Upstream(test_ca[0], LLMHandler)
    home = tmp_path_factory.mktemp("console-home")
    body = {
        "allowlists": ["openai", "anthropic"],
        "allow": [{"host": h, "ports": [upstream.port]} for h in SERVICE_HOSTS],
        "services": ["openai", "anthropic"],
        "agents": {
            "researcher": {"services": ["openai", "anthropic"], "limits": {"budget_usd": {"day": 50}}},
            "writer": {"services": ["anthropic"]},
            "runner": {"services": ["openai"]},  # the one the kill test kills
        },
        "rules": [ESCALATE_GPT4O],
        "escalation": {"timeout": "30s"},
        "network": {"hosts": {h: ["127.0.0.1"] for h in SERVICE_HOSTS}, "upstream_ca": str(test_ca[1])},
    }
    with pytest.MonkeyPatch.context() as env:
        for name, value in REAL_ENV.items():
            env.setenv(name, value)
        proxy = RunningProxy(write_config(home, body)).start()
        console = RunningConsole(proxy.config, secrets.token_urlsafe(32)).start()
        context = browser.new_context(viewport={"width": 1360, "height": 860})
        page = context.new_page()
        page.set_default_timeout(10_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
        page.on("console", lambda msg: errors.append(f"{page.url}: {msg.text}") if msg.type == "error" else None)
        page.goto(console.sign_in)  # /#token=…: / sends it on to /live, the page keeps the token in the tab
        assert page.url == f"{console.url}/live"  # and takes it out of the address bar
        assert context.cookies() == []
        traffic(proxy, upstream.port)
        shots = tmp_path_factory.mktemp("console-screenshots")
        world = World(proxy, upstream, console, page, shots, errors)
        try:
            yield world
        finally:
            print(f"console screenshots: {shots}")
            context.close()
            console.stop()
            SlowStream.stop.set()
            proxy.stop()
            upstream.close()


def traffic(proxy: RunningProxy, port: int) -> None:
    """What the pages show before the tests add theirs: two agents' priced calls, refusals,
    one flagged (an OpenAI key sent to Anthropic)."""
    with httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=20) as client:
        for agent, service, max_tokens in [
            ("researcher", "openai", 40),
            ("researcher", "openai", 9),
            ("writer", "anthropic", 25),
        ]:
            key = keys.mint(proxy.config, agent, services=[service]).env
            if service == "openai":
                r = client.post(
                    f"https://api.openai.com:{port}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key['OPENAI_API_KEY']}"},
                    json={
                        "model": "gpt-4o-mini",
                        "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
            else:
                r = client.post(
                    f"https://api.anthropic.com:{port}/v1/messages",
                    headers={"x-api-key": key["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"},
                    json={
                        "model": "claude-haiku-4-5",
                        "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
            assert r.status_code == 200, r.text
        stolen = keys.mint(proxy.config, "researcher", services=["openai"]).env["OPENAI_API_KEY"]
        r = client.post(
            f"https://api.anthropic.com:{port}/v1/messages",
            headers={"x-api-key": stolen, "anthropic-version": "2023-06-01"},
            json={"model": "claude-haiku-4-5", "max_tokens": 5, "messages": []},
        )
        assert r.status_code in (401, 403) and "flagged" in r.text, r.text
        for host in ("pypi.org", "paste.example"):
            with pytest.raises(httpx.ProxyError):
                client.get(f"https://{host}/")
    proxy.rows(expect=8)


def shown_ids(page: Page) -> list[int]:
    return [
        int(i) for i in page.eval_on_selector_all("#decisions tbody tr[data-id]", "rs => rs.map(r => r.dataset.id)")
    ]


def test_live_shows_a_new_decision_within_2_s(world: World) -> None:
    page = world.open("live")
    expect(page.locator("#stream-state")).not_to_have_text(re.compile("connecting"))
    before = max(shown_ids(page), default=0)
    assert world.ask(max_tokens=3) == "pong"
    answered = time.monotonic()
    page.wait_for_function(
        "n => [...document.querySelectorAll('#decisions tbody tr[data-id]')].some(r => Number(r.dataset.id) > n)",
        arg=before,
        timeout=2000,
    )
    assert time.monotonic() - answered < 2.0
    newest = max(shown_ids(page))
    row = page.locator(f'#decisions tbody tr[data-id="{newest}"]')
    expect(row).to_contain_text("api.openai.com")
    # a refusal shows too, and a click opens the full record
    with world.http() as client, pytest.raises(httpx.ProxyError):
        client.get("https://unlisted.example/")
    expect(page.locator("#decisions tbody tr[data-id]").first).to_contain_text("unlisted.example")
    expect(page.locator("#decisions tbody tr[data-id]").first).to_contain_text("deny")
    row.click()
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(detail.locator("dd[data-field=model]")).to_have_text("gpt-4o-mini")
    expect(detail.locator("dd[data-field=credential]")).to_contain_text("swapped")
    world.shot("live")


def test_spend_total_is_audit_spends(world: World) -> None:
    for n in (7, 11):
        world.ask(max_tokens=n)
    world.proxy.rows(expect=4)
    spent = json.loads(world.cli("audit", "spend", "--since", "7d", "--format", "json"))
    total = sum((Decimal(r["cost_usd"]) for r in spent), Decimal(0))
    assert total > 0
    page = world.open("spend")
    shown = page.locator("#spend-total")
    expect(shown).to_have_text(re.compile(r"\d"))
    assert Decimal(re.sub(r"[^\d.]", "", shown.inner_text())) == total, shown.inner_text()
    expect(page.locator("body")).to_contain_text("researcher")
    world.shot("spend")
    # per model over time: the chart's layers are the models (the legend names them)
    page.locator("button[data-split=model]").click()
    expect(page.locator("#spend-chart-title")).to_have_text("USD per model over time")
    expect(page.locator("#spend-chart .u-legend")).to_contain_text("gpt-4o-mini")
    expect(page.locator("#spend-total")).to_have_text(shown.inner_text())  # the same total either way


def test_denials_page_counts_the_refusals(world: World) -> None:
    with world.http() as client, pytest.raises(httpx.ProxyError):
        client.get("https://unlisted.example/")
    world.proxy.rows(expect=1)
    page = world.open("denials")
    expect(page.locator("body")).to_contain_text("unlisted.example")
    expect(page.locator("body")).to_contain_text("flagged as a possible exfiltration attempt")
    world.shot("denials")


def test_an_escalated_request_approved_by_a_click_completes(world: World) -> None:
    outcome: dict[str, Any] = {}

    def agent() -> None:
        try:
            outcome["reply"] = world.ask(model="gpt-4o")
        except Exception as exc:
            outcome["error"] = exc

    held = threading.Thread(target=agent, daemon=True)
    held.start()
    page = world.open("approvals")
    approve = page.locator(".approval[data-id] button[data-action=approve][data-scope=once]")
    expect(approve).to_have_count(1, timeout=8000)  # the page refreshes every second
    expect(page.locator(".approval[data-id]")).to_contain_text("gpt-4o needs a human")
    world.shot("approvals")
    assert held.is_alive()  # still waiting for a human
    approve.click()
    held.join(10)
    assert not held.is_alive() and outcome.get("reply") == "pong", outcome
    (answered,) = json.loads(world.cli("pending", "--history", "--format", "json"))["approvals"]
    assert answered["status"] == "approved" and answered["scope"] == "once"
    assert str(answered["decided_by"]).startswith("console:")
    expect(page.locator(".approval[data-id] button[data-action=approve]")).to_have_count(0)


def test_kill_on_the_agents_page_cuts_a_running_stream(world: World) -> None:
    key = world.key("runner")
    events: list[str] = []
    outcome: dict[str, str] = {}

    def stream() -> None:
        try:
            with (
                world.http() as client,
                client.stream(
                    "GET",
                    f"https://api.openai.com:{world.upstream.port}/v1/slow",
                    headers={"Authorization": f"Bearer {key}"},
                ) as r,
            ):
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        events.append(line)
            outcome["ended"] = "cleanly"
        except httpx.HTTPError as exc:
            outcome["ended"] = f"cut: {type(exc).__name__}"

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while len(events) < 3:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.02)
    page = world.open("agents")
    agent = page.locator(".agent[data-agent=runner]")
    expect(agent).to_be_visible()
    world.shot("agents")
    agent.locator("button[data-action=kill]").click()
    dialog = page.locator("#confirm-kill")  # the page's own confirm dialog (a <dialog>)
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("runner")
    dialog.locator("button[data-action=confirm]").click()
    clicked = time.monotonic()
    reader.join(5)
    assert not reader.is_alive(), "the stream still runs after the kill"
    assert outcome["ended"].startswith("cut") or len(events) < 190, outcome
    assert time.monotonic() - clicked < 5 and len(events) < 100  # it would have run for 20 s
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        openai.OpenAI(
            api_key=key,
            base_url=f"https://api.openai.com:{world.upstream.port}/v1",
            max_retries=0,
            http_client=world.http(),
        ).models.list()
    assert world.ask() == "pong"  # another agent is untouched


class Snoop(BaseHTTPRequestHandler):
    """Another local server (an agent's dev server, say) that the operator opens in the same
    browser: it records what the browser sends it."""

    seen: queue.Queue[tuple[str, dict[str, str]]]

    def do_GET(self) -> None:
        self.seen.put((self.path, dict(self.headers.items())))
        body = b"<!doctype html><title>dev server</title><p>hello"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_another_port_on_127_0_0_1_gets_no_cookie_and_no_token(world: World) -> None:
    """The review's M1: a cookie for 127.0.0.1 would go to every port on it. Signed in, the
    same tab and a new one open a second local server: no Cookie header, the token nowhere in
    what it receives, nothing in its document.cookie or storage; back on the console the tab is
    still signed in (sessionStorage is per origin, kept across the tab's navigation)."""
    world.open("live")
    seen: queue.Queue[tuple[str, dict[str, str]]] = queue.Queue()
    handler = type("SnoopHere", (Snoop,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    snoop = f"http://127.0.0.1:{server.server_address[1]}"
    other = world.page.context.new_page()
    try:
        for page in (world.page, other):
            page.goto(f"{snoop}/from-the-console-tab")
            script = "() => [document.cookie, sessionStorage.length, localStorage.length]"
            assert page.evaluate(script) == ["", 0, 0]
            expect(page.locator("p")).to_have_text("hello")
        requests = []
        while not seen.empty():
            requests.append(seen.get())
        assert len(requests) >= 2
        for path, headers in requests:
            assert "cookie" not in {name.lower() for name in headers}, headers
            assert world.console.token not in path + json.dumps(headers)
        assert world.page.context.cookies() == []
    finally:
        other.close()
        server.shutdown()
        server.server_close()
    page = world.open("live")  # the same tab, back on the console: still signed in
    expect(page.locator("#stream-state")).to_have_text("live")
    assert page.evaluate("() => sessionStorage.length") == 1


def test_without_the_link_a_page_asks_for_it(world: World, browser: Browser) -> None:
    """A new tab (no sessionStorage) opened on a page, and the old /?token= address: no data,
    a banner naming the link; the console's answers set no cookie."""
    context = browser.new_context()
    try:
        page = context.new_page()
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.goto(f"{world.console.url}/approvals")
        expect(page.locator("#banner")).to_contain_text("open the link `egress-guard console` printed")
        page.wait_for_timeout(300)
        assert not [url for url in asked if "/api/" in url]  # it asked nothing
        assert page.evaluate("() => document.querySelectorAll('.approval').length") == 0
        page.goto(f"{world.console.url}/?token={world.console.token}")
        expect(page.locator("body")).to_contain_text("#token=")
        assert context.cookies() == []
        page.goto(world.console.sign_in.replace("#token=", "#token=x"))  # a wrong token
        expect(page.locator("#banner")).to_contain_text("refused the token")
        assert page.url == f"{world.console.url}/live"
    finally:
        context.close()


def test_a_request_that_named_no_agent_is_approved_once_only(world: World) -> None:
    """The server refuses session and always for it (escalation.scope_problem): the page
    disables those buttons; once and deny stay."""
    from egress_guard.store import CreateApproval, open_store
    from egress_guard.store.records import Approval

    held = Approval(
        id="cafe000000000001",
        created=time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        expires="2099-01-01T00:00:00.000Z",
        replica="local",
        request_id="req-no-agent",
        agent=None,
        session=None,
        method="GET",
        scheme="https",
        host="new.example.com",
        port=443,
        path="/",
        rule="unknown_hosts",
        reason="host new.example.com is covered by no rule",
    )
    with open_store(world.proxy.config, write=True) as db:
        db.write(CreateApproval(held))
    page = world.open("approvals")
    card = page.locator('.approval[data-id="cafe000000000001"]')
    expect(card).to_be_visible(timeout=5000)
    for scope in ("session", "always"):
        button = card.locator(f"button[data-scope={scope}]")
        expect(button).to_be_disabled()
        expect(button).to_have_attribute("title", re.compile("named no agent"))
    expect(card.locator("button[data-scope=once]")).to_be_enabled()
    card.locator("button[data-action=deny]").click()
    expect(card).to_have_count(0)
    world.page.wait_for_timeout(200)


def test_the_live_stream_resumes_after_the_console_comes_back(world: World, browser: Browser) -> None:
    """The stream is a fetch (a header carries the token): when it breaks, the page says
    so, retries, and asks again with Last-Event-ID, the id of the last row it got — a row
    written while the console was away still shows."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = RunningConsole(world.proxy.config, world.console.token, port=port).start()
    context = browser.new_context()
    second: RunningConsole | None = None
    try:
        page = context.new_page()
        streams: list[dict[str, str]] = []
        page.on("request", lambda r: streams.append(r.headers) if "/api/decisions/stream" in r.url else None)
        page.goto(first.sign_in)
        expect(page.locator("#stream-state")).to_have_text("live")
        loaded = max(shown_ids(page), default=0)
        world.ask(max_tokens=2)
        page.wait_for_function(f"() => document.querySelector(`#decisions tbody tr[data-id='{loaded + 1}']`)")
        seen = max(shown_ids(page))  # the stream's last row
        assert "last-event-id" not in streams[0] and streams[0]["authorization"] == f"Bearer {first.token}"
        first.stop()
        expect(page.locator("#stream-state")).to_have_text("reconnecting…", timeout=3000)
        world.ask(max_tokens=4)  # written while the console is away
        world.proxy.rows(expect=1)
        second = RunningConsole(world.proxy.config, world.console.token, port=port).start()
        expect(page.locator("#stream-state")).to_have_text("live", timeout=8000)
        page.wait_for_function(f"() => document.querySelector(`#decisions tbody tr[data-id='{seen + 1}']`)")
        assert streams[-1].get("last-event-id") == str(seen), [h.get("last-event-id") for h in streams]
        expect(page.locator("#banner")).to_be_hidden()
    finally:
        context.close()
        first.stop()
        if second is not None:
            second.stop()


def test_no_page_logged_a_script_error(world: World) -> None:
    """Every page the tests opened loaded its scripts (the CSP refuses inline ones) and logged
    no error; each was saved as a screenshot. EG_CONSOLE_SHOTS=1 copies them to docs/img."""
    for name in PAGES:
        if not (world.shots / f"console-{name}.png").exists():
            world.open(name)
            world.page.wait_for_timeout(500)
            world.shot(name)
    assert world.errors == []
    for name in PAGES:
        assert (world.shots / f"console-{name}.png").stat().st_size > 10_000
    if os.environ.get("EG_CONSOLE_SHOTS") == "1":
        docs = Path(__file__).resolve().parents[2] / "docs" / "img"
        docs.mkdir(exist_ok=True)
        for name in PAGES:
            shutil.copy(world.shots / f"console-{name}.png", docs / f"console-{name}.png")
