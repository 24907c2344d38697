"""The CLI with click's CliRunner on real files, and `up` / `run` as real processes."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from egress_guard import ca, store
from egress_guard.cli import main

EG = [sys.executable, "-m", "egress_guard"]


def invoke(*args: str, cwd: Path | None = None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, list(args), catch_exceptions=False)
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_creates_everything_and_twice_keeps_the_ca(tmp_path: Path) -> None:
    first = invoke("init", "--dir", str(tmp_path))
    assert first.exit_code == 0, first.output
    assert "created config" in first.output and "created CA" in first.output and "created audit DB" in first.output
    key = tmp_path / "certs" / "mitmproxy-ca.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes(), (tmp_path / "certs" / "egress-guard-ca.pem").read_bytes()
    (tmp_path / "egress-guard.yaml").write_text((tmp_path / "egress-guard.yaml").read_text() + "# mine\n")
    second = invoke("init", "--dir", str(tmp_path))
    assert second.exit_code == 0
    assert "created" not in second.output
    assert second.output.count("kept") == 4  # config, CA, HMAC key, DB
    assert (key.read_bytes(), (tmp_path / "certs" / "egress-guard-ca.pem").read_bytes()) == before
    assert (tmp_path / "egress-guard.yaml").read_text().endswith("# mine\n")


def test_ca_is_a_proper_ca(tmp_path: Path) -> None:
    from cryptography import x509

    ca.create_ca(tmp_path)
    cert = x509.load_pem_x509_certificate((tmp_path / "egress-guard-ca.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_init_with_broken_existing_config_says_so(tmp_path: Path) -> None:
    (tmp_path / "egress-guard.yaml").write_text("version: 1\nallow: [{host: '*'}]\n")
    result = invoke("init", "--dir", str(tmp_path))
    assert result.exit_code == 2
    assert "allow[0].host: a bare '*' would allow every host" in result.output


def test_env_formats(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    cfg = str(tmp_path / "egress-guard.yaml")
    result = invoke("env", "--config", cfg, "--format", "json")
    env = json.loads(result.output)
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://127.0.0.1:8080"
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1"
    bundle = Path(env["SSL_CERT_FILE"])
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT", "AWS_CA_BUNDLE"):
        assert env[var] == str(bundle)
    assert env["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "certs" / "egress-guard-ca.pem")
    our_ca = (tmp_path / "certs" / "egress-guard-ca.pem").read_bytes()
    data = bundle.read_bytes()
    assert data.endswith(our_ca) and data.count(b"BEGIN CERTIFICATE") > 10  # system roots + ours
    sh = invoke("env", "--config", cfg, "--proxy-host", "172.17.0.1", "--no-proxy", "").output
    assert "export HTTPS_PROXY=http://172.17.0.1:8080\n" in sh and "export NO_PROXY=''\n" in sh
    dotenv = invoke("env", "--config", cfg, "--format", "dotenv").output
    assert f"SSL_CERT_FILE={bundle}\n" in dotenv


def test_env_without_ca_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "egress-guard.yaml").write_text("version: 1\n")
    result = invoke("env", "--config", str(tmp_path / "egress-guard.yaml"))
    assert result.exit_code == 1 and "Fix: run 'egress-guard init'" in result.output


def test_run_gives_the_command_the_agent_environment(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    out = subprocess.run(
        [
            *EG,
            "run",
            "--config",
            str(tmp_path / "egress-guard.yaml"),
            "--",
            "sh",
            "-c",
            'printf "%s|%s|%s" "$HTTPS_PROXY" "$SSL_CERT_FILE" "$1"; exit 7',
            "sh",
            "arg with space",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 7  # the command's own exit status
    proxy, bundle, arg = out.stdout.split("|")
    assert proxy == "http://127.0.0.1:8080" and bundle.endswith("ca-bundle.pem") and arg == "arg with space"
    missing = subprocess.run(
        [*EG, "run", "--config", str(tmp_path / "egress-guard.yaml"), "--", "no-such-cmd-xyz"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1 and "cannot run 'no-such-cmd-xyz'" in missing.stderr


@pytest.fixture
def audit_db(tmp_path: Path) -> Path:
    invoke("init", "--dir", str(tmp_path))
    conn = sqlite3.connect(tmp_path / "egress-guard.db")
    rows = [
        (
            "2026-11-22T08:00:00.000Z",
            "r1",
            "connect",
            None,
            "allow",
            "api.openai.com:443 is allowed",
            "openai#0",
            "CONNECT",
            None,
            "api.openai.com",
            443,
            None,
            200,
            None,
            None,
        ),
        (
            "2026-11-22T08:00:01.000Z",
            "r2",
            "request",
            "agent-a",
            "allow",
            "POST api.openai.com is allowed",
            "openai#0",
            "POST",
            "https",
            "api.openai.com",
            443,
            "/v1/chat/completions",
            200,
            120,
            900,
        ),
        (
            "2026-11-22T09:00:00.000Z",
            "r3",
            "connect",
            "agent-b",
            "deny",
            'host evil.com, "x" is not on the allowlist',
            None,
            "CONNECT",
            None,
            "evil.com",
            443,
            None,
            403,
            None,
            180,
        ),
    ]
    conn.executemany(
        "INSERT INTO audit (ts, request_id, kind, agent, decision, reason, rule, method, scheme, host, port, path,"
        " status, request_bytes, response_bytes) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    conn.commit()
    return tmp_path / "egress-guard.yaml"


def test_audit_query_json(audit_db: Path) -> None:
    result = invoke("audit", "--config", str(audit_db), "--format", "json")
    rows = json.loads(result.output)
    assert [r["request_id"] for r in rows] == ["r1", "r2", "r3"]
    assert rows[1] | {"id": 2} == rows[1] and rows[1]["path"] == "/v1/chat/completions"
    assert rows[1]["response_bytes"] == 900 and rows[1]["agent"] == "agent-a"
    assert set(rows[0]) == set(store.COLUMNS)
    denied = json.loads(
        invoke("audit", "query", "--config", str(audit_db), "--decision", "deny", "--format", "json").output
    )
    assert [r["request_id"] for r in denied] == ["r3"]
    by_agent = json.loads(invoke("audit", "--agent", "agent-a", "--config", str(audit_db), "--format", "json").output)
    assert [r["request_id"] for r in by_agent] == ["r2"]
    timed = json.loads(
        invoke(
            "audit",
            "--config",
            str(audit_db),
            "--since",
            "2026-11-22T08:30",
            "--until",
            "2026-11-22T10:00Z",
            "--format",
            "json",
        ).output
    )
    assert [r["request_id"] for r in timed] == ["r3"]


def test_audit_query_csv(audit_db: Path) -> None:
    result = invoke("audit", "--config", str(audit_db), "--format", "csv", "--host", "evil.com")
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 1
    assert rows[0]["reason"] == 'host evil.com, "x" is not on the allowlist'  # quoting survives
    assert rows[0]["status"] == "403" and rows[0]["path"] == "" and rows[0]["decision"] == "deny"
    assert list(rows[0]) == store.COLUMNS
    empty = invoke("audit", "--config", str(audit_db), "--format", "csv", "--host", "nowhere")
    assert empty.output.strip() == ",".join(store.COLUMNS)


def test_audit_table_stats_and_tail(audit_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    table = invoke("audit", "--config", str(audit_db), "--limit", "2").output.splitlines()
    assert table[0].split() == ["id", "ts", "decision", "method", "host", "port", "path", "status", "reason"]
    assert len(table) == 3 and "evil.com" in table[2]
    stats = json.loads(invoke("audit", "stats", "--config", str(audit_db), "--format", "json").output)
    assert [(s["host"], s["decision"], s["requests"]) for s in stats] == [
        ("api.openai.com", "allow", 2),
        ("evil.com", "deny", 1),
    ]
    tail = invoke("audit", "tail", "--config", str(audit_db), "-n", "1", "--no-follow", "--format", "jsonl").output
    assert [json.loads(line)["request_id"] for line in tail.splitlines()] == ["r3"]


def test_audit_tail_follows_new_rows(audit_db: Path) -> None:
    import threading

    with subprocess.Popen(
        [
            *EG,
            "audit",
            "tail",
            "--config",
            str(audit_db),
            "-n",
            "1",
            "--interval",
            "0.1",
            "--format",
            "jsonl",
            "--decision",
            "deny",
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout.readline() for _ in range(2)), daemon=True)
        reader.start()
        deadline = time.monotonic() + 20
        while not lines:  # the newest existing row first: tail is up and following
            assert time.monotonic() < deadline, "tail printed nothing"
            time.sleep(0.05)
        conn = sqlite3.connect(audit_db.parent / "egress-guard.db")
        conn.execute(
            "INSERT INTO audit (ts, request_id, kind, decision) VALUES ('2026-11-22T10:00:00Z', 'ok', 'request', 'allow')"
        )
        conn.execute(
            "INSERT INTO audit (ts, request_id, kind, decision) VALUES ('2026-11-22T10:00:01Z', 'new', 'request', 'deny')"
        )
        conn.commit()
        reader.join(20)
        proc.terminate()
    assert [json.loads(line)["request_id"] for line in lines] == ["r3", "new"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "use an ISO time"),
        (["--decision", "maybe"], "'maybe' is not one of"),
        (["--limit", "0"], "0 is not in the range"),
    ],
)
def test_audit_bad_arguments(audit_db: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["audit", "--config", str(audit_db), *args])
    assert result.exit_code == 2 and message in result.output


def test_audit_without_db_names_the_fix(tmp_path: Path) -> None:
    (tmp_path / "egress-guard.yaml").write_text("version: 1\n")
    result = invoke("audit", "--config", str(tmp_path / "egress-guard.yaml"))
    assert result.exit_code == 1 and "no audit DB" in result.output and "egress-guard init" in result.output


# --- `up` as a real process --------------------------------------------------------------------


def run_up(config: Path, port: int) -> subprocess.CompletedProcess[str]:
    """`egress-guard up` expected to exit on its own (it fails to start)."""
    return subprocess.run(
        [*EG, "up", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_up_with_bad_config_exits_2_before_listening(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("version: 1\nallow:\n  - host: '*.openai.*'\n")
    port = free_port()
    out = run_up(tmp_path / "bad.yaml", port)
    assert out.returncode == 2
    assert f"{tmp_path / 'bad.yaml'}:3: allow[0].host:" in out.stderr and "Fix: use api.openai.com" in out.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_up_with_unwritable_audit_db_exits_with_reason(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    (tmp_path / "blocker").write_text("")
    cfg = yaml.safe_load((tmp_path / "egress-guard.yaml").read_text())
    cfg["audit"]["path"] = "blocker/audit.db"
    (tmp_path / "egress-guard.yaml").write_text(yaml.safe_dump(cfg))
    out = run_up(tmp_path / "egress-guard.yaml", free_port())
    assert out.returncode == 1
    assert "audit log" in out.stderr and "blocker/audit.db" in out.stderr and "audit.path" in out.stderr


def test_up_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_up(tmp_path / "egress-guard.yaml", port)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_up_creates_defaults_prints_banner_and_flushes_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*EG, "up", "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(7)]
        assert banner[0] == f"egress-guard listening on http://127.0.0.1:{port}\n"
        assert "egress-guard.yaml (3 allow rules: openai, anthropic, google-gemini)" in banner[1]
        assert str(tmp_path / "certs" / "egress-guard-ca.pem") in banner[2]
        assert str(tmp_path / "egress-guard.db") in banner[3]
        assert banner[4] == "  agents:   agent (openai, anthropic, google-gemini)\n"
        assert " run --config " in banner[5] and banner[5].endswith(" --agent agent -- CMD\n")
        assert banner[6].startswith('  or:       eval "$(') and " env --config " in banner[6]
        n = 20
        for i in range(n):  # denied CONNECTs: one audit row each, no upstream needed
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"CONNECT blocked-{i}.example:443 HTTP/1.1\r\n\r\n".encode())
                assert s.recv(100).startswith(b"HTTP/1.1 403")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "no egress-guard.yaml here: creating the defaults" in err
    assert f"{n} audit rows written, 0 lost" in err
    conn = sqlite3.connect(tmp_path / "egress-guard.db")
    assert conn.execute("SELECT COUNT(*) FROM audit WHERE decision = 'deny' AND kind = 'connect'").fetchone()[0] == n


# --- fake keys on the command line ---------------------------------------------------------------


def test_run_with_agent_gets_fake_keys_and_never_the_real_ones(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    real = "sk-proj-REALkeyOnTheHost0123456789"
    env = {**os.environ, "OPENAI_API_KEY": real, "ANTHROPIC_API_KEY": "sk-ant-REAL", "GEMINI_API_KEY": "AIzaREAL"}
    script = (
        'printf "%s|%s|%s|%s" "$OPENAI_API_KEY" "$ANTHROPIC_API_KEY" "${GEMINI_API_KEY-unset}" "$EGRESS_GUARD_AGENT"'
    )
    cfg = str(tmp_path / "egress-guard.yaml")
    out = subprocess.run(
        [*EG, "run", "--config", cfg, "--agent", "agent", "--services", "openai,anthropic", "--", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    openai_key, anthropic_key, gemini, agent = out.stdout.split("|")
    assert openai_key.startswith("sk-proj-") and openai_key != real and anthropic_key.startswith("sk-ant-api03-")
    assert gemini == "unset" and agent == "agent"  # a real secret not swapped for a fake one is removed
    plain = subprocess.run(
        [*EG, "run", "--config", cfg, "--", "sh", "-c", 'printf "%s" "${OPENAI_API_KEY-unset}"'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert plain.stdout == "unset"
    listed = json.loads(invoke("keys", "list", "--config", cfg, "--format", "json").output)
    assert [(k["agent"], k["services"], k["status"]) for k in listed] == [("agent", "openai,anthropic", "active")]


def test_env_with_agent_and_keys_mint(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    cfg = str(tmp_path / "egress-guard.yaml")
    sh = invoke("env", "--config", cfg, "--agent", "agent", "--services", "openai").output
    assert "export OPENAI_API_KEY=sk-proj-" in sh and "unset ANTHROPIC_API_KEY\n" in sh
    assert "unset OPENAI_API_KEY" not in sh
    minted = CliRunner().invoke(
        main,
        ["keys", "mint", "--config", cfg, "--agent", "agent", "--ttl", "2h", "--session", "run-42", "--format", "json"],
    )
    assert minted.exit_code == 0
    data = json.loads(minted.stdout)
    assert data["EGRESS_GUARD_SESSION"] == "run-42" and data["GEMINI_API_KEY"].startswith("AIza")
    assert "for agent agent, session run-42" in minted.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent", "nobody"], "no agent named 'nobody'"),
        (["--agent", "agent", "--services", "github"], "may not use github"),
        (["--agent", "agent", "--ttl", "soon"], "'soon' is not a duration"),
        (["--agent", "agent", "--ttl", "100d"], "longer than the 90 days"),
        (["--agent", "agent", "--session", "bad id"], "not a valid session id"),
    ],
)
def test_keys_mint_errors(tmp_path: Path, args: list[str], message: str) -> None:
    invoke("init", "--dir", str(tmp_path))
    result = CliRunner().invoke(main, ["keys", "mint", "--config", str(tmp_path / "egress-guard.yaml"), *args])
    assert result.exit_code == 1 and message in result.output


def test_kill_needs_exactly_one_target_and_is_stored(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    cfg = str(tmp_path / "egress-guard.yaml")
    assert CliRunner().invoke(main, ["kill", "--config", cfg]).exit_code == 2
    invoke("keys", "mint", "--config", cfg, "--agent", "agent", "--session", "s1")
    invoke("keys", "mint", "--config", cfg, "--agent", "agent", "--session", "s2")
    assert "revoked 1 key(s) of session s1" in invoke("kill", "--config", cfg, "--session", "s1").output
    assert "revoked 1 key(s) of agent agent" in invoke("kill", "--config", cfg, "--agent", "agent").output
    rows = json.loads(invoke("keys", "list", "--config", cfg, "--all", "--format", "json").output)
    assert {r["session"]: r["status"] for r in rows} == {"s1": "revoked", "s2": "revoked"}


# --- what a new user tripped over ------------------------------------------------------------------

HOST_SECRETS = {"ANTHROPIC_API_KEY": "sk-ant-hostREALvalue-0042", "GEMINI_API_KEY": "AIzaHostREALvalue-0043"}


def _clean_env(**extra: str) -> dict[str, str]:
    drop = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GH_TOKEN", "EGRESS_GUARD_PROG", "COLUMNS"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("EGRESS_GUARD_")} | extra


def test_up_warns_keeps_a_status_doctor_reads_and_prints_commands_that_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`up` started without OPENAI_API_KEY: it says so (per service, never a value); doctor,
    run from a shell that HAS the variable, reports the running proxy's view; the banner's
    commands work as printed from another directory, and find the port `--listen` chose."""
    invoke("init", "--dir", str(tmp_path))
    cfg = tmp_path / "egress-guard.yaml"
    port = free_port()  # not the config's 8080: env must learn it from the running proxy
    env = _clean_env(**HOST_SECRETS)
    proc = subprocess.Popen(
        [*EG, "up", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status_file = tmp_path / "egress-guard.status.json"
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(7)]
        deadline = time.monotonic() + 30
        while not status_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no status file"
            time.sleep(0.05)
        status = json.loads(status_file.read_text())
        assert status["pid"] == proc.pid and status["listen"] == f"127.0.0.1:{port}"
        assert status["services"]["openai"] == {
            "secret": "env:OPENAI_API_KEY",
            "resolves": False,
            "problem": "environment variable OPENAI_API_KEY is not set where egress-guard runs",
        }
        assert status["services"]["anthropic"]["resolves"] is True

        # doctor asks the running proxy, not this shell (which has the variable)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-proj-onlyInDoctorsShell")
        doctor = CliRunner().invoke(main, ["doctor", "--config", str(cfg)])
        assert doctor.exit_code == 1, doctor.output
        assert f"running proxy: pid {proc.pid}" in doctor.output
        assert (
            "service openai: secret env:OPENAI_API_KEY resolves: no (in the running proxy: environment variable"
            in doctor.output
        )
        assert "Fix: export OPENAI_API_KEY in the shell that runs 'up'" in doctor.output
        assert "service anthropic: secret env:ANTHROPIC_API_KEY resolves: yes (in the running proxy)" in doctor.output

        # the banner's commands, pasted into a shell somewhere else
        elsewhere = tmp_path / "agent-project"
        elsewhere.mkdir()
        run_line = (
            banner[5]
            .split("run:", 1)[1]
            .strip()
            .replace("-- CMD", "-- sh -c 'printf %s \"$HTTPS_PROXY|$CODEX_API_KEY|$OPENAI_API_KEY\"'")
        )
        ran = subprocess.run(["sh", "-c", run_line], cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
        proxy_url, codex_key, openai_key = ran.stdout.split("|")
        assert proxy_url == f"http://127.0.0.1:{port}"
        assert openai_key.startswith("sk-proj-") and codex_key == openai_key  # Codex CLI reads CODEX_API_KEY
        env_cmd = banner[6].split('eval "$(', 1)[1].split(')"', 1)[0]
        printed = subprocess.run(
            ["sh", "-c", env_cmd], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
        )
        assert f"export HTTPS_PROXY=http://127.0.0.1:{port}\n" in printed.stdout

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "WARNING: service openai: its secret env:OPENAI_API_KEY does not resolve" in err
    assert "Fix: export OPENAI_API_KEY in the shell you start 'up' from" in err
    assert "service anthropic" not in err and "service google-gemini" not in err
    for value in HOST_SECRETS.values():
        assert value not in out + err + "".join(banner)
    assert not status_file.exists()  # removed on shutdown: doctor then checks its own shell, and says so
    doctor = CliRunner().invoke(main, ["doctor", "--config", str(cfg)])
    assert "no running proxy found for this config" in doctor.output
    assert "service openai: secret env:OPENAI_API_KEY resolves: yes (in this shell)" in doctor.output


def test_banner_commands_in_the_dev_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from egress_guard.cli.common import load as _load
    from egress_guard.cli.up import _next_steps

    invoke("init", "--dir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EGRESS_GUARD_PROG", "./dev eg")  # ./dev sets it; ./dev eg runs where ./dev up did
    steps = _next_steps(_load(None))
    assert "  run:      ./dev eg run --agent agent -- CMD\n" in steps
    assert '  or:       eval "$(./dev eg env --agent agent)"' in steps
    cfg = tmp_path / "egress-guard.yaml"
    cfg.write_text(cfg.read_text().split("\nagents:", 1)[0] + "\n")  # no agents
    steps = _next_steps(_load(None))
    assert "none configured" in steps and "./dev eg run -- CMD" in steps


def test_env_for_an_agent_without_services_still_sets_the_proxy(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    cfg = tmp_path / "egress-guard.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["agents"]["browser"] = {"services": []}
    cfg.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["env", "--config", str(cfg), "--agent", "browser"])
    assert result.exit_code == 0, result.output
    assert "export HTTPS_PROXY=http://127.0.0.1:8080\n" in result.stdout
    assert "export SSL_CERT_FILE=" in result.stdout and "export EGRESS_GUARD_AGENT=browser\n" in result.stdout
    assert "_API_KEY=" not in result.stdout.replace("unset", "")  # no keys minted...
    assert "unset OPENAI_API_KEY\n" in result.stdout  # ...and the host's real ones withheld
    assert "agent 'browser' has no credentialed services" in result.stderr and "no keys minted" in result.stderr
    unknown = CliRunner().invoke(main, ["env", "--config", str(cfg), "--agent", "nobody"])
    assert unknown.exit_code == 1 and "no agent named 'nobody'" in unknown.output  # a typo still fails


def test_agents_get_the_variables_popular_clis_read_and_never_the_hosts(tmp_path: Path) -> None:
    invoke("init", "--dir", str(tmp_path))
    cfg = tmp_path / "egress-guard.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["allowlists"].append("github")
    data["services"].append("github")
    data["agents"]["agent"]["services"].append("github")
    cfg.write_text(yaml.safe_dump(data))
    env = json.loads(invoke("env", "--config", str(cfg), "--agent", "agent", "--format", "json").output)
    assert env["CODEX_API_KEY"] == env["OPENAI_API_KEY"] and env["OPENAI_API_KEY"].startswith("sk-proj-")
    assert env["GOOGLE_API_KEY"] == env["GEMINI_API_KEY"] and env["GITHUB_TOKEN"] == env["GH_TOKEN"]
    host = _clean_env(GITHUB_TOKEN="ghp_hostREALtoken0044", CODEX_API_KEY="sk-hostREAL0045", GOOGLE_API_KEY="AIzaHost")
    ran = subprocess.run(
        [
            *EG,
            "run",
            "--config",
            str(cfg),
            "--",
            "sh",
            "-c",
            'printf "%s|%s|%s" "${GITHUB_TOKEN-unset}" "${CODEX_API_KEY-unset}" "${GOOGLE_API_KEY-unset}"',
        ],
        env=host,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout == "unset|unset|unset"


def test_audit_table_wraps_the_reason(audit_db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = (
        "credential denied-foreign-key: the Authorization header holds something that is not an egress-guard key "
        "(a real key smuggled in?). Fix: give the agent its fake key with 'egress-guard env --agent NAME' and "
        "never a real one"
    )
    conn = sqlite3.connect(audit_db.parent / "egress-guard.db")
    conn.execute(
        "INSERT INTO audit (ts, request_id, kind, decision, host, reason) VALUES (?, 'long', 'request', 'deny', ?, ?)",
        ("2026-11-22T11:00:00.000Z", "api.openai.com", reason),
    )
    conn.commit()
    for columns in (160, 80):
        monkeypatch.setenv("COLUMNS", str(columns))
        lines = invoke("audit", "--config", str(audit_db), "--host", "api.openai.com").output.splitlines()
        row = next(i for i, line in enumerate(lines) if "2026-11-22T11" in line)
        # the other columns may be wider than a narrow terminal; the reason's lines never are
        assert all(len(line) <= columns for line in lines[row + 1 :]), "\n".join(lines)
        if columns == 160:
            assert all(len(line) <= columns for line in lines), "\n".join(lines)
        if columns == 160:  # beside the other columns, continuing under itself
            start = lines[0].index("reason")
            assert all(line[:start].strip() == "" for line in lines[row + 1 :])
            wrapped = [line[start:] for line in lines[row:]]
        else:  # too narrow for that: on indented lines below its row
            wrapped = [line.strip() for line in lines[row + 1 :]]
        assert " ".join(wrapped) == reason and len(wrapped) >= 2, "\n".join(lines)
