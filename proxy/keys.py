"""Minting, listing and revoking fake keys: what the CLI does to the key table.

Never touches a real secret. A minted key is printed once and never stored: the table
holds only its id and what it grants.
"""

from __future__ import annotations

import datetime
import re
import secrets
from dataclasses import dataclass

from egress_guard import store
from egress_guard.config import Config
from egress_guard.fakekeys import KeyRecord, load_or_create_hmac_key, make_key, new_key_id
from egress_guard.timeutil import iso, now_iso, parse_duration, utcnow

MAX_TTL = 90 * 86400


class KeyCommandError(ValueError):
    """A mint/revoke request that cannot be honoured; the message names the fix."""


def parse_ttl(text: str) -> int:
    try:
        seconds = parse_duration(text, bare_seconds=True)
    except ValueError as exc:
        raise KeyCommandError(str(exc)) from None
    if seconds == 0:
        raise KeyCommandError(f"{text!r} is not a duration: use e.g. 90s, 30m, 8h, 7d")
    if seconds > MAX_TTL:
        raise KeyCommandError(f"{text!r} is longer than the 90 days a key may live")
    return seconds


@dataclass(frozen=True)
class Minted:
    record: KeyRecord
    env: dict[str, str]  # the agent's variable -> its fake key


def mint(
    config: Config, agent: str, *, ttl: str = "8h", services: list[str] | None = None, session: str | None = None
) -> Minted:
    if agent not in config.agents:
        known = ", ".join(sorted(config.agents)) or "none: add an agents: section"
        raise KeyCommandError(f"no agent named {agent!r} in {config.path} (agents: {known})")
    allowed = config.agents[agent].services
    chosen = tuple(services) if services else allowed
    if not chosen:
        raise KeyCommandError(f"agent {agent!r} has no services: list some under agents.{agent}.services")
    extra = [s for s in chosen if s not in allowed]
    if extra:
        raise KeyCommandError(
            f"agent {agent!r} may not use {', '.join(extra)} (agents.{agent}.services: {', '.join(allowed)})"
        )
    session = session or f"s-{secrets.token_hex(6)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}", session):
        raise KeyCommandError(f"{session!r} is not a valid session id (letters, digits, '_', '.', ':', '-')")
    seconds = parse_ttl(ttl)
    try:
        hmac_key = load_or_create_hmac_key(config.ca_dir, create=False)
    except FileNotFoundError:
        raise KeyCommandError(f"no fake-key HMAC key in {config.ca_dir}: run 'egress-guard init'") from None
    now = utcnow()
    record = KeyRecord(new_key_id(), agent, session, chosen, iso(now), iso(now + datetime.timedelta(seconds=seconds)))
    with store.open_store(config, write=True) as db:
        db.write(store.InsertKey(record))
    env: dict[str, str] = {}
    for name in chosen:
        service = config.service(name)
        assert service is not None
        key = make_key(hmac_key, service.shape, service.name, record.key_id)
        env |= dict.fromkeys(config.env_vars(service), key)  # OPENAI_API_KEY and CODEX_API_KEY alike
    return Minted(record, env)


def list_keys(config: Config, agent: str | None = None, include_inactive: bool = False) -> list[dict]:
    if config.store is None and not config.audit_path.exists():
        return []
    with store.open_store(config) as db:
        rows = db.keys(agent)
    now = now_iso()
    out = []
    for r in rows:
        status = r.status(now)
        if include_inactive or status == "active":
            out.append(
                {
                    "key_id": r.key_id,
                    "agent": r.agent,
                    "session": r.session,
                    "services": ",".join(r.services),
                    "created_at": r.created_at,
                    "expires_at": r.expires_at,
                    "status": status,
                    "revoked_reason": r.revoked_reason,
                }
            )
    return out


def revoke_keys(
    config: Config, *, agent: str | None = None, session: str | None = None, key_id: str | None = None, reason: str
) -> int:
    with store.open_store(config, write=True) as db:
        return db.write(store.RevokeKeys(reason, now_iso(), agent=agent, session=session, key_id=key_id))


def secret_env_names(config: Config) -> set[str]:
    """Environment variables that may hold real secrets on this host: the env: secrets, the
    vault credentials, and every variable a service's key travels in to agents (a real
    GITHUB_TOKEN on the host must not reach an agent that got no fake one). Never hand
    them to an agent."""
    names = {s.secret.name for s in config.services if s.secret.kind == "env"}
    names |= {name for s in config.services for name in config.env_vars(s)}
    if config.vault is not None:
        names |= {config.vault.token_env, config.vault.role_id_env, config.vault.secret_id_env}
    return names
