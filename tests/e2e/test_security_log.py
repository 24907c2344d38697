"""The SECURITY log line: written for a flagged refusal (a possible exfiltration attempt) and
for no other, as the credential verdict's `flagged` says — also when an upload is cut."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from support.proxy import RunningProxy
from support.upstream import Upstream

from egress_guard import keys


def _client(proxy: RunningProxy) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=proxy.client_context(), trust_env=False, timeout=10)


def _in_two(body: bytes) -> Iterator[bytes]:
    """Sent chunked, with no Content-Length: the proxy streams it."""
    yield body[:10]
    yield body[10:]


def _lines(caplog: pytest.LogCaptureFixture, credential: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if credential in r.getMessage()]


def test_only_flagged_refusals_write_a_security_line(
    cred_proxy: RunningProxy, llm_upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="egress_guard")
    env = keys.mint(cred_proxy.config, "researcher").env
    other = keys.mint(cred_proxy.config, "researcher").env["OPENAI_API_KEY"]
    url = f"https://api.openai.com:{llm_upstream.port}/v1/models"
    cases: list[tuple[list[tuple[str, str]], str, bool]] = [
        ([("Authorization", f"Bearer {env['ANTHROPIC_API_KEY']}")], "denied-wrong-service", True),
        ([], "denied-missing", False),
        # denied-forged, but not flagged: two genuine keys of one agent
        ([("Authorization", f"Bearer {env['OPENAI_API_KEY']}"), ("Authorization", f"Bearer {other}")], "", False),
    ]
    with _client(cred_proxy) as client:
        for headers, credential, flagged in cases:
            caplog.clear()
            r = client.get(url, headers=headers)
            assert r.status_code == 401, r.text
            row = cred_proxy.row_for(r.headers["x-egress-guard-request-id"])
            assert credential in row["credential"]
            security = [m for m in _lines(caplog, row["credential"]) if m.startswith("SECURITY")]
            assert len(security) == flagged, (row, caplog.text)
    assert llm_upstream.state.requests == []


@pytest.mark.parametrize(
    ("body", "encoding", "credential", "flagged"),
    [
        (b'{"note": "here: KEY"}', "", "denied-unbound-host", True),
        (b'{"note": "hello there"}', "x-unknown", "denied-unreadable-body", False),
    ],
    ids=["leak", "unreadable"],
)
def test_a_cut_upload_writes_a_security_line_only_when_flagged(
    cred_proxy: RunningProxy,
    upstream: Upstream,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    encoding: str,
    credential: str,
    flagged: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="egress_guard")
    fake = keys.mint(cred_proxy.config, "researcher").env["OPENAI_API_KEY"]
    headers = {"content-type": "application/json"} | ({"content-encoding": encoding} if encoding else {})
    with _client(cred_proxy) as client, pytest.raises(httpx.HTTPError):  # cut before the body's end
        client.post(
            f"https://api.test.local:{upstream.port}/upload",
            content=_in_two(body.replace(b"KEY", fake.encode())),
            headers=headers,
        )
    [line] = [m for m in _lines(caplog, credential) if m.endswith("connection cut")]
    assert line.startswith("SECURITY ") == flagged, line
    assert fake not in line
