"""`egress-guard init`: the config, the CA and the audit DB, each created only if missing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from egress_guard import ca, fakekeys, store
from egress_guard.config import DEFAULT_CONFIG_NAME, load_config

DEFAULT_CONFIG = """\
# egress-guard configuration. Reference: docs/configuration.md (one section per key).
version: 1

# Where agents send their traffic (HTTP_PROXY / HTTPS_PROXY). Loopback by default;
# bind a bridge address (e.g. 172.17.0.1:8080) only for containers that need it.
listen: 127.0.0.1:8080

# The proxy's certificate authority (created by `egress-guard init`).
ca_dir: ./certs

audit:
  path: ./egress-guard.db   # SQLite, WAL; query it with `egress-guard audit` or sqlite3
  query_strings: false      # record only the path, never ?query=... (it may carry secrets)

# Default deny: only what these presets and rules allow leaves the machine.
# Presets: anthropic, github, google-gemini, npm, openai, pypi (see allowlists/).
allowlists:
  - openai
  - anthropic
  - google-gemini
  # - github
  # - pypi
  # - npm

# Inline rules. host: exact name or a '*.' prefix under a registered domain (never right
# under a public suffix such as *.co.uk or *.github.io); ports default to [443] (list 80
# for plain HTTP: credentialed services never send their secret over it); methods and
# paths (globs, '*' also matches '/') default to any.
allow: []
#  - host: api.github.com
#    methods: [GET]
#    paths: ["/repos/*"]

# Credentialed services: agents hold fake keys; egress-guard puts the real secret in, only
# on the service's own hosts. Presets: openai, anthropic, google-gemini, github (and
# example.yaml as a template). Override a preset's secret: {preset: openai, secret: vault:…}.
services:
  - openai
  - anthropic
  - google-gemini

# Where real secrets come from. env (default): egress-guard's own environment: export
# OPENAI_API_KEY etc. BEFORE `egress-guard up` (`up` warns about each one it cannot read).
# vault: HashiCorp Vault / OpenBao.
secrets:
  backend: env
  cache_ttl: 300          # seconds a secret read from vault is reused
  # vault:
  #   address: https://vault.internal:8200
  #   auth: {method: token, token_env: VAULT_TOKEN}      # or {method: approle}
  #   kv_version: 2
  #   ca_file: null
  #   namespace: null

# Agents, the services each may use, and its limits: `egress-guard run --agent NAME -- CMD`.
agents:
  agent:
    services: [openai, anthropic, google-gemini]
    limits:
      budget_usd: {session: 5, day: 20}   # USD, priced from real token usage (also: total)
      # requests_per_minute: 60
      # tokens_per_minute: 200000
      # concurrent: 4
      # models: {openai: [gpt-4o-mini], anthropic: ["claude-haiku-*"]}
      # sessions: {"nightly-*": {budget_usd: 25}}   # per-session overrides (session id or glob)

# How calls are priced (genai-prices' bundled price data; no network).
spend:
  timezone: UTC                 # when "day" budgets reset
  unknown_model: deny           # or fallback, with fallback_price: {input_per_mtok: 10, output_per_mtok: 30}
  default_max_output_tokens: 4096   # reserved when a request sets no max_tokens
  on_overrun: finish            # or cut: end a stream cleanly when it crosses a budget

network:
  allow_private: []       # CIDRs exempt from the SSRF guard, e.g. [10.0.0.0/8]
  hosts: {}               # pinned resolution, operator-trusted: {"llm.internal": ["10.0.0.5"]}
  upstream_ca: null       # extra PEM CA for upstream TLS (certifi and the OS trust store are always trusted)
  idle_timeout: 1800      # seconds a silent connection may stay open (long LLM calls)
  connect_timeout: 10     # seconds to connect to an upstream
  tls_timeout: 10         # seconds for the upstream TLS handshake
  response_timeout: 300   # seconds from sending a request to the upstream's response headers
  header_timeout: 30      # seconds an agent may take to send its request headers
"""


@dataclass
class InitReport:
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def _create_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 (never readable by others: a sandboxed agent runs as another user),
    failing if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def init(directory: Path, config_path: Path | None = None) -> InitReport:
    """Create whatever of config, CA and audit DB is missing under `directory`."""
    report = InitReport()
    directory.mkdir(parents=True, exist_ok=True)
    config_path = config_path or directory / DEFAULT_CONFIG_NAME
    if config_path.exists():
        report.kept.append(f"config {config_path}")
    else:
        _create_private(config_path, DEFAULT_CONFIG.encode())
        report.created.append(f"config {config_path} (mode 0600)")
    config = load_config(config_path)  # a kept config must still be valid
    ca_cert = ca.CAFiles(config.ca_dir).cert
    if ca.create_ca(config.ca_dir):
        report.created.append(f"CA {ca_cert} (key {ca.CAFiles(config.ca_dir).key_and_cert}, mode 0600)")
    else:
        report.kept.append(f"CA {ca_cert}")
    ca.write_bundle(config.ca_dir)  # system roots + our CA, for containers that mount certs/
    hmac_file = config.ca_dir / fakekeys.HMAC_KEY_FILE
    if hmac_file.exists():
        report.kept.append(f"fake-key HMAC key {hmac_file}")
    else:
        fakekeys.load_or_create_hmac_key(config.ca_dir)
        report.created.append(f"fake-key HMAC key {hmac_file} (mode 0600)")
    if config.store is not None:  # PostgreSQL: the first replica to start migrates it; no SQLite file
        report.kept.append(f"store {config.store_name} (not touched: the first replica to start migrates it)")
        return report
    existed = config.audit_path.exists()
    if not existed:  # 0600 before SQLite opens it: its -wal and -shm files take the DB's mode
        config.audit_path.parent.mkdir(parents=True, exist_ok=True)
        _create_private(config.audit_path, b"")
    applied = store.migrate(config.audit_path)
    if existed:
        note = f" (applied migrations {', '.join(applied)})" if applied else ""
        report.kept.append(f"audit DB {config.audit_path}{note}")
    else:
        report.created.append(f"audit DB {config.audit_path} (mode 0600)")
    return report
