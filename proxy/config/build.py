"""Configuration: strict YAML wire models, converted into frozen domain objects.

`load_config(path)` is the only way in. Every problem — a YAML syntax error, an unknown
key, a wildcard in the wrong place, a preset that does not exist — raises one `ConfigError`
whose text names the file, the key path and the fix. It never returns a partly valid config.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import re
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from egress_guard.credentials import Agent, Service, Slot
from egress_guard.fakekeys import ALPHABETS, MIN_TAG_BITS, KeyShape
from egress_guard.hosts import (
    HostError,
    IPAddress,
    is_public_suffix,
    normalize_host,
    public_suffix_below,
    split_host_port,
)
from egress_guard.policy import Destination, Rule, decide
from egress_guard.secrets import SecretRef, VaultSettings
from egress_guard.spend import Limits, Meter, SessionLimits, SpendSettings
from egress_guard.ssrf import Network

DEFAULT_CONFIG_NAME = "egress-guard.yaml"
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class ConfigError(Exception):
    """A config problem, phrased for the person who has to fix it: the file, the line, the
    key path, the problem and the fix. `at` is the key path whose line to report when it is
    not `key` itself (an unknown key is reported on its parent, located on itself)."""

    def __init__(
        self, file: Path | str, key: str, problem: str, fix: str = "", *, line: int | None = None, at: str | None = None
    ) -> None:
        self.file, self.key, self.problem, self.fix = str(file), key, problem, fix
        self.line, self.at = line, at
        super().__init__(file, key, problem, fix)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        text = f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"
        return f"{text}. Fix: {self.fix}" if self.fix else text


class _Lines:
    """Where each key path of one YAML file is (1-based lines), read from ruamel.yaml's
    node positions. Key paths are spelt as in ConfigError (`agents.bot.limits`,
    `allow[0].host`). ruamel also refuses duplicate keys, which PyYAML silently merges."""

    def __init__(self, file: Path | str, text: str) -> None:
        from ruamel.yaml import YAML
        from ruamel.yaml.constructor import DuplicateKeyError
        from ruamel.yaml.error import MarkedYAMLError

        self.file = str(file)
        self.lines: dict[str, int] = {}
        try:
            root = YAML(typ="rt").load(text)
        except DuplicateKeyError as exc:
            name = re.search(r'duplicate key "(.*?)" with value', str(exc.problem))
            first = exc.context_mark.line + 1 if exc.context_mark is not None else None
            line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
            raise ConfigError(
                file,
                "",
                f"key {name.group(1) if name else '?'!r} appears twice in one mapping (this mapping starts on line "
                f"{first}); YAML would silently keep only the last",
                "keep one of them (merge their contents)",
                line=line,
            ) from None
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise ConfigError(
                file,
                "",
                f"not valid YAML ({exc.problem or exc.context})",
                "fix the YAML syntax",
                line=mark.line + 1 if mark is not None else None,
            ) from None
        except Exception as exc:  # ruamel's other errors (e.g. a bad tag) are still the file's fault
            raise ConfigError(file, "", f"not valid YAML ({type(exc).__name__})", "fix the YAML syntax") from None
        with contextlib.suppress(Exception):  # positions are a help: never a reason to refuse a file
            self._walk(root, "")

    def _walk(self, node: Any, path: str) -> None:
        from ruamel.yaml.comments import CommentedMap, CommentedSeq

        if isinstance(node, CommentedMap):
            for k, value in node.items():
                if k not in node.lc.data:  # merged in from an anchor (<<: *base): located there
                    continue
                child = f"{path}.{k}" if path else str(k)
                self.lines.setdefault(child, node.lc.key(k)[0] + 1)
                self._walk(value, child)
        elif isinstance(node, CommentedSeq):
            for i, value in enumerate(node):
                child = f"{path}[{i}]"
                self.lines.setdefault(child, node.lc.item(i)[0] + 1)
                self._walk(value, child)

    def line(self, key: str) -> int:
        """The line of `key`, else of its nearest enclosing key that is in the file, else 1."""
        while key:
            if key in self.lines:
                return self.lines[key]
            shorter = _PARENT.sub("", key)
            if shorter == key:
                break
            key = shorter
        return 1

    def locate(self, err: ConfigError) -> ConfigError:
        if err.line is None and err.file == self.file:
            err.line = self.line(err.at if err.at is not None else err.key)
        return err


_PARENT = re.compile(r"(\.[^.\[\]]*|\[\d+\])$")


# --- wire models: exactly what the YAML may say --------------------------------------------


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleWire(_Wire):
    host: str
    ports: list[int] | None = None
    methods: list[str] | None = None
    paths: list[str] | None = None
    note: str | None = None


class SlotWire(_Wire):
    header: str | None = None
    scheme: str | None = None
    query: str | None = None
    basic_username: str | None = None


class FakeKeyWire(_Wire):
    prefix: str
    length: int = Field(ge=1, le=512)
    alphabet: Literal["base62", "base64url", "hex"] = "base62"
    suffix: str = ""


class MeterWire(_Wire):
    api: Literal["openai", "anthropic", "google"]
    provider: str | None = None  # genai-prices provider id; default: the api's own


class ServiceWire(_Wire):
    name: str
    hosts: list[str]
    credential: list[SlotWire]
    fake_key: FakeKeyWire
    env_var: str
    env_vars: list[str] = Field(default_factory=list)  # more variables agents' tools read the key from
    secret: str
    anonymous: bool = False
    meter: MeterWire | None = None
    websocket: bool = True  # False: WebSocket upgrades to its hosts are refused


class ServiceRefWire(_Wire):
    preset: str
    secret: str | None = None
    anonymous: bool | None = None
    env_vars: list[str] | None = None
    websocket: bool | None = None


class PresetWire(_Wire):
    version: Literal[1]
    name: str
    description: str = ""
    allow: list[RuleWire] = Field(default_factory=list)
    service: ServiceWire | None = None


class VaultAuthWire(_Wire):
    method: Literal["token", "approle"] = "token"
    token_env: str = "VAULT_TOKEN"
    token_file: str | None = None
    role_id_env: str = "VAULT_ROLE_ID"
    secret_id_env: str = "VAULT_SECRET_ID"
    mount: str = "approle"


class VaultWire(_Wire):
    address: str
    auth: VaultAuthWire = Field(default_factory=VaultAuthWire)
    namespace: str | None = None
    ca_file: str | None = None
    kv_version: Literal[1, 2] = 2
    timeout: float = Field(default=3.0, gt=0, le=60)


class SecretsWire(_Wire):
    backend: Literal["env", "vault"] = "env"
    vault: VaultWire | None = None
    cache_ttl: float = Field(default=300.0, ge=1, le=86400)


class BudgetWire(_Wire):
    session: Decimal | None = Field(default=None, ge=0)
    day: Decimal | None = Field(default=None, ge=0)
    total: Decimal | None = Field(default=None, ge=0)


class SessionLimitsWire(_Wire):
    budget_usd: Decimal | None = Field(default=None, ge=0)
    models: dict[str, list[str]] = Field(default_factory=dict)


class LimitsWire(_Wire):
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    concurrent: int | None = Field(default=None, ge=1)
    budget_usd: BudgetWire = Field(default_factory=BudgetWire)
    models: dict[str, list[str]] = Field(default_factory=dict)
    sessions: dict[str, SessionLimitsWire] = Field(default_factory=dict)  # session id or glob -> overrides


class AgentWire(_Wire):
    services: list[str] = Field(default_factory=list)
    limits: LimitsWire = Field(default_factory=LimitsWire)


class FallbackPriceWire(_Wire):
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)


class SpendWire(_Wire):
    timezone: str = "UTC"
    unknown_model: Literal["deny", "fallback"] = "deny"
    fallback_price: FallbackPriceWire | None = None
    default_max_output_tokens: int = Field(default=4096, ge=1)
    on_overrun: Literal["finish", "cut"] = "finish"


class AuditWire(_Wire):
    path: str = "./egress-guard.db"
    query_strings: bool = False
    # normal: a committed row survives the proxy being killed; full: also power loss (an
    # fsync per commit, ~0.7x the throughput)
    synchronous: Literal["normal", "full"] = "normal"


class NetworkWire(_Wire):
    allow_private: list[str] = Field(default_factory=list)
    hosts: dict[str, list[str]] = Field(default_factory=dict)
    upstream_ca: str | None = None
    idle_timeout: int = Field(default=1800, ge=10, le=86400)
    connect_timeout: float = Field(default=10.0, gt=0, le=3600)  # TCP connect to an upstream
    tls_timeout: float = Field(default=10.0, gt=0, le=3600)  # TLS handshake with an upstream
    # request sent -> response headers; the OpenAI and Anthropic SDKs wait 600 s, and a long
    # non-streamed (reasoning) call can take minutes before its headers
    response_timeout: float = Field(default=600.0, gt=0, le=86400)
    header_timeout: float = Field(default=30.0, gt=0, le=3600)  # a client's request headers (slowloris)


class ConfigWire(_Wire):
    version: Literal[1]
    listen: str = "127.0.0.1:8080"
    ca_dir: str = "./certs"
    audit: AuditWire = Field(default_factory=AuditWire)
    allowlists: list[str] = Field(default_factory=list)
    allow: list[RuleWire] = Field(default_factory=list)
    network: NetworkWire = Field(default_factory=NetworkWire)
    secrets: SecretsWire = Field(default_factory=SecretsWire)
    services: list[Any] = Field(default_factory=list)  # preset names, {preset: …, secret: …} or full services
    agents: dict[str, AgentWire] = Field(default_factory=dict)
    spend: SpendWire = Field(default_factory=SpendWire)


# --- domain -------------------------------------------------------------------------------


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

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)

    def env_vars(self, service: Service) -> tuple[str, ...]:
        """Every variable an agent gets this service's fake key in: env_var first, then the
        names other tools read (CODEX_API_KEY, GOOGLE_API_KEY, GITHUB_TOKEN, ...)."""
        return self.service_env_vars.get(service.name, (service.env_var,))

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


def preset_names() -> list[str]:
    files = resources.files("egress_guard.allowlists").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml"))


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The wire model of the mapping at `loc`, walking fields, list items and the values of
    dict-valued fields (`agents: {NAME: AgentWire}`), or None where no model applies."""
    current: Any = model
    for part in loc:
        current = _without_none(current)
        origin = typing.get_origin(current)
        if origin is list:
            current = typing.get_args(current)[0]
        elif origin is dict:
            current = typing.get_args(current)[1]
        elif isinstance(current, type) and issubclass(current, BaseModel) and str(part) in current.model_fields:
            current = current.model_fields[str(part)].annotation
        else:
            return None
    current = _without_none(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model accepts at the mapping that holds `loc`'s last key."""
    holder = _model_at(model, loc[:-1])
    return list(holder.model_fields) if holder is not None else []


def _raise_validation(
    file: Path | str, model: type[BaseModel], err: ValidationError, prefix: tuple[int | str, ...] = ()
) -> None:
    errors = err.errors()
    # A misspelt key also makes the real key "missing": the unknown key is the better clue.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    inner = tuple(first["loc"])
    loc = prefix + inner
    key = _key_path(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        keys = _allowed_keys(model, inner)
        close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            file,
            _key_path(loc[:-1]) or key,
            f"unknown key {loc[-1]!r}",
            f"{hint}remove it or use one of: {', '.join(keys) or 'none'}",
            at=key,
        )
    if kind == "missing" and loc == ("version",):
        raise ConfigError(file, "version", "missing", "add 'version: 1' as the first line", line=1)
    if kind == "literal_error" and loc == ("version",):
        raise ConfigError(file, "version", "unsupported version", "this egress-guard reads 'version: 1'")
    if kind == "missing":
        raise ConfigError(file, key, "required key is missing", f"add {loc[-1]}:")
    if kind == "model_type" or kind == "dict_type":
        raise ConfigError(file, key, "expected a mapping", "see the config reference in README.md")
    raise ConfigError(file, key, first["msg"].lower(), "see the config reference in README.md")


def _read_yaml(file: Path | str, text: str) -> tuple[dict[str, Any], _Lines]:
    """The file's data (PyYAML, as always) and where each key is (ruamel.yaml)."""
    lines = _Lines(file, text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            file, "", f"not valid YAML ({problem})", "fix the YAML syntax", line=mark.line + 1 if mark else None
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(file, "", "the file must be a YAML mapping", "start it with 'version: 1'", line=1)
    return data, lines


def _rule(file: Path | str, key: str, rule_id: str, wire: RuleWire) -> Rule:
    raw = wire.host.strip()
    if "://" in raw or "/" in raw:
        bare = raw.split("://", 1)[-1].split("/", 1)[0]
        raise ConfigError(file, f"{key}.host", f"{raw!r} is a URL", f"use the bare host {bare!r}")
    wildcard = raw.startswith("*.")
    name = raw[2:] if wildcard else raw
    if raw == "*" or (wildcard and name in ("", "*")):
        raise ConfigError(
            file,
            f"{key}.host",
            "a bare '*' would allow every host",
            "name each host (api.openai.com), or a '*.' prefix under your own domain (*.example.com)",
        )
    if "*" in name:
        raise ConfigError(
            file,
            f"{key}.host",
            f"{raw!r}: wildcards are only allowed as a leading '*.' label",
            "use api.openai.com, not *.openai.*",
        )
    if not name.startswith("[") and name.count(":") == 1:
        host_part, port_part = name.split(":")
        raise ConfigError(
            file,
            f"{key}.host",
            f"{raw!r} includes a port",
            f"write 'host: {host_part}' and 'ports: [{port_part}]'",
        )
    try:
        host = normalize_host(name)
    except HostError as exc:
        raise ConfigError(file, f"{key}.host", str(exc), "use a DNS name such as api.openai.com") from None
    if wildcard and host.ip is not None:
        raise ConfigError(file, f"{key}.host", "a wildcard cannot prefix an IP address", "name the address alone")
    if wildcard and "." not in host.name:
        raise ConfigError(
            file,
            f"{key}.host",
            f"{raw!r} would allow a whole top-level domain",
            "name a registrable domain, e.g. *.example.com",
        )
    if wildcard:
        _check_wildcard_suffix(file, f"{key}.host", raw, host.name)
    ports = frozenset({443})  # plain HTTP (80) only where a rule lists it
    if wire.ports is not None:
        bad = [p for p in wire.ports if not 0 < p < 65536]
        if bad or not wire.ports:
            raise ConfigError(
                file, f"{key}.ports", f"invalid ports {wire.ports}", "list ports from 1 to 65535, e.g. [443]"
            )
        ports = frozenset(wire.ports)
    methods = None
    if wire.methods is not None:
        upper = [m.upper() for m in wire.methods]
        bad_m = [m for m in upper if m not in _METHODS]
        if bad_m or not upper:
            raise ConfigError(
                file,
                f"{key}.methods",
                f"unknown method(s) {bad_m or wire.methods}",
                f"use some of {sorted(_METHODS)} (CONNECT is implied by the host entry)",
            )
        methods = frozenset(upper)
    paths = None
    if wire.paths is not None:
        bad_p = [p for p in wire.paths if not p.startswith("/")]
        if bad_p or not wire.paths:
            raise ConfigError(
                file,
                f"{key}.paths",
                f"path globs must start with '/': {bad_p or wire.paths}",
                "write globs such as '/v1/*' ('*' also matches '/')",
            )
        paths = tuple(wire.paths)
    return Rule(rule_id, host.name, wildcard, ports, methods, paths)


def _check_wildcard_suffix(file: Path | str, key: str, raw: str, name: str) -> None:
    """Refuse `*.X` when X is a public suffix or holds one: it would match hosts of owners
    who have nothing to do with each other (every bucket on S3, every site on github.io)."""
    if is_public_suffix(name):
        raise ConfigError(
            file,
            key,
            f"{raw!r} would allow every domain registered under the public suffix {name} (Public Suffix List), "
            "whoever owns them",
            f"name the exact hosts, or a wildcard under one registered domain, e.g. *.example.{name}",
        )
    below = public_suffix_below(name)
    if below is not None:
        example = below.removeprefix("*.")
        raise ConfigError(
            file,
            key,
            f"{raw!r} spans public suffixes such as {below} (Public Suffix List): names under them belong to "
            "other owners",
            f"name the exact hosts (e.g. example.{example}), or a wildcard under one registered name, "
            f"e.g. *.example.{example}",
        )


def _rules(file: Path | str, key: str, source: str, wires: list[RuleWire]) -> list[Rule]:
    return [_rule(file, f"{key}[{i}]", f"{source}#{i}", w) for i, w in enumerate(wires)]


def load_preset(
    name_or_path: str, base: Path, config_file: Path, key: str
) -> tuple[list[Rule], PresetWire, Path | str]:
    is_name = "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml"))
    if is_name:
        names = preset_names()
        if name_or_path not in names:
            raise ConfigError(
                config_file,
                key,
                f"no preset named {name_or_path!r}",
                f"use one of {', '.join(names)}, or a path to a YAML file",
            )
        file: Path | str = f"preset {name_or_path}"
        text = resources.files("egress_guard.allowlists").joinpath(f"{name_or_path}.yaml").read_text()
        source = name_or_path
    else:
        path = (base / name_or_path).resolve()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(
                config_file,
                key,
                f"cannot read {path} ({exc.strerror})",
                "check the path (relative paths are relative to the config file)",
            ) from None
        file, source = path, path.stem
    data, lines = _read_yaml(file, text)
    try:
        try:
            preset = PresetWire.model_validate(data)
        except ValidationError as err:
            _raise_validation(file, PresetWire, err)
            raise AssertionError("unreachable") from err
        return _rules(file, "allow", source, preset.allow), preset, file
    except ConfigError as err:
        raise lines.locate(err) from None


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


def load_config(path: Path | str) -> Config:
    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found", "run 'egress-guard init' or pass --config") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read it ({exc.strerror})", "check the file's permissions") from None
    data, lines = _read_yaml(file, text)
    try:
        return _load(file, data)
    except ConfigError as err:
        raise lines.locate(err) from None


def _load(file: Path, data: dict[str, Any]) -> Config:
    try:
        wire = ConfigWire.model_validate(data)
    except ValidationError as err:
        _raise_validation(file, ConfigWire, err)
        raise AssertionError("unreachable") from err
    base = file.resolve().parent
    listen_host, listen_port = parse_listen(wire.listen, file, "listen")
    rules: list[Rule] = []
    for i, entry in enumerate(wire.allowlists):
        rules.extend(load_preset(entry, base, file, f"allowlists[{i}]")[0])
    rules.extend(_rules(file, "allow", "inline", wire.allow))
    allow_private, pinned, upstream_ca = _network(file, base, wire.network)
    vault = _vault(file, base, wire.secrets)
    services, env_vars = _services(file, base, wire, tuple(rules))
    agents = _agents(file, wire, services)
    spend = _spend(file, wire.spend)
    for i, svc in enumerate(services):
        if svc.meter is not None and spend.unknown_model == "deny" and svc.meter.provider not in _genai_provider_ids():
            raise ConfigError(
                file,
                f"services[{i}].meter.provider",
                f"genai-prices knows no provider {svc.meter.provider!r}, so every metered call of {svc.name} "
                "would be refused (spend.unknown_model: deny)",
                f"use one of {', '.join(sorted(_genai_provider_ids()))}; or price it at spend.fallback_price "
                "with spend.unknown_model: fallback",
            )
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
    )


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def _service(file: Path | str, key: str, wire: ServiceWire, backend: str, rules: tuple[Rule, ...]) -> Service:
    if not _NAME.match(wire.name):
        raise ConfigError(file, f"{key}.name", f"{wire.name!r} is not a valid name", "use letters, digits, '-', '_'")
    hosts = []
    for j, raw in enumerate(wire.hosts):
        try:
            host = normalize_host(raw)
        except HostError as exc:
            raise ConfigError(
                file, f"{key}.hosts[{j}]", str(exc), "list exact DNS names, e.g. api.openai.com"
            ) from None
        if not any(
            decide(rules, Destination(host, port)).allowed for port in (443, 80, *{p for r in rules for p in r.ports})
        ):
            raise ConfigError(
                file,
                f"{key}.hosts[{j}]",
                f"{host} is not on the allowlist, so the service could never be used",
                f"add the {wire.name} preset to allowlists, or an allow rule for {host}",
            )
        hosts.append(host.name)
    if not hosts:
        raise ConfigError(file, f"{key}.hosts", "no hosts", "list the hosts the secret may be sent to")
    slots = []
    for j, sw in enumerate(wire.credential):
        given = [k for k in ("header", "query", "basic_username") if getattr(sw, k) is not None]
        if len(given) != 1 or (sw.scheme is not None and sw.header is None):
            raise ConfigError(
                file,
                f"{key}.credential[{j}]",
                "name exactly one of header, query, basic_username",
                "e.g. {header: Authorization, scheme: Bearer} or {query: key}",
            )
        if sw.header is not None:
            slots.append(Slot("header", sw.header.lower(), sw.scheme))
        elif sw.query is not None:
            slots.append(Slot("query", sw.query))
        else:
            slots.append(Slot("basic", "authorization", username=sw.basic_username or ""))
    if not slots:
        raise ConfigError(file, f"{key}.credential", "no credential location", "e.g. [{header: x-api-key}]")
    shape = KeyShape(wire.fake_key.prefix, wire.fake_key.length, wire.fake_key.alphabet, wire.fake_key.suffix)
    if shape.tag_bits() < MIN_TAG_BITS:
        need = shape.id_chars() + 1 + int(MIN_TAG_BITS / __import__("math").log2(len(ALPHABETS[shape.alphabet])))
        raise ConfigError(
            file,
            f"{key}.fake_key.length",
            f"{shape.length} characters leave too few for the key's tag",
            f"use at least {need}",
        )
    if not _ENV_VAR.match(wire.env_var):
        raise ConfigError(file, f"{key}.env_var", f"{wire.env_var!r} is not a variable name", "e.g. OPENAI_API_KEY")
    for j, name in enumerate(wire.env_vars):
        if not _ENV_VAR.match(name):
            raise ConfigError(file, f"{key}.env_vars[{j}]", f"{name!r} is not a variable name", "e.g. CODEX_API_KEY")
        if name == wire.env_var or name in wire.env_vars[:j]:
            raise ConfigError(file, f"{key}.env_vars[{j}]", f"{name} is listed twice", "list each variable once")
    try:
        ref = SecretRef.parse(wire.secret)
    except ValueError as exc:
        raise ConfigError(
            file, f"{key}.secret", str(exc), "e.g. env:OPENAI_API_KEY or vault:secret/llm/openai#api_key"
        ) from None
    if ref.kind == "vault" and backend != "vault":
        raise ConfigError(
            file,
            f"{key}.secret",
            f"{ref} needs the vault backend",
            "set secrets.backend: vault and secrets.vault, or use an env: reference",
        )
    meter = Meter(wire.meter.api, wire.meter.provider or wire.meter.api) if wire.meter is not None else None
    return Service(
        wire.name,
        frozenset(hosts),
        tuple(slots),
        shape,
        wire.env_var,
        ref,
        wire.anonymous,
        meter,
        websocket=wire.websocket,
    )


def _genai_provider_ids() -> frozenset[str]:
    from genai_prices import data_snapshot

    return frozenset(p.id for p in data_snapshot.get_snapshot().providers)


def _services(
    file: Path, base: Path, wire: ConfigWire, rules: tuple[Rule, ...]
) -> tuple[tuple[Service, ...], dict[str, tuple[str, ...]]]:
    out: list[Service] = []
    env_vars: list[tuple[str, ...]] = []
    for i, entry in enumerate(wire.services):
        key = f"services[{i}]"
        if isinstance(entry, str):
            entry = {"preset": entry}
        if not isinstance(entry, dict):
            raise ConfigError(
                file, key, "expected a preset name or a mapping", "e.g. openai, or {preset: openai, secret: …}"
            )
        if "preset" in entry:
            try:
                ref = ServiceRefWire.model_validate(entry)
            except ValidationError as err:
                _raise_validation(file, ServiceRefWire, err, ("services", i))
                raise AssertionError("unreachable") from err
            _, preset, _ = load_preset(ref.preset, base, file, f"{key}.preset")
            if preset.service is None:
                raise ConfigError(
                    file,
                    f"{key}.preset",
                    f"preset {ref.preset!r} defines no service",
                    "use a preset with a service section (openai, anthropic, google-gemini, github)",
                )
            given = {"secret": ref.secret, "anonymous": ref.anonymous, "env_vars": ref.env_vars}
            given["websocket"] = ref.websocket
            overrides = {k: v for k, v in given.items() if v is not None}
            svc_wire = preset.service.model_copy(update=overrides)
            out.append(_service(file, key, svc_wire, wire.secrets.backend, rules))
        else:
            try:
                svc_wire = ServiceWire.model_validate(entry)
            except ValidationError as err:
                _raise_validation(file, ServiceWire, err, ("services", i))
                raise AssertionError("unreachable") from err
            out.append(_service(file, key, svc_wire, wire.secrets.backend, rules))
        env_vars.append((svc_wire.env_var, *svc_wire.env_vars))
    seen: dict[str, str] = {}
    owner: dict[str, str] = {}
    for i, svc in enumerate(out):
        if svc.name in {s.name for s in out[:i]}:
            raise ConfigError(file, f"services[{i}]", f"service {svc.name!r} is listed twice", "keep one entry")
        for host in svc.hosts:
            if host in seen:
                raise ConfigError(
                    file,
                    f"services[{i}].hosts",
                    f"{host} already belongs to service {seen[host]!r}",
                    "bind each host to one service",
                )
            seen[host] = svc.name
        for name in env_vars[i]:
            if name in owner:
                raise ConfigError(
                    file,
                    f"services[{i}]",
                    f"variable {name} already carries the fake key of service {owner[name]!r}",
                    "give each service its own env_var and env_vars",
                )
            owner[name] = svc.name
    return tuple(out), {svc.name: names for svc, names in zip(out, env_vars, strict=True)}


def _agents(file: Path, wire: ConfigWire, services: tuple[Service, ...]) -> dict[str, Agent]:
    names = {s.name for s in services}
    agents = {}
    for name, agent in wire.agents.items():
        if not _NAME.match(name):
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
