"""Allowlist rules: a rule's wire form checked and turned into a policy `Rule`, and the
presets (`allowlists/*.yaml`, or a preset file of the operator's) that hold them.

Every refusal says why the rule would be dangerous or never match, and how to write it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from egress_guard.config.errors import ConfigError, validate
from egress_guard.config.source import read_yaml
from egress_guard.config.wire import PresetWire, RuleWire
from egress_guard.hosts import HostError, is_public_suffix, normalize_host, public_suffix_below
from egress_guard.policy import Rule

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


def preset_names() -> list[str]:
    """The names of the presets shipped in `allowlists/`."""
    files = resources.files("egress_guard.allowlists").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml"))


def to_rule(file: Path | str, key: str, rule_id: str, wire: RuleWire) -> Rule:
    """The policy rule of one `allow:` entry (`key` is where it is, `rule_id` its audit name)."""
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


def to_rules(file: Path | str, key: str, source: str, wires: list[RuleWire]) -> list[Rule]:
    return [to_rule(file, f"{key}[{i}]", f"{source}#{i}", w) for i, w in enumerate(wires)]


def load_preset(
    name_or_path: str, base: Path, config_file: Path, key: str
) -> tuple[list[Rule], PresetWire, Path | str]:
    """A preset by name (shipped) or path (relative to `base`, the config's folder): its
    rules, its wire form (for its service) and the file it was read from."""
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
    data, positions = read_yaml(file, text)
    try:
        preset = validate(PresetWire, data, file)
        return to_rules(file, "allow", source, preset.allow), preset, file
    except ConfigError as err:
        raise positions.locate(err) from None
