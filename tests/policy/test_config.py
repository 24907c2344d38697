"""Config loading: the documented shape loads; every broken file gives one message naming
the file, the key path and the fix."""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal
from pathlib import Path

import pytest

from egress_guard.bootstrap import DEFAULT_CONFIG
from egress_guard.config import (
    ConfigError,
    ConfigWire,
    PresetWire,
    ServiceRefWire,
    ServiceWire,
    load_config,
    parse_listen,
    preset_names,
)
from egress_guard.config.errors import reference
from egress_guard.spend import Meter

BROKEN = [
    # (yaml, key path in the message, fragment of the problem, fragment of the fix)
    ("listen: 127.0.0.1:8080\n", "version", "missing", "add 'version: 1'"),
    ("version: 2\n", "version", "unsupported version", "version: 1"),
    ("version: 1\nlisten: 127.0.0.1\n", "listen", "is not HOST:PORT", "127.0.0.1:8080"),
    ("version: 1\nallow: [{host: '*'}]\n", "allow[0].host", "bare '*'", "*.example.com"),
    ("version: 1\nallow: [{host: '*.openai.*'}]\n", "allow[0].host", "only allowed as a leading", "not *.openai.*"),
    ("version: 1\nallow: [{host: 'api*.openai.com'}]\n", "allow[0].host", "leading '*.'", "api.openai.com"),
    ("version: 1\nallow: [{host: 'https://api.openai.com/v1'}]\n", "allow[0].host", "is a URL", "'api.openai.com'"),
    ("version: 1\nallow: [{host: 'api.openai.com:443'}]\n", "allow[0].host", "includes a port", "ports: [443]"),
    ("version: 1\nallow: [{host: '*.com'}]\n", "allow[0].host", "whole top-level domain", "*.example.com"),
    ("version: 1\nallow: [{host: '*.10.0.0.1'}]\n", "allow[0].host", "cannot prefix an IP", "address alone"),
    ("version: 1\nallow: [{host: 'a b'}]\n", "allow[0].host", "not a valid host name", "DNS name"),
    ("version: 1\nallow: [{host: x.com, ports: [0]}]\n", "allow[0].ports", "invalid ports", "1 to 65535"),
    ("version: 1\nallow: [{host: x.com, methods: [FETCH]}]\n", "allow[0].methods", "FETCH", "CONNECT is implied"),
    ("version: 1\nallow: [{host: x.com, paths: ['v1/*']}]\n", "allow[0].paths", "must start with '/'", "/v1/*"),
    ("version: 1\nallow: [{hots: x.com}]\n", "allow[0]", "unknown key 'hots'", "host, ports, methods, paths"),
    ("version: 1\nnetwork: {allow_privat: []}\n", "network", "unknown key 'allow_privat'", "allow_private"),
    ("version: 1\nbogus: 1\n", "bogus", "unknown key 'bogus'", "allowlists"),
    ("version: 1\nallow: [{hots: x.com}]\n", "allow[0]", "unknown key", "did you mean 'host'?"),
    ("version: 1\nallowlists: [opnai]\n", "allowlists[0]", "no preset named 'opnai'", "openai"),
    ("version: 1\nallowlists: [./missing.yaml]\n", "allowlists[0]", "cannot read", "relative to the config file"),
    ("version: 1\nnetwork: {allow_private: [10.0.0.0/33]}\n", "network.allow_private[0]", "not a CIDR", "10.0.0.0/8"),
    (
        "version: 1\nnetwork: {hosts: {llm.internal: [not-an-ip]}}\n",
        "network.hosts.llm.internal",
        "not an IP",
        "literal",
    ),
    ("version: 1\nnetwork: {upstream_ca: ./nope.pem}\n", "network.upstream_ca", "does not exist", "PEM file"),
    (
        "version: 1\nnetwork: {idle_timeout: 1}\n",
        "network.idle_timeout",
        "greater than or equal to 10",
        "docs/configuration.md#network",
    ),
    (
        "version: 1\nnetwork: {idle_timeout: 300, response_timeout: 600}\n",
        "network.idle_timeout",
        "not above network.response_timeout",
        "raise idle_timeout above 600",
    ),
    ("version: 1\nallow: {host: x.com}\n", "allow", "valid list", "docs/configuration.md#rules"),
    ("version: 1\nallow: [\n", "", "not valid YAML", "YAML syntax"),
    ("version: 1\nallow: []\nallow: [{host: x.com}]\n", "", "key 'allow' appears twice", "keep one"),
    ("- just\n- a list\n", "", "must be a YAML mapping", "version: 1"),
    (
        "version: 1\nservices: [openai]\n",
        "services[0].hosts[0]",
        "api.openai.com is not on the allowlist",
        "add the openai preset to allowlists",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [{preset: openai, secret: 'vault:secret/x#k'}]\n",
        "services[0].secret",
        "needs the vault backend",
        "secrets.backend: vault",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [{preset: openai, secret: OPENAI_KEY}]\n",
        "services[0].secret",
        "is not a secret reference",
        "env:OPENAI_API_KEY",
    ),
    ("version: 1\nallowlists: [pypi]\nservices: [pypi]\n", "services[0].preset", "defines no service", "openai"),
    ("version: 1\nallowlists: [openai]\nservices: [openai, openai]\n", "services[1]", "listed twice", "keep one"),
    (
        "version: 1\nallowlists: [openai]\nservices: [{preset: openai, secrte: x}]\n",
        "services[0]",
        "unknown key 'secrte'",
        "did you mean 'secret'?",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [openai]\nagents: {a: {services: [anthropic]}}\n",
        "agents.a.services[0]",
        "no service named 'anthropic'",
        "openai",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [openai]\n"
        "agents: {a: {services: [openai], limits: {sessions: {'nightly/*': {budget_usd: 1}}}}}\n",
        "agents.a.limits.sessions.nightly/*",
        "is not a session id or glob",
        "glob characters",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [openai]\n"
        "agents: {a: {services: [openai], limits: {sessions: {'ci-*': {}}}}}\n",
        "agents.a.limits.sessions.ci-*",
        "changes nothing",
        "budget_usd: N",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [openai]\n"
        "agents: {a: {services: [openai], limits: {sessions: {'ci-*': {models: {anthropic: [x]}}}}}}\n",
        "agents.a.limits.sessions.ci-*.models.anthropic",
        "not one of this agent's services",
        "openai",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [openai]\n"
        "agents: {a: {services: [openai], limits: {sessions: {'ci-*': {budget_usd: -1}}}}}\n",
        "agents.a.limits.sessions.ci-*.budget_usd",
        "greater than or equal to 0",
        "docs/spend.md#rate-limits-and-spend-caps",
    ),
    (
        "version: 1\nallow: [{host: x.example}]\nservices: [{name: x, hosts: [x.example], credential: [{header: a}],"
        " fake_key: {prefix: x_, length: 40}, env_var: X, secret: 'env:X', meter: {api: openai, provider: groqq}}]\n",
        "services[0].meter.provider",
        "genai-prices knows no provider 'groqq'",
        "groq",
    ),
    (
        "version: 1\nallow: [{host: x.example}]\nservices: [{name: x, hosts: [x.example], credential: [{header: a}],"
        " fake_key: {prefix: x_, length: 40}, env_var: X, secret: 'env:X', meter: {api: cohere}}]\n",
        "services[0].meter.api",
        "'openai', 'anthropic' or 'google'",
        "docs/configuration.md#services",
    ),
    ("version: 1\nsecrets: {backend: vault}\n", "secrets.vault", "no vault section", "secrets.vault.address"),
    # services: a tagged union of a preset name, a preset with overrides and a whole service
    ("version: 1\nservices: [1]\n", "services[0]", "expected a preset name or a mapping", "{preset: openai"),
    (
        "version: 1\nallowlists: [openai]\nservices: [{preset: 3}]\n",
        "services[0].preset",
        "valid string",
        "docs/configuration.md#services",
    ),
    (
        "version: 1\nallow: [{host: x.example}]\nservices: [{name: x, hosts: [x.example], credential: [{header: a}],"
        " fake_key: {prefix: x_, lenght: 40}, env_var: X, secret: 'env:X'}]\n",
        "services[0].fake_key",
        "unknown key 'lenght'",
        "did you mean 'length'?",
    ),
    # a typo under a dict-valued section (agents: {NAME: ...}, sessions: {GLOB: ...}) is a
    # ConfigError naming the key, like any other typo, not a crash
    ("version: 1\nagents: {bot: {servics: [x]}}\n", "agents.bot", "unknown key 'servics'", "did you mean 'services'?"),
    (
        "version: 1\nagents: {bot: {limits: {budget_usd: {sesion: 5}}}}\n",
        "agents.bot.limits.budget_usd",
        "unknown key 'sesion'",
        "did you mean 'session'?",
    ),
    (
        "version: 1\nagents: {bot: {limits: {requests_per_minut: 5}}}\n",
        "agents.bot.limits",
        "unknown key 'requests_per_minut'",
        "did you mean 'requests_per_minute'?",
    ),
    (
        "version: 1\nagents: {bot: {limits: {sessions: {'ci-*': {budget: 1}}}}}\n",
        "agents.bot.limits.sessions.ci-*",
        "unknown key 'budget'",
        "budget_usd, models",
    ),
    ("version: 1\nagents: {bot: [openai]}\n", "agents.bot", "expected a mapping", "docs/configuration.md#agents"),
    (
        "version: 1\nspend: {unknown_model: fallback, fallback_price: {input_per_mtk: 1}}\n",
        "spend.fallback_price",
        "unknown key 'input_per_mtk'",
        "did you mean 'input_per_mtok'?",
    ),
    (
        "version: 1\nsecrets: {backend: vault, vault: {address: 'https://v:8200', auth: {metod: token}}}\n",
        "secrets.vault.auth",
        "unknown key 'metod'",
        "did you mean 'method'?",
    ),
    (
        "version: 1\nallow: [{host: x.example}]\nservices: [{name: x, hosts: [x.example], credential: [{header: a}],"
        " fake_key: {prefix: x_, length: 40}, env_var: X, secret: 'env:X', meter: {apii: openai}}]\n",
        "services[0].meter",
        "unknown key 'apii'",
        "did you mean 'api'?",
    ),
    # wildcards directly under (or above) a public suffix match hosts of unrelated owners
    ("version: 1\nallow: [{host: '*.co.uk'}]\n", "allow[0].host", "public suffix co.uk", "*.example.co.uk"),
    ("version: 1\nallow: [{host: '*.github.io'}]\n", "allow[0].host", "public suffix github.io", "*.example.github.io"),
    (
        "version: 1\nallow: [{host: '*.amazonaws.com'}]\n",
        "allow[0].host",
        "spans public suffixes such as s3.amazonaws.com",
        "*.example.s3.amazonaws.com",
    ),
    (
        "version: 1\nallow: [{host: '*.s3.amazonaws.com'}]\n",
        "allow[0].host",
        "public suffix s3.amazonaws.com",
        "exact hosts",
    ),
    (
        "version: 1\nnetwork: {connect_timeout: 0}\n",
        "network.connect_timeout",
        "greater than 0",
        "docs/configuration.md#network",
    ),
    ("version: 1\nnetwork: {tls_timout: 5}\n", "network", "unknown key 'tls_timout'", "'tls_timeout'"),
    (
        "version: 1\nallowlists: [openai]\nservices: [{preset: openai, websocket: maybe}]\n",
        "services[0].websocket",
        "valid boolean",
        "docs/configuration.md#services",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [{preset: openai, env_vars: [OPENAI_API_KEY]}]\n",
        "services[0].env_vars[0]",
        "listed twice",
        "each variable once",
    ),
    (
        "version: 1\nallowlists: [openai]\nservices: [{preset: openai, env_vars: ['9X']}]\n",
        "services[0].env_vars[0]",
        "not a variable name",
        "CODEX_API_KEY",
    ),
    (
        "version: 1\nallowlists: [openai, anthropic]\n"
        "services: [openai, {preset: anthropic, env_vars: [CODEX_API_KEY]}]\n",
        "services[1]",
        "CODEX_API_KEY already carries the fake key of service 'openai'",
        "its own env_var",
    ),
    ("version: 1\nstore: 'postgresql://eg:hunter2@db/eg'\n", "store", "holds a password", "PGPASSWORD"),
    ("version: 1\nstore: 'postgresql://eg@db/eg?password=hunter2'\n", "store", "holds a password", "password_file"),
    (
        "version: 1\nstore: 'postgresql://eg@db/eg?sslmode=require&SSLPASSWORD=x'\n",
        "store",
        "query parameter",
        "PGPASSWORD",
    ),
    ("version: 1\nstore: 'mysql://eg@db/eg'\n", "store", "not a store egress-guard knows", "postgresql://"),
    ("version: 1\nstore: 'postgresql://eg@db'\n", "store", "names no host or no database", "USER@HOST:PORT/DB"),
    ("version: 1\nstore: 'postgresql://eg:hunter2@db:99999/eg'\n", "store", "not a URL", "USER@HOST:PORT/DB"),
    (
        "version: 1\nstore: {url: 'postgresql://eg@db/eg', replica: 'a b'}\n",
        "store.replica",
        "not a replica",
        "letters",
    ),
    (
        "version: 1\nstore: {url: 'postgresql://eg@db/eg', password_file: nope}\n",
        "store.password_file",
        "does not exist",
        "password",
    ),
    ("version: 1\nstore: {url: 'postgresql://eg@db/eg', timeout: 0}\n", "store.timeout", "greater than 0", ""),
    ("version: 1\nmetrics: {listen: 'metrics.local:9464'}\n", "metrics.listen", "not an IP address", "127.0.0.1:9464"),
    ("version: 1\nmetrics: {listen: '127.0.0.1'}\n", "metrics.listen", "is not HOST:PORT", "127.0.0.1:8080"),
    (
        "version: 1\nsecrets: {backend: vault, vault: {address: vault.local}}\n",
        "secrets.vault.address",
        "is not a URL",
        "https://",
    ),
    (
        "version: 1\nallow: [{host: x.example}]\nservices: [{name: x, hosts: [x.example], credential: [{header: a}],"
        " fake_key: {prefix: x_, length: 20}, env_var: X, secret: 'env:X'}]\n",
        "services[0].fake_key.length",
        "too few for the key's tag",
        "at least",
    ),
    (
        "version: 1\nallow: [{host: x.example}]\nservices: [{name: x, hosts: [x.example], credential: [{header: a, query: b}],"
        " fake_key: {prefix: x_, length: 40}, env_var: X, secret: 'env:X'}]\n",
        "services[0].credential[0]",
        "exactly one of",
        "{query: key}",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem", "fix"), BROKEN)
def test_broken_configs(tmp_path: Path, text: str, key: str, problem: str, fix: str) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert re.match(rf"{re.escape(str(path))}:\d+: ", message), message  # file:LINE: first
    assert f": {key}" in message, message
    assert problem in message, message
    assert "Fix: " in message and fix in message.split("Fix: ", 1)[1], message


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    titles = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


@pytest.mark.parametrize("key", [*ConfigWire.model_fields, *PresetWire.model_fields, "agents.bot.limits", ""])
def test_errors_point_at_a_docs_section_that_exists(key: str) -> None:
    page, _, anchor = reference(key).partition("#")
    doc = Path(__file__).parents[2] / page
    assert doc.is_file(), page
    assert not anchor or anchor in _anchors(doc.read_text()), f"{page} has no section #{anchor}"


def test_broken_preset_file_names_the_preset_file(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("version: 1\nname: mine\nallow: [{host: '*'}]\n")
    (tmp_path / "egress-guard.yaml").write_text("version: 1\nallowlists: [./mine.yaml]\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml:3: allow\[0\]\.host: a bare"):
        load_config(tmp_path / "egress-guard.yaml")


def test_store_and_metrics_load(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    (tmp_path / "pw").write_text("hunter2\n")
    path.write_text(
        "version: 1\nstore: {url: 'postgresql://eg@db.internal:5432/eg', password_file: pw, replica: eu-1, timeout: 0.5}\n"
        "metrics: {listen: '127.0.0.1:9464'}\n"
    )
    config = load_config(path)
    assert config.store is not None and config.store.replica == "eu-1" and config.store.timeout == 0.5
    assert config.store_name == "postgresql://eg@db.internal:5432/eg"
    assert "hunter2" in config.store.conninfo() and "hunter2" not in repr(config.store)
    assert config.metrics_listen == ("127.0.0.1", 9464)
    path.write_text("version: 1\nstore: 'postgresql://eg@db/eg'\n")
    one, two = load_config(path).store, load_config(path).store
    assert one is not None and two is not None and one.replica != two.replica  # never two replicas on one chain
    assert load_config(path).metrics_listen is None
    path.write_text("version: 1\nstore: 'postgresql://eg@db/eg?sslmode=require&connect_timeout=3'\n")
    with_options = load_config(path).store
    assert with_options is not None and with_options.name == "postgresql://eg@db/eg"  # options stay out of messages
    assert "sslmode=require" in with_options.conninfo()
    path.write_text("version: 1\n")
    assert load_config(path).store is None and load_config(path).store_name == str(tmp_path / "egress-guard.db")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"file not found\. Fix: run 'egress-guard init'"):
        load_config("/nonexistent/egress-guard.yaml")


def test_default_config_loads_and_resolves_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(DEFAULT_CONFIG)
    config = load_config(path)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    assert config.ca_dir == tmp_path / "certs"
    assert config.audit_path == tmp_path / "egress-guard.db"
    assert {r.host for r in config.rules} == {
        "api.openai.com",
        "api.anthropic.com",
        "generativelanguage.googleapis.com",
    }
    assert config.audit_query_strings is False


def test_full_shape(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    path = tmp_path / "egress-guard.yaml"
    path.write_text(
        "version: 1\nlisten: '[::1]:9000'\naudit: {path: db/audit.db}\nallowlists: [pypi]\n"
        "allow:\n  - host: API.GitHub.com.\n    methods: [get]\n    paths: ['/repos/*']\n"
        "network:\n  allow_private: [10.0.0.0/8]\n  hosts: {LLM.internal: ['10.0.0.5']}\n  upstream_ca: ca.pem\n"
    )
    config = load_config(path)
    assert (config.listen_host, config.listen_port, config.listen) == ("::1", 9000, "[::1]:9000")
    assert config.audit_path == tmp_path / "db" / "audit.db"
    inline = next(r for r in config.rules if r.id.startswith("inline"))
    assert (inline.host, inline.methods, inline.paths, inline.ports) == (
        "api.github.com",
        frozenset({"GET"}),
        ("/repos/*",),
        frozenset({443}),  # plain HTTP only where a rule lists port 80
    )
    assert [r.id for r in config.rules] == ["pypi#0", "pypi#1", "inline#0"]
    assert config.allow_private == (ipaddress.ip_network("10.0.0.0/8"),)
    assert config.pinned_hosts == {"llm.internal": (ipaddress.ip_address("10.0.0.5"),)}
    assert config.upstream_ca == tmp_path / "ca.pem"


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(tmp_path: Path, name: str) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(f"version: 1\nallowlists: [{name}]\n")
    rules = load_config(path).rules
    assert rules and all(r.id.startswith(f"{name}#") for r in rules)


def test_presets_cover_the_documented_services() -> None:
    assert {"openai", "anthropic", "google-gemini", "github", "pypi", "npm"} <= set(preset_names())


def test_services_entries_are_typed_by_their_shape() -> None:
    service = {
        "name": "x",
        "hosts": ["x.example"],
        "credential": [{"header": "a"}],
        "fake_key": {"prefix": "x_", "length": 40},
        "env_var": "X",
        "secret": "env:X",
    }
    wire = ConfigWire.model_validate(
        {"version": 1, "services": ["openai", {"preset": "anthropic", "secret": "env:A"}, service]}
    )
    assert [type(entry) for entry in wire.services] == [str, ServiceRefWire, ServiceWire]
    assert wire.services[1] == ServiceRefWire(preset="anthropic", secret="env:A")


def test_session_overrides_load_in_order(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(
        "version: 1\nallowlists: [openai]\nservices: [openai]\nagents:\n  a:\n    services: [openai]\n"
        "    limits:\n      budget_usd: {session: 1}\n      sessions:\n"
        "        ci-nightly: {budget_usd: '7.50', models: {openai: [gpt-4o]}}\n        'ci-*': {budget_usd: 2}\n"
    )
    limits = load_config(path).agents["a"].limits
    assert [(s.glob, s.budget_usd) for s in limits.sessions] == [("ci-nightly", Decimal("7.50")), ("ci-*", 2)]
    assert limits.session("ci-nightly").models == {"openai": ("gpt-4o",)}
    assert limits.session("ci-7").budget_usd == 2 and limits.session("dev-1") is None


def test_docs_limits_example_loads(tmp_path: Path) -> None:
    spend_doc = (Path(__file__).parents[2] / "docs" / "spend.md").read_text()
    section = spend_doc.split("## Rate limits and spend caps", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "egress-guard.yaml"
    path.write_text("version: 1\nallowlists: [openai, anthropic]\nservices: [openai, anthropic]\n" + example)
    limits = load_config(path).agents["researcher"].limits
    assert limits.budget_day == 20 and limits.session("ci-3").budget_usd == 1


def test_services_say_how_they_are_metered(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(
        "version: 1\nallowlists: [openai, anthropic, google-gemini, github]\n"
        "services: [openai, anthropic, google-gemini, github]\n"
    )
    meters = {s.name: s.meter for s in load_config(path).services}
    assert meters == {
        "openai": Meter("openai", "openai"),
        "anthropic": Meter("anthropic", "anthropic"),
        "google-gemini": Meter("google", "google"),
        "github": None,
    }
    # an unknown provider is no mistake when unknown models are priced at the fallback price
    path.write_text(
        "version: 1\nallow: [{host: x.example}]\nservices: [{name: x, hosts: [x.example], credential: [{header: a}],"
        " fake_key: {prefix: x_, length: 40}, env_var: X, secret: 'env:X', meter: {api: openai, provider: mine}}]\n"
        "spend: {unknown_model: fallback, fallback_price: {input_per_mtok: 1, output_per_mtok: 2}}\n"
    )
    assert load_config(path).services[0].meter == Meter("openai", "mine")


def test_docs_narrow_allowlist_example_refuses_unbudgeted_endpoints(tmp_path: Path) -> None:
    from egress_guard.hosts import normalize_host
    from egress_guard.policy import Destination, decide

    spend_doc = (Path(__file__).parents[2] / "docs" / "spend.md").read_text()
    example = spend_doc.split("Other endpoints of these services", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "egress-guard.yaml"
    path.write_text("version: 1\n" + example)
    config = load_config(path)
    host = normalize_host("api.openai.com")
    assert decide(config.rules, Destination(host, 443, "POST", "/v1/chat/completions")).allowed
    assert not decide(config.rules, Destination(host, 443, "POST", "/v1/images/generations")).allowed
    assert config.services[0].meter == Meter("openai", "openai")


# --- every error names its line ------------------------------------------------------------------

LINES = [
    # (yaml, line, column, what the message says after "FILE:LINE: ")
    # a nested key: reported on its mapping, located on itself
    (
        "version: 1\nallowlists: [openai]\nagents:\n  bot:\n    services: [openai]\n    limits:\n"
        "      budget_usd:\n        sesion: 5\n",
        8,
        9,
        "agents.bot.limits.budget_usd: unknown key 'sesion'",
    ),
    # a nested value of the wrong type
    (
        "version: 1\nagents:\n  bot:\n    limits:\n      budget_usd: {session: 1,\n        day: x}\n",
        6,
        9,
        "agents.bot.limits.budget_usd.day: input should be a valid decimal",
    ),
    # list items: a key of the second item, the second string of a list, the second item of a nested list
    ("version: 1\nallow:\n  - host: a.example\n  - ports: [443]\n    host: '*.co.uk'\n", 5, 5, "allow[1].host: "),
    ("version: 1\n\nallowlists:\n  - openai\n  - opnai\n", 5, 5, "allowlists[1]: no preset named 'opnai'"),
    (
        "version: 1\nallowlists: [openai]\nservices: [openai]\nagents:\n  bot:\n    services:\n"
        "      - openai\n      - anthropic\n",
        8,
        9,
        "agents.bot.services[1]: no service named 'anthropic'",
    ),
    # an item of the services: union, a whole service (its tag is no key in the file)
    (
        "version: 1\nallow: [{host: x.example}]\nservices:\n  - openai\n  - name: x\n    hosts: [x.example]\n"
        "    fake_key:\n      prefix: x_\n      lenght: 40\n",
        9,
        7,
        "services[1].fake_key: unknown key 'lenght'",
    ),
    ("version: 1\nservices:\n  - openai\n  - [openai]\n", 4, 5, "services[1]: expected a preset name or a mapping"),
    # a required key that is not there: the line of the mapping that lacks it
    (
        "version: 1\nallow:\n  - host: x.example\nservices:\n  - name: x\n    hosts: [x.example]\n",
        5,
        5,
        "services[0].credential: required key is missing",
    ),
    ("# a comment\nlisten: 127.0.0.1:8080\n", 1, None, "version: missing"),
    # a mapping key with a dot in it
    ("version: 1\nnetwork:\n  hosts:\n    llm.internal: [not-an-ip]\n", 4, 5, "network.hosts.llm.internal: "),
    # YAML merge keys: the merged keys are located where the anchor is
    (
        "version: 1\nallowlists: [openai]\nservices: [openai]\nagents:\n  a: &base\n    services: [openai]\n"
        "  b:\n    <<: *base\n    limits: {budget_usd: {sesion: 1}}\n",
        9,
        27,
        "agents.b.limits.budget_usd: unknown key 'sesion'",
    ),
    # YAML syntax: the parser's line, and where the construct it was reading began
    ("version: 1\nallow:\n  - host: a.example\nallow: []\n", 4, 1, "key 'allow' appears twice"),
    (
        "version: 1\nallow:\n  - host: a.example\n    ports: [443\n  - host: b.example\n",
        5,
        9,
        "not valid YAML (expected ',' or ']', but got ':', while parsing a flow sequence on line 4)",
    ),
    (
        "version: 1\nnetwork:\n  idle_timeout: 1800\n   header_timeout: 5\n",
        4,
        18,
        "not valid YAML (mapping values are not allowed here)",
    ),
    (
        "version: 1\nlisten: '127.0.0.1:8080\n",
        3,
        1,
        "not valid YAML (found unexpected end of stream, while scanning a quoted scalar on line 2)",
    ),
    ("version: 1\nx: *nope\n", 2, 4, "not valid YAML (found undefined alias 'nope')"),
]


@pytest.mark.parametrize(("text", "line", "column", "says"), LINES)
def test_errors_name_the_line(tmp_path: Path, text: str, line: int, column: int | None, says: str) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:{line}: {says}"), str(info.value)
    assert (info.value.line, info.value.column) == (line, column), str(info.value)


def test_an_error_about_text_from_no_file_names_no_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen("localhost")
    assert str(info.value) == "--listen: 'localhost' is not HOST:PORT. Fix: use e.g. 127.0.0.1:8080"
    assert (info.value.line, info.value.column) == (None, None)


def test_a_preset_files_error_names_its_own_line(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text(
        "version: 1\nname: mine\nallow:\n  - host: ok.example\n  - host: '*.github.io'\n"
    )
    (tmp_path / "egress-guard.yaml").write_text("version: 1\nallowlists: [./mine.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "egress-guard.yaml")
    assert str(info.value).startswith(f"{tmp_path / 'mine.yaml'}:5: allow[1].host: '*.github.io'"), str(info.value)


FULL = """\
version: 1
listen: 127.0.0.1:8080
audit:
  path: ./db.sqlite
  query_strings: false
allowlists: [openai]
allow:
  - host: x.example
    ports: [443]
    methods: [GET]
    paths: ["/v1/*"]
network:
  allow_private: [10.0.0.0/8]
  hosts: {llm.internal: [10.0.0.5]}
  connect_timeout: 5
secrets:
  backend: vault
  vault:
    address: https://vault.internal:8200
    auth: {method: token, token_env: VT}
services:
  - {preset: openai, secret: "vault:secret/x#k"}
  - name: x
    hosts: [x.example]
    credential: [{header: authorization, scheme: Bearer}]
    fake_key: {prefix: x_, length: 40}
    env_var: X_KEY
    secret: env:X_KEY
    meter: {api: openai, provider: openai}
agents:
  bot:
    services: [openai, x]
    limits:
      requests_per_minute: 5
      budget_usd: {session: 1}
      models: {openai: [gpt-4o]}
      sessions:
        "ci-*": {budget_usd: 2, models: {openai: [gpt-4o]}}
spend:
  unknown_model: fallback
  fallback_price: {input_per_mtok: 1, output_per_mtok: 2}
"""
# mappings whose keys are names the operator chooses, not fields
FREE_KEYS = {
    "network.hosts",
    "agents",
    "agents.bot.limits.models",
    "agents.bot.limits.sessions",
    "agents.bot.limits.sessions.ci-*.models",
}


def _mappings(node: object, path: str = "") -> list[str]:
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    out = []
    if isinstance(node, CommentedMap):
        out.append(path)
        for k, v in node.items():
            out += _mappings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, CommentedSeq):
        for i, v in enumerate(node):
            out += _mappings(v, f"{path}[{i}]")
    return out


def test_an_unknown_key_in_every_mapping_is_a_config_error_on_its_line(tmp_path: Path) -> None:
    """Walks every mapping of a config that uses every section (dict-valued ones included)
    and adds a misspelt key there: always a ConfigError naming that mapping and the line."""
    import io

    from ruamel.yaml import YAML

    path = tmp_path / "egress-guard.yaml"
    path.write_text(FULL)
    load_config(path)  # the unmodified file is valid
    rt = YAML(typ="rt")
    paths = _mappings(rt.load(FULL))
    assert len(paths) >= 20 and "agents.bot.limits.sessions.ci-*" in paths
    for where in paths:
        doc = rt.load(FULL)
        node = doc
        for part in re_parts(where):
            node = node[part]
        node["bogus_key"] = [1]
        out = io.StringIO()
        rt.dump(doc, out)
        text = out.getvalue()
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        line = next(i for i, t in enumerate(text.splitlines(), 1) if "bogus_key" in t)
        message = str(info.value)
        assert info.value.line == line, (where, message)
        if where in FREE_KEYS:
            assert info.value.key.startswith(f"{where}.bogus_key"), (where, message)
        else:
            assert info.value.key == (where or "bogus_key"), (where, message)
            assert "unknown key 'bogus_key'" in message, (where, message)


def re_parts(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index in re.findall(r"([^.\[\]]+(?:\*[^.\[\]]*)?)|\[(\d+)\]", path):
        parts.append(int(index) if index else name)
    return parts


# --- rules, wildcards, ports ----------------------------------------------------------------------


def test_rules_allow_port_443_unless_they_list_others(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text("version: 1\nallow: [{host: a.example}, {host: b.example, ports: [80, 443]}]\n")
    a, b = load_config(path).rules
    assert a.ports == frozenset({443}) and b.ports == frozenset({80, 443})


@pytest.mark.parametrize(
    "host", ["*.example.co.uk", "*.mybucket.s3.amazonaws.com", "*.corp.internal", "*.example.com", "*.openai.com"]
)
def test_wildcards_under_a_registered_name_load(tmp_path: Path, host: str) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(f"version: 1\nallow: [{{host: '{host}'}}]\n")
    assert load_config(path).rules[0].wildcard


def test_network_timeouts_websocket_and_env_vars(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text(
        "version: 1\nallowlists: [openai, anthropic, google-gemini, github]\n"
        "services: [{preset: openai, websocket: false}, anthropic, google-gemini, {preset: github, env_vars: []}]\n"
    )
    config = load_config(path)
    assert (config.connect_timeout, config.tls_timeout, config.response_timeout, config.header_timeout) == (
        10,
        10,
        600,
        30,
    )
    openai, anthropic, gemini, github = config.services
    assert openai.websocket is False and anthropic.websocket is True
    assert config.env_vars(openai) == ("OPENAI_API_KEY", "CODEX_API_KEY")
    assert config.env_vars(anthropic) == ("ANTHROPIC_API_KEY",)
    assert config.env_vars(gemini) == ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    assert config.env_vars(github) == ("GH_TOKEN",)  # the override dropped GITHUB_TOKEN
    path.write_text(
        "version: 1\nnetwork: {connect_timeout: 2.5, tls_timeout: 3, response_timeout: 600, header_timeout: 15}\n"
    )
    config = load_config(path)
    assert (config.connect_timeout, config.tls_timeout, config.response_timeout, config.header_timeout) == (
        2.5,
        3,
        600,
        15,
    )


def test_audit_synchronous(tmp_path: Path) -> None:
    path = tmp_path / "egress-guard.yaml"
    path.write_text("version: 1\naudit: {synchronous: full}\n")
    assert load_config(path).audit_synchronous == "full"
    path.write_text("version: 1\n")
    assert load_config(path).audit_synchronous == "normal"
    path.write_text("version: 1\naudit: {synchronous: extra}\n")
    with pytest.raises(ConfigError, match=r"audit\.synchronous"):
        load_config(path)
