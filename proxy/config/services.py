"""Credentialed services: each `services:` entry (a preset name, a preset with overrides,
or a full definition) checked and turned into a `credentials.Service`.

A service binds a secret to hosts, so the checks here are the ones that keep a secret
where it belongs: its hosts are on the allowlist, each host and each agent variable
belongs to one service, and `vault:` references need the vault backend.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from egress_guard.config.errors import ConfigError
from egress_guard.config.rules import load_preset
from egress_guard.config.wire import ConfigWire, ServiceRefWire, ServiceWire
from egress_guard.credentials import Service, Slot
from egress_guard.fakekeys import ALPHABETS, MIN_TAG_BITS, KeyShape
from egress_guard.hosts import HostError, normalize_host
from egress_guard.policy import Destination, Rule, decide
from egress_guard.secrets import SecretRef
from egress_guard.spend import Meter

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _service(file: Path | str, key: str, wire: ServiceWire, backend: str, rules: tuple[Rule, ...]) -> Service:
    if not NAME.match(wire.name):
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
        need = shape.id_chars() + 1 + int(MIN_TAG_BITS / math.log2(len(ALPHABETS[shape.alphabet])))
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


def genai_provider_ids() -> frozenset[str]:
    from genai_prices import data_snapshot

    return frozenset(p.id for p in data_snapshot.get_snapshot().providers)


def _from_preset(file: Path, base: Path, key: str, ref: ServiceRefWire) -> ServiceWire:
    """The service of preset `ref.preset`, with the entry's overrides."""
    _, preset, _ = load_preset(ref.preset, base, file, f"{key}.preset")
    if preset.service is None:
        raise ConfigError(
            file,
            f"{key}.preset",
            f"preset {ref.preset!r} defines no service",
            "use a preset with a service section (openai, anthropic, google-gemini, github)",
        )
    given = {"secret": ref.secret, "anonymous": ref.anonymous, "env_vars": ref.env_vars, "websocket": ref.websocket}
    return preset.service.model_copy(update={k: v for k, v in given.items() if v is not None})


def to_services(
    file: Path, base: Path, wire: ConfigWire, rules: tuple[Rule, ...]
) -> tuple[tuple[Service, ...], dict[str, tuple[str, ...]]]:
    """The services, in order, and each one's agent variables (env_var first)."""
    out: list[Service] = []
    env_vars: list[tuple[str, ...]] = []
    for i, entry in enumerate(wire.services):
        key = f"services[{i}]"
        if isinstance(entry, ServiceWire):
            svc_wire = entry
        else:
            ref = ServiceRefWire(preset=entry) if isinstance(entry, str) else entry
            svc_wire = _from_preset(file, base, key, ref)
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


def check_priced(file: Path, services: tuple[Service, ...], unknown_model: str) -> None:
    """Refuse a metered service whose provider genai-prices does not know when unknown
    models are refused: every one of its metered calls would be."""
    for i, svc in enumerate(services):
        if svc.meter is not None and unknown_model == "deny" and svc.meter.provider not in genai_provider_ids():
            raise ConfigError(
                file,
                f"services[{i}].meter.provider",
                f"genai-prices knows no provider {svc.meter.provider!r}, so every metered call of {svc.name} "
                "would be refused (spend.unknown_model: deny)",
                f"use one of {', '.join(sorted(genai_provider_ids()))}; or price it at spend.fallback_price "
                "with spend.unknown_model: fallback",
            )
