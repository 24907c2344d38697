"""Wire models: exactly what the YAML may say, and nothing else.

pydantic models with `extra="forbid"` (an unknown key is an error) and the bounds each
value must keep. They carry no meaning beyond the file's shape: `build` turns them into
the frozen domain objects the proxy runs on.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


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


def _service_shape(value: Any) -> str | None:
    """Which shape a `services:` entry has (the tag of `ServiceEntryWire`), None if none.
    Models are tagged too: pydantic asks again when it serialises one."""
    if isinstance(value, dict):
        return "preset" if "preset" in value else "service"
    if isinstance(value, str):
        return "name"
    if isinstance(value, ServiceRefWire):
        return "preset"
    return "service" if isinstance(value, ServiceWire) else None


# A `services:` entry: a preset's name (`openai`), a preset with overrides
# (`{preset: openai, secret: …}`), or a whole service (a mapping without `preset`).
ServiceEntryWire = Annotated[
    Annotated[str, Tag("name")] | Annotated[ServiceRefWire, Tag("preset")] | Annotated[ServiceWire, Tag("service")],
    Discriminator(
        _service_shape,
        custom_error_type="service_shape",
        custom_error_message="expected a preset name or a mapping",
    ),
]


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


class StoreWire(_Wire):
    url: str
    password_file: str | None = None
    replica: str | None = None
    timeout: float = Field(default=2.0, gt=0, le=60)  # seconds; slower fails closed (503)


def _store_shape(value: Any) -> str | None:
    if isinstance(value, str):
        return "url"
    return "store" if isinstance(value, dict | StoreWire) else None


# `store:`: a URL, or a mapping with `url` and the rest.
StoreEntryWire = Annotated[
    Annotated[str, Tag("url")] | Annotated[StoreWire, Tag("store")],
    Discriminator(
        _store_shape,
        custom_error_type="store_shape",
        custom_error_message="expected a postgresql:// URL or a mapping with url",
    ),
]


class MetricsWire(_Wire):
    listen: str = "127.0.0.1:9464"


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


class PolicyRuleWire(_Wire):
    """One `rules:` entry: a CEL expression over the request and what to do when it holds."""

    name: str | None = None
    hosts: list[str] | None = None  # None: any host (deny and escalate only)
    match: str
    action: Literal["allow", "deny", "escalate"]
    reason: str = ""


class WebhookWire(_Wire):
    url: str
    secret_file: str
    callback_listen: str | None = None


class EscalationWire(_Wire):
    timeout: str | int = "120s"  # a duration (90s, 2m); 1s..1h
    webhook: WebhookWire | None = None


class FreezeWire(_Wire):
    window: str | int = "60s"
    warmup: int = Field(default=10, ge=1, le=10000)
    requests_rate: str | float | None = None  # "5x": a factor over the baseline
    spend_rate: str | float | None = None
    hosts_rate: str | float | None = None
    refusals: int | None = Field(default=None, ge=1)
    min_requests: int = Field(default=20, ge=0)
    min_usd: Decimal = Field(default=Decimal("0.01"), ge=0)
    action: Literal["escalate", "deny"] = "escalate"


class ConfigWire(_Wire):
    version: Literal[1]
    listen: str = "127.0.0.1:8080"
    ca_dir: str = "./certs"
    audit: AuditWire = Field(default_factory=AuditWire)
    store: StoreEntryWire | None = None
    metrics: MetricsWire | None = None
    allowlists: list[str] = Field(default_factory=list)
    allow: list[RuleWire] = Field(default_factory=list)
    network: NetworkWire = Field(default_factory=NetworkWire)
    secrets: SecretsWire = Field(default_factory=SecretsWire)
    services: list[ServiceEntryWire] = Field(default_factory=list)
    agents: dict[str, AgentWire] = Field(default_factory=dict)
    spend: SpendWire = Field(default_factory=SpendWire)
    mode: Literal["enforce", "observe"] = "enforce"
    unknown_hosts: Literal["deny", "escalate"] = "deny"
    rules: list[PolicyRuleWire] = Field(default_factory=list)
    escalation: EscalationWire = Field(default_factory=EscalationWire)
    freeze: FreezeWire | None = None
