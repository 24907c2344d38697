"""Building the domain objects: a config file read, validated against the wire models and
turned into one frozen `Config` the proxy runs on.

`load_config(path)` is the only way in. Every problem — a YAML syntax error, an unknown
key, a wildcard in the wrong place, a preset that does not exist — raises one `ConfigError`
whose text names the file, the line, the key path and the fix. It never returns a partly
valid config.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from egress_guard.config.errors import ConfigError, validate
from egress_guard.config.fleet import StoreSettings, parse_store
from egress_guard.config.policy import to_policy
from egress_guard.config.rules import load_preset, to_rules
from egress_guard.config.services import NAME, check_priced, to_services
from egress_guard.config.source import read_yaml
from egress_guard.config.wire import ConfigWire, MetricsWire, NetworkWire, SecretsWire, SpendWire
from egress_guard.credentials import Agent, Service
from egress_guard.hosts import HostError, IPAddress, normalize_host, split_host_port
from egress_guard.policy import Rule
from egress_guard.secrets import VaultSettings
from egress_guard.spend import Limits, SessionLimits, SpendSettings
from egress_guard.ssrf import Network
from egress_guard.verdicts import Policy

DEFAULT_CONFIG_NAME = "egress-guard.yaml"


@dataclass(frozen=True)
class Config:
    path: Path
    listen_host: str
    listen_port: int
    ca_dir: Path
    audit_path: Path
    audit_query_strings: bool
    rules: tuple[Rule, ...]
    audit_synchronous: str = "normal"
    allow_private: tuple[Network, ...] = ()
    pinned_hosts: dict[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    upstream_ca: Path | None = None
    idle_timeout: int = 1800
    connect_timeout: float = 10.0
    tls_timeout: float = 10.0
    response_timeout: float = 600.0
    header_timeout: float = 30.0
    presets: tuple[str, ...] = ()
    services: tuple[Service, ...] = ()
    service_env_vars: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> every agent variable
    agents: dict[str, Agent] = field(default_factory=dict)
    secrets_backend: Literal["env", "vault"] = "env"
    vault: VaultSettings | None = None
    secrets_cache_ttl: float = 300.0
    spend: SpendSettings = field(default_factory=SpendSettings)
    store: StoreSettings | None = None  # PostgreSQL, shared by replicas; None: SQLite at audit_path
    metrics_listen: tuple[str, int] | None = None  # where /metrics is served; None: off
    policy: Policy = field(default_factory=Policy)  # rules, mode, escalation, freeze (allowlist included)
    digest: str = ""  # sha256 (hex) of the config file's bytes and each preset file's, in order
    files: tuple[Path, ...] = ()  # the config and the preset files it read: what a reload watches

    @property
    def store_name(self) -> str:
        """The store, as messages name it: a PostgreSQL URL (no password) or the SQLite file."""
        return self.store.name if self.store is not None else str(self.audit_path)

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def service_for(self, host: str) -> Service | None:
        """The service bound to `host` (a normalised name), if any: the rules' `service`."""
        return next((s for s in self.services if host in s.hosts), None)

    def env_vars(self, service: Service) -> tuple[str, ...]:
        """Every variable an agent gets this service's fake key in: env_var first, then the
        names other tools read (CODEX_API_KEY, GOOGLE_API_KEY, GITHUB_TOKEN, ...)."""
        return self.service_env_vars.get(service.name, (service.env_var,))

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


def _network(
    file: Path, base: Path, wire: NetworkWire
) -> tuple[tuple[Network, ...], dict[str, tuple[IPAddress, ...]], Path | None]:
    if wire.idle_timeout <= wire.response_timeout:
        raise ConfigError(
            file,
            "network.idle_timeout",
            f"{wire.idle_timeout} s is not above network.response_timeout ({wire.response_timeout:g} s): "
            "a silent upstream would be closed as idle before its 504",
            f"raise idle_timeout above {wire.response_timeout:g}, or lower response_timeout",
        )
    nets: list[Network] = []
    for i, cidr in enumerate(wire.allow_private):
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise ConfigError(
                file,
                f"network.allow_private[{i}]",
                f"{cidr!r} is not a CIDR",
                "write networks such as 10.0.0.0/8 or fd00::/8",
            ) from None
    pinned: dict[str, tuple[IPAddress, ...]] = {}
    for name, addrs in wire.hosts.items():
        try:
            host = normalize_host(name)
        except HostError as exc:
            raise ConfigError(file, f"network.hosts.{name}", str(exc), "use a DNS name as the key") from None
        if not addrs:
            raise ConfigError(file, f"network.hosts.{name}", "no addresses", "list one or more IP addresses")
        ips: list[IPAddress] = []
        for addr in addrs:
            try:
                ips.append(ipaddress.ip_address(addr))
            except ValueError:
                raise ConfigError(
                    file,
                    f"network.hosts.{name}",
                    f"{addr!r} is not an IP address",
                    "pin names to literal addresses, e.g. ['10.0.0.5']",
                ) from None
        pinned[host.name] = tuple(ips)
    ca = None
    if wire.upstream_ca:
        ca = (base / wire.upstream_ca).resolve()
        if not ca.is_file():
            raise ConfigError(
                file,
                "network.upstream_ca",
                f"{ca} does not exist",
                "point it at a PEM file of the CA that signs your internal upstreams, or remove it",
            )
    return tuple(nets), pinned, ca


def parse_listen(text: str, file: Path | str = "--listen", key: str = "") -> tuple[str, int]:
    try:
        host, port = split_host_port(text)
        if port is None or not host:
            raise HostError("no port")
        return host.strip("[]"), port
    except HostError:
        raise ConfigError(file, key, f"{text!r} is not HOST:PORT", "use e.g. 127.0.0.1:8080") from None


def parse_metrics(file: Path, wire: MetricsWire | None) -> tuple[str, int] | None:
    """Where /metrics is served (`metrics: {listen: …}`), or None: off."""
    if wire is None:
        return None
    host, port = parse_listen(wire.listen, file, "metrics.listen")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            file, "metrics.listen", f"{host!r} is not an IP address", "use an address, e.g. 127.0.0.1:9464"
        ) from None
    return host, port


def load_config(path: Path | str) -> Config:
    file = Path(path)
    try:
        raw = file.read_bytes()
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not UTF-8 text", "save the file as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found", "run 'egress-guard init' or pass --config") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read it ({exc.strerror})", "check the file's permissions") from None
    data, positions = read_yaml(file, text)
    try:
        return _load(file, data, raw)
    except ConfigError as err:
        raise positions.locate(err) from None


def _load(file: Path, data: dict[str, Any], raw: bytes) -> Config:
    wire = validate(ConfigWire, data, file)
    base = file.resolve().parent
    listen_host, listen_port = parse_listen(wire.listen, file, "listen")
    rules: list[Rule] = []
    digest = hashlib.sha256(raw)
    files = [file.resolve()]
    for i, entry in enumerate(wire.allowlists):
        preset_rules, _, preset_file = load_preset(entry, base, file, f"allowlists[{i}]")
        rules.extend(preset_rules)
        digest.update(_preset_bytes(entry, preset_file))
        if isinstance(preset_file, Path):
            files.append(preset_file)
    rules.extend(to_rules(file, "allow", "inline", wire.allow))
    allow_private, pinned, upstream_ca = _network(file, base, wire.network)
    vault = _vault(file, base, wire.secrets)
    services, env_vars = to_services(file, base, wire, tuple(rules))
    agents = _agents(file, wire, services)
    spend = _spend(file, wire.spend)
    check_priced(file, services, spend.unknown_model)
    net = wire.network
    return Config(
        path=file.resolve(),
        listen_host=listen_host,
        listen_port=listen_port,
        ca_dir=(base / wire.ca_dir).resolve(),
        audit_path=(base / wire.audit.path).resolve(),
        audit_query_strings=wire.audit.query_strings,
        audit_synchronous=wire.audit.synchronous,
        rules=tuple(rules),
        allow_private=allow_private,
        pinned_hosts=pinned,
        upstream_ca=upstream_ca,
        idle_timeout=net.idle_timeout,
        connect_timeout=net.connect_timeout,
        tls_timeout=net.tls_timeout,
        response_timeout=net.response_timeout,
        header_timeout=net.header_timeout,
        presets=tuple(wire.allowlists),
        services=services,
        service_env_vars=env_vars,
        agents=agents,
        secrets_backend=wire.secrets.backend,
        vault=vault,
        secrets_cache_ttl=wire.secrets.cache_ttl,
        spend=spend,
        store=parse_store(file, base, wire.store),
        metrics_listen=parse_metrics(file, wire.metrics),
        policy=to_policy(file, base, wire, tuple(rules)),
        digest=digest.hexdigest(),
        files=tuple(files),
    )


def _preset_bytes(entry: str, file: Path | str) -> bytes:
    """A preset's bytes for the digest: an operator's file as read (just now; a change in
    between is a reload's business), a shipped one from the package."""
    if isinstance(file, Path):
        try:
            return file.read_bytes()
        except OSError:
            return b""
    return resources.files("egress_guard.allowlists").joinpath(f"{entry}.yaml").read_bytes()


def _vault(file: Path, base: Path, wire: SecretsWire) -> VaultSettings | None:
    if wire.backend == "env":
        return None
    v = wire.vault
    if v is None:
        raise ConfigError(
            file,
            "secrets.vault",
            "backend is vault but there is no vault section",
            "add secrets.vault.address (e.g. https://vault.internal:8200)",
        )
    if not v.address.startswith(("http://", "https://")):
        raise ConfigError(
            file, "secrets.vault.address", f"{v.address!r} is not a URL", "write e.g. https://vault.internal:8200"
        )
    ca = (base / v.ca_file).resolve() if v.ca_file else None
    if ca is not None and not ca.is_file():
        raise ConfigError(file, "secrets.vault.ca_file", f"{ca} does not exist", "point it at the PEM CA of your Vault")
    return VaultSettings(
        address=v.address,
        auth=v.auth.method,
        token_env=v.auth.token_env,
        token_file=(base / v.auth.token_file).resolve() if v.auth.token_file else None,
        role_id_env=v.auth.role_id_env,
        secret_id_env=v.auth.secret_id_env,
        approle_mount=v.auth.mount,
        namespace=v.namespace,
        ca_file=ca,
        kv_version=v.kv_version,
        timeout=v.timeout,
    )


def _agents(file: Path, wire: ConfigWire, services: tuple[Service, ...]) -> dict[str, Agent]:
    names = {s.name for s in services}
    agents = {}
    for name, agent in wire.agents.items():
        if not NAME.match(name):
            raise ConfigError(
                file, f"agents.{name}", f"{name!r} is not a valid agent name", "use letters, digits, '-', '_', '.'"
            )
        for j, svc in enumerate(agent.services):
            if svc not in names:
                raise ConfigError(
                    file,
                    f"agents.{name}.services[{j}]",
                    f"no service named {svc!r}",
                    f"use one of {', '.join(sorted(names)) or '(none configured: add services:)'}",
                )
        lw = agent.limits
        _check_model_services(file, f"agents.{name}.limits.models", lw.models, agent.services)
        sessions = []
        for glob, sw in lw.sessions.items():
            where = f"agents.{name}.limits.sessions.{glob}"
            if not _SESSION_GLOB.match(glob):
                raise ConfigError(
                    file,
                    where,
                    f"{glob!r} is not a session id or glob",
                    "use letters, digits, '_', '.', ':', '-' and the glob characters * ? [ ]",
                )
            if sw.budget_usd is None and not sw.models:
                raise ConfigError(
                    file, where, "this override changes nothing", "set budget_usd: N and/or models: {service: [globs]}"
                )
            _check_model_services(file, f"{where}.models", sw.models, agent.services)
            sessions.append(SessionLimits(glob, sw.budget_usd, {k: tuple(v) for k, v in sw.models.items()}))
        limits = Limits(
            lw.requests_per_minute,
            lw.tokens_per_minute,
            lw.concurrent,
            lw.budget_usd.session,
            lw.budget_usd.day,
            lw.budget_usd.total,
            {k: tuple(v) for k, v in lw.models.items()},
            tuple(sessions),
        )
        agents[name] = Agent(name, tuple(agent.services), limits)
    return agents


_SESSION_GLOB = re.compile(r"^[A-Za-z0-9_.:*?\[\]!-]{1,100}$")


def _check_model_services(file: Path, where: str, models: dict[str, list[str]], services: list[str]) -> None:
    for svc in models:
        if svc not in services:
            raise ConfigError(
                file,
                f"{where}.{svc}",
                f"{svc!r} is not one of this agent's services",
                f"use one of {', '.join(services) or '(none)'}",
            )


def _spend(file: Path, wire: SpendWire) -> SpendSettings:
    try:
        ZoneInfo(wire.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            file,
            "spend.timezone",
            f"unknown time zone {wire.timezone!r}",
            "use an IANA name such as UTC or Europe/Berlin",
        ) from None
    if wire.unknown_model == "fallback" and wire.fallback_price is None:
        raise ConfigError(
            file,
            "spend.fallback_price",
            "unknown_model is fallback but no fallback_price is set",
            "add fallback_price: {input_per_mtok: 10, output_per_mtok: 30}",
        )
    fp = wire.fallback_price
    return SpendSettings(
        wire.timezone,
        wire.unknown_model,
        fp.input_per_mtok if fp else Decimal(0),
        fp.output_per_mtok if fp else Decimal(0),
        wire.default_max_output_tokens,
        wire.on_overrun,
    )
