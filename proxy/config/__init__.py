"""Configuration: strict YAML wire models, converted into frozen domain objects.

`load_config(path)` is the only way in. Every problem raises one `ConfigError` naming the
file, the line, the key path and the fix; it never returns a partly valid config. The
names below are the package's public face: import them from `egress_guard.config`.

    source    a YAML file's data and where each key is (ruamel.yaml positions)
    wire      the pydantic models: exactly what the YAML may say
    errors    ConfigError, and a ValidationError phrased as one
    rules     allowlist rules and presets (allowlists/*.yaml)
    services  credentialed services
    fleet     `store:` (PostgreSQL, shared by replicas)
    policy    mode, unknown_hosts, rules (CEL, compiled here), escalation, freeze
    build     load_config: the wire models turned into the frozen Config
"""

from egress_guard.config.build import DEFAULT_CONFIG_NAME, Config, load_config, parse_listen
from egress_guard.config.errors import ConfigError
from egress_guard.config.fleet import StoreSettings
from egress_guard.config.policy import to_cel_rules
from egress_guard.config.rules import load_preset, preset_names
from egress_guard.config.wire import (
    AgentWire,
    AuditWire,
    BudgetWire,
    ConfigWire,
    EscalationWire,
    FakeKeyWire,
    FallbackPriceWire,
    FreezeWire,
    LimitsWire,
    MeterWire,
    NetworkWire,
    PolicyRuleWire,
    PresetWire,
    RuleWire,
    SecretsWire,
    ServiceRefWire,
    ServiceWire,
    SessionLimitsWire,
    SlotWire,
    SpendWire,
    VaultAuthWire,
    VaultWire,
    WebhookWire,
)

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "AgentWire",
    "AuditWire",
    "BudgetWire",
    "Config",
    "ConfigError",
    "ConfigWire",
    "EscalationWire",
    "FakeKeyWire",
    "FallbackPriceWire",
    "FreezeWire",
    "LimitsWire",
    "MeterWire",
    "NetworkWire",
    "PolicyRuleWire",
    "PresetWire",
    "RuleWire",
    "SecretsWire",
    "ServiceRefWire",
    "ServiceWire",
    "SessionLimitsWire",
    "SlotWire",
    "SpendWire",
    "StoreSettings",
    "VaultAuthWire",
    "VaultWire",
    "WebhookWire",
    "load_config",
    "load_preset",
    "parse_listen",
    "preset_names",
    "to_cel_rules",
]
