"""A hostile upstream that echoes the injected secret into bytes mitmproxy quotes (its
"Bad HTTP response line: b'…'" error) must not get the secret into any log line. egress-guard's
rows and answers omit wire bytes; the log scrubber masks the secret in whatever mitmproxy or
a library logs, as defence in depth (its unit test fails without it)."""

from __future__ import annotations

import base64
import logging

from support.llm.common import REAL
from support.proxy import RunningProxy
from test_credentials import http_client, mint
from test_upstream_faults import Fault

from egress_guard.forms import SecretForms
from egress_guard.logscrub import LogScrubber


def test_a_secret_echoed_into_mitmproxys_log_is_masked(
    make_proxy, cred_config: dict, real_env, test_ca, caplog
) -> None:
    fault = Fault("tls-garbage", test_ca[0], garbage=f"HTTP/1.1 2OO {REAL['openai']}\r\n\r\n".encode())
    try:
        cred_config["allow"].append({"host": "api.openai.com", "ports": [fault.port]})
        proxy: RunningProxy = make_proxy(**cred_config)
        fake = mint(proxy).env["OPENAI_API_KEY"]
        caplog.set_level(logging.DEBUG)
        with http_client(proxy) as client:
            r = client.get(
                f"https://api.openai.com:{fault.port}/v1/models", headers={"Authorization": f"Bearer {fake}"}
            )
        assert r.status_code == 502
        assert fault.requests == 1  # the upstream did get the request (and echoed the secret)
        assert "Bad HTTP response line" in caplog.text
        assert REAL["openai"] not in caplog.text
    finally:
        fault.close()


def test_the_scrubber_masks_message_arguments_and_exceptions(caplog) -> None:
    secret = "sk-proj-LOGsecret0123456789abcdefghijklmnop"
    scrubber = LogScrubber()
    scrubber.install()
    try:
        scrubber.remember("openai", SecretForms(secret))
        log = logging.getLogger("mitmproxy.test-scrub")
        caplog.set_level(logging.DEBUG)
        log.info("line: %r", secret.encode())
        log.warning("b64 %s", base64.b64encode(secret.encode()).decode())
        try:
            raise ValueError(f"bad {secret}")
        except ValueError:
            log.exception("failed")
        assert secret not in caplog.text and base64.b64encode(secret.encode()).decode() not in caplog.text
        assert caplog.text.count("REDACTED-by-egress-guard") >= 3
    finally:
        scrubber.uninstall()
    assert logging.getLogRecordFactory() is logging.LogRecord
