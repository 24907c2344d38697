"""Configuration: strict YAML wire models, converted into frozen domain objects.

`load_config(path)` is the only way in. Every problem raises one `ConfigError` naming the
file, the line, the key path and the fix; it never returns a partly valid config. The
names below are the package's public face: import them from `egress_guard.config`.
"""

from egress_guard.config.build import (
    DEFAULT_CONFIG_NAME,
    AgentWire,
    AuditWire,
    BudgetWire,
    Config,
    ConfigError,
    ConfigWire,
    FakeKeyWire,
    FallbackPriceWire,
    LimitsWire,
    MeterWire,
    NetworkWire,
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
    load_config,
    load_preset,
    parse_listen,
    preset_names,
)

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "AgentWire",
    "AuditWire",
    "BudgetWire",
    "Config",
    "ConfigError",
    "ConfigWire",
    "FakeKeyWire",
    "FallbackPriceWire",
    "LimitsWire",
    "MeterWire",
    "NetworkWire",
    "PresetWire",
    "RuleWire",
    "SecretsWire",
    "ServiceRefWire",
    "ServiceWire",
    "SessionLimitsWire",
    "SlotWire",
    "SpendWire",
    "VaultAuthWire",
    "VaultWire",
    "load_config",
    "load_preset",
    "parse_listen",
    "preset_names",
]
