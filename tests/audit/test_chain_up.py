"""The chain end to end: `egress-guard up` as a real process writes chained rows and logs its
anchors on stderr; `audit verify --anchors` that log passes, and fails once the newest row is
deleted by hand."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from egress_guard.cli import main

EG = [sys.executable, "-m", "egress_guard"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verify(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["audit", "verify", "--config", str(config), *args], catch_exceptions=False)
    return result.exit_code, result.output


def test_up_logs_anchors_that_verify_checks(tmp_path: Path) -> None:
    assert CliRunner().invoke(main, ["init", "--dir", str(tmp_path)]).exit_code == 0
    config, log = tmp_path / "egress-guard.yaml", tmp_path / "proxy.log"
    port = free_port()
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [*EG, "up", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("egress-guard listening on")
            for i in range(6):  # denied CONNECTs: one audit row each, no upstream needed
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(f"CONNECT blocked-{i}.example:443 HTTP/1.1\r\n\r\n".encode())
                    assert s.recv(100).startswith(b"HTTP/1.1 403")
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0
    text = log.read_text()
    assert "INFO egress_guard.audit: audit anchor: chain=local seq=6 hash=" in text, text
    code, out = verify(config, "--anchors", str(log))
    assert code == 0 and "6 rows" in out and "1 found, 1 checked" in out, out

    conn = sqlite3.connect(tmp_path / "egress-guard.db")
    conn.execute("DELETE FROM audit WHERE id = (SELECT MAX(id) FROM audit)")
    conn.commit()
    conn.close()
    assert verify(config)[0] == 0  # the chain alone cannot see a cut tail
    code, out = verify(config, "--anchors", str(log))
    assert code == 1 and "chain local seq 6 is not in the DB (its head is seq 5)" in out, out
