"""A refusal answers in the error shape of the API its service declares (`meter.api`), not
of the service's name: an OpenAI-compatible service named `groq` refuses as OpenAI does, so
the SDK the agent uses for it shows egress-guard's reason. Through the real proxy."""

from __future__ import annotations

from typing import Any

import pytest
from support.proxy import RunningProxy
from support.upstream import Upstream
from test_credentials import http_client, mint


def service(name: str, host: str, api: str, provider: str, env_var: str) -> dict[str, Any]:
    return {
        "name": name,
        "hosts": [host],
        "credential": [{"header": "Authorization", "scheme": "Bearer"}],
        "fake_key": {"prefix": f"{name}_", "length": 48},
        "env_var": env_var,
        "secret": "env:OPENAI_API_KEY",  # the test upstream takes the same real key
        "meter": {"api": api, "provider": provider},
    }


@pytest.fixture
def shaped_proxy(make_proxy, cred_config: dict, real_env, llm_upstream: Upstream) -> RunningProxy:
    for host in ("api.groq.com", "other.test.local"):
        cred_config["allow"].append({"host": host, "ports": [llm_upstream.port]})
        cred_config["network"]["hosts"][host] = ["127.0.0.1"]
    cred_config["services"] += [
        service("groq", "api.groq.com", "openai", "groq", "GROQ_API_KEY"),
        # a gateway named after nothing egress-guard knows, speaking Anthropic's API
        service("gateway", "other.test.local", "anthropic", "anthropic", "GATEWAY_API_KEY"),
    ]
    cred_config["agents"]["researcher"]["services"] += ["groq", "gateway"]
    cred_config["agents"]["researcher"]["limits"] = {"models": {"groq": ["llama-*"], "gateway": ["claude-haiku-*"]}}
    return make_proxy(**cred_config)


def refusal(proxy: RunningProxy, url: str, key: str, model: str) -> tuple[int, dict]:
    with http_client(proxy) as client:
        r = client.post(url, headers={"Authorization": f"Bearer {key}"}, json={"model": model, "max_tokens": 5})
    assert r.headers["x-egress-guard-decision"] == "deny"
    return r.status_code, r.json()


def test_an_openai_compatible_service_refuses_in_openais_shape(
    shaped_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    env = mint(shaped_proxy).env
    url = f"https://api.groq.com:{llm_upstream.port}/openai/v1/chat/completions"
    status, body = refusal(shaped_proxy, url, env["GROQ_API_KEY"], "gpt-4o")
    assert status == 403
    error = body["error"]
    assert (error["type"], error["code"], error["param"]) == ("egress_denied", "egress_denied", None)
    assert error["message"].startswith("egress-guard: model 'gpt-4o' is not allowed for agent researcher on groq")
    assert set(error) == {"type", "code", "param", "message", "rule", "request_id"}


def test_a_service_named_after_nothing_refuses_in_the_shape_of_the_api_it_declares(
    shaped_proxy: RunningProxy, llm_upstream: Upstream
) -> None:
    env = mint(shaped_proxy).env
    url = f"https://other.test.local:{llm_upstream.port}/v1/messages"
    status, body = refusal(shaped_proxy, url, env["GATEWAY_API_KEY"], "claude-opus-4-1")
    assert status == 403
    assert body["type"] == "error"
    assert (body["error"]["type"], body["error"]["egress_guard"]) == ("permission_error", "egress_denied")
    assert "model 'claude-opus-4-1' is not allowed for agent researcher on gateway" in body["error"]["message"]


def test_a_service_of_no_api_keeps_egress_guards_own_shape(cred_proxy: RunningProxy, upstream: Upstream) -> None:
    # api.test.local is bound to no service: a key sent there is refused in egress-guard's shape
    env = mint(cred_proxy).env
    with http_client(cred_proxy) as client:
        r = client.get(
            f"https://api.test.local:{upstream.port}/json", headers={"Authorization": f"Bearer {env['OPENAI_API_KEY']}"}
        )
    assert r.status_code == 403 and set(r.json()) == {"error"}
    assert set(r.json()["error"]) == {"type", "message", "rule", "request_id"}
