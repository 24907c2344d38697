"""`egress-guard check` answers as the proxy's Policy.evaluate does, with the verdict as its
exit status (0 allow, 3 deny, 4 escalate); `egress-guard config check` validates offline
and prints the very error `up` prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_rules import BASE, RULES, facts  # the verdict table's config and its request builder

from egress_guard.cli.check import check, config, proxy_outcome
from egress_guard.cli.up import up
from egress_guard.config import load_config

OPENAI = "https://api.openai.com/v1/chat/completions"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(text)
    return path


def run(path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(check, ["--config", str(path), *args], catch_exceptions=False)
    return result.exit_code, result.output


# (args, expected exit status, decision, rule); the request as `facts` builds it for the check
ROWS = [
    (["POST", OPENAI, "--json", '{"model": "gpt-4o-mini"}'], 0, "allow", "inline#0"),
    (["POST", OPENAI, "--json", '{"model": "gpt-4o", "stream": true}'], 3, "deny", "rule:no-gpt4-stream"),
    (["--agent", "intern", "POST", OPENAI, "--json", '{"model": "o3"}'], 4, "escalate", "rule:interns-ask"),
    (["POST", OPENAI, "--json", '{"model": "o3", "max_tokens": 20000}'], 4, "escalate", "rule:big-outputs-ask"),
    (["GET", "https://api.github.com/repos/a/b"], 0, "allow", "rule:github-read"),
    (["GET", "https://api.github.com/user"], 3, "deny", None),
    (
        ["POST", "https://mcp.example.com/mcp", "--json", '{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
         '"params": {"name": "delete_everything"}}'],
        3,
        "deny",
        "rule:no-delete-tool",
    ),
    (["GET", "https://pypi.org/simple/?admin=1"], 3, "deny", "rule:no-admin-query"),
    (["GET", "https://pypi.org/simple/requests/"], 0, "allow", "inline#1"),
    (["POST", "https://pypi.org/legacy/"], 3, "deny", "inline#1"),
    (["GET", "https://new.example.org/"], 3, "deny", None),
    # only a deny rule names it: the CONNECT is refused, as the proxy does, before any rule runs
    (["GET", "https://div.example.com/"], 3, "deny", None),
    (["GET", "http://div.example.com/"], 3, "deny", "rule:broken"),  # no CONNECT: the rule's error refuses
]  # fmt: skip


@pytest.mark.parametrize(("args", "status", "decision", "rule"), ROWS, ids=[" ".join(r[0][:3]) for r in ROWS])
def test_check_answers_as_evaluate_does(
    tmp_path: Path, args: list[str], status: int, decision: str, rule: str | None
) -> None:
    path = write(tmp_path, BASE + RULES)
    code, out = run(path, *args, "--format", "json")
    answer = json.loads(out)
    assert (code, answer["decision"], answer["rule"]) == (status, decision, rule), out
    # the same request straight into the policy the proxy would hold
    agent = args[args.index("--agent") + 1] if "--agent" in args else None
    method, url = [a for a in args if not a.startswith(("-", "{")) and a != agent][:2]
    body = json.loads(args[args.index("--json") + 1]) if "--json" in args else b""
    target = "/" + url.split("://", 1)[1].partition("/")[2]
    direct = proxy_outcome(load_config(path).policy, facts(url, method, body, agent=agent), "https:" in url, target)
    assert (direct.verdict_text, direct.rule, direct.reason) == (answer["decision"], answer["rule"], answer["reason"])


def test_text_output_and_exit_codes(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + RULES)
    code, out = run(path, "POST", OPENAI, "--json", '{"model": "gpt-4o", "stream": true}')
    assert code == 3
    assert out.splitlines() == ["decision  deny", "rule      rule:no-gpt4-stream", "reason    no streamed gpt-4"]
    body = tmp_path / "body.json"
    body.write_text('{"model": "gpt-4o-mini"}')
    assert run(path, "POST", OPENAI, "--json", f"@{body}")[0] == 0
    assert run(path, "--header", "X-Debug: 1", "--header", "accept", "GET", "https://pypi.org/simple/")[0] == 0


def test_unknown_hosts_escalate_and_observe(tmp_path: Path) -> None:
    escalate = write(tmp_path, BASE + RULES + "unknown_hosts: escalate\n")
    code, out = run(escalate, "GET", "https://new.example.org/x", "--format", "json")
    assert (code, json.loads(out)["rule"]) == (4, "unknown_hosts")
    observe = write(tmp_path, BASE + RULES + "mode: observe\n")
    code, out = run(observe, "POST", OPENAI, "--json", '{"model": "gpt-4o", "stream": true}', "--format", "json")
    answer = json.loads(out)
    assert (code, answer["decision"], answer["action"], answer["observed"]) == (0, "would-deny", "deny", True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["GET", "ftp://x.com/"], "is not an http(s) URL"),
        (["GET", "https://exa mple.com/"], "https://exa mple.com/"),
        (["POST", OPENAI, "--json", "{nope"], "not JSON"),
        (["POST", OPENAI, "--json", "@/nonexistent/body.json"], "cannot read"),
        (["--agent", "ghost", "GET", OPENAI], "no agent named 'ghost'"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    code, out = run(write(tmp_path, BASE + RULES), *args)
    assert code == 2 and message in out, out


def test_config_check(tmp_path: Path) -> None:
    good = write(tmp_path, BASE + RULES)
    result = CliRunner().invoke(config, ["check", str(good)])
    digest = load_config(good).digest
    assert result.exit_code == 0, result.output
    assert (
        result.output.startswith(f"ok  {good.resolve()}: 2 allow rules, 9 CEL rules") and digest[:16] in result.output
    )
    # --config and $EGRESS_GUARD_CONFIG name the file as for every command
    assert CliRunner().invoke(config, ["check", "--config", str(good)]).exit_code == 0
    assert CliRunner(env={"EGRESS_GUARD_CONFIG": str(good)}).invoke(config, ["check"]).exit_code == 0


def test_config_check_prints_the_error_up_prints(tmp_path: Path) -> None:
    bad = write(tmp_path, BASE + "rules:\n  - {match: \"modle == 'x'\", action: deny}\n")
    checked = CliRunner().invoke(config, ["check", str(bad)])
    started = CliRunner().invoke(up, ["--config", str(bad)])
    assert checked.exit_code == started.exit_code == 2
    assert checked.output == started.output, (checked.output, started.output)
    assert f"Error: {bad}:6: rules[0].match: CEL: undeclared reference to 'modle'" in checked.output
    missing = CliRunner().invoke(config, ["check", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "file not found" in missing.output
    # `check` refuses a bad config the same way
    assert CliRunner().invoke(check, ["--config", str(bad), "GET", OPENAI]).exit_code == 2
