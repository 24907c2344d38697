"""Real secrets: where they come from (the environment, or Vault/OpenBao via hvac), the
redacted type that carries them, and the cache that keeps Vault off the request path.

Must never: put a secret value into a log line, an exception message, a repr or an audit
row. `Secret` redacts itself everywhere except `.reveal()`, which only the injection and
scrubbing code calls. hvac is synchronous: it only ever runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypeVar

log = logging.getLogger("egress_guard.secrets")
T = TypeVar("T")


class Secret:
    """A secret value. `repr`, `str` and formatting never show it; `.reveal()` does."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**redacted**')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        import hmac

        return isinstance(other, Secret) and hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __reduce__(self) -> tuple:
        raise TypeError("a Secret cannot be pickled")


class SecretUnavailable(Exception):
    """The secret for a reference cannot be had right now. The message never holds a value."""


_REF = re.compile(r"^(?P<kind>env|vault):(?P<body>.+)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class SecretRef:
    """`env:OPENAI_API_KEY` or `vault:llm/openai#api_key` (mount/path#field)."""

    kind: Literal["env", "vault"]
    name: str = ""  # env var
    mount: str = ""
    path: str = ""
    field: str = ""

    @classmethod
    def parse(cls, text: str) -> SecretRef:
        m = _REF.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not a secret reference: write env:NAME or vault:mount/path#field")
        body = m.group("body")
        if m.group("kind") == "env":
            if not _ENV_NAME.match(body):
                raise ValueError(f"{text!r}: {body!r} is not an environment variable name")
            return cls("env", name=body)
        location, _, fld = body.partition("#")
        mount, _, path = location.strip("/").partition("/")
        if not (mount and path and fld):
            raise ValueError(f"{text!r}: write vault:MOUNT/PATH#FIELD, e.g. vault:secret/llm/openai#api_key")
        return cls("vault", mount=mount, path=path, field=fld)

    def __str__(self) -> str:
        return f"env:{self.name}" if self.kind == "env" else f"vault:{self.mount}/{self.path}#{self.field}"


class Backend(Protocol):
    def read(self, ref: SecretRef) -> Secret: ...

    def check(self) -> str: ...


class EnvBackend:
    """Secrets from the environment of `egress-guard up`: the zero-setup default."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ

    def read(self, ref: SecretRef) -> Secret:
        if ref.kind != "env":
            raise SecretUnavailable(f"{ref} needs secrets.backend: vault")
        value = self.environ.get(ref.name, "")
        if not value.strip():
            raise SecretUnavailable(f"environment variable {ref.name} is not set where egress-guard runs")
        return Secret(value.strip())

    def check(self) -> str:
        return "environment"


@dataclass(frozen=True)
class VaultSettings:
    address: str
    auth: Literal["token", "approle"] = "token"
    token_env: str = "VAULT_TOKEN"
    token_file: Path | None = None
    role_id_env: str = "VAULT_ROLE_ID"
    secret_id_env: str = "VAULT_SECRET_ID"
    approle_mount: str = "approle"
    namespace: str | None = None
    ca_file: Path | None = None
    kv_version: Literal[1, 2] = 2
    timeout: float = 3.0


class VaultBackend:
    """Vault / OpenBao KV v1 or v2 through hvac, with token or AppRole auth. Synchronous:
    call it from a worker thread (SecretStore does)."""

    def __init__(self, settings: VaultSettings, environ: dict[str, str] | None = None) -> None:
        import hvac
        import requests

        self.settings = settings
        self.environ = os.environ if environ is None else environ
        session = requests.Session()
        session.trust_env = False  # never send Vault traffic through HTTP(S)_PROXY
        # hvac takes `verify` from a session it is given, over its own argument
        session.verify = str(settings.ca_file) if settings.ca_file else True
        self.client = hvac.Client(
            url=settings.address,
            namespace=settings.namespace,
            timeout=settings.timeout,
            session=session,
            verify=session.verify,
        )
        self._lock = threading.Lock()
        self._token_expires: float | None = None  # monotonic; None = not logged in yet

    def _env(self, name: str, what: str) -> str:
        value = self.environ.get(name, "").strip()
        if not value:
            raise SecretUnavailable(f"{what}: environment variable {name} is not set where egress-guard runs")
        return value

    def _login(self) -> None:
        s = self.settings
        if s.auth == "token":
            if s.token_file is not None:
                try:
                    token = s.token_file.read_text().strip()
                except OSError as exc:
                    raise SecretUnavailable(f"cannot read vault token file {s.token_file} ({exc.strerror})") from None
            else:
                token = self._env(s.token_env, "vault token")
            self.client.token = token
        else:
            role_id = self._env(s.role_id_env, "vault AppRole role_id")
            secret_id = self._env(s.secret_id_env, "vault AppRole secret_id")
            self.client.auth.approle.login(role_id=role_id, secret_id=secret_id, mount_point=s.approle_mount)
        info = self.client.auth.token.lookup_self()["data"]
        ttl = int(info.get("ttl") or 0)
        self._token_expires = time.monotonic() + ttl if ttl > 0 else float("inf")

    def _ensure_token(self) -> None:
        if self._token_expires is None:
            self._login()
            return
        remaining = self._token_expires - time.monotonic()
        if remaining == float("inf") or remaining > 60:
            return
        try:  # renew before expiry; a token that can no longer be renewed is replaced by a new login
            data = self.client.auth.token.renew_self()["auth"]
            self._token_expires = time.monotonic() + int(data.get("lease_duration") or 0)
            log.info("vault token renewed")
        except Exception:
            self._login()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        import hvac.exceptions as hx
        import requests

        try:
            with self._lock:
                self._ensure_token()
                return fn()
        except SecretUnavailable:
            raise
        except (hx.Unauthorized, hx.Forbidden):
            self._token_expires = None  # log in again next time
            raise SecretUnavailable(f"vault denied access to {what} (check the token's policy)") from None
        except hx.InvalidPath:
            raise SecretUnavailable(f"{what} does not exist in vault") from None
        except (hx.VaultDown, hx.VaultNotInitialized):
            raise SecretUnavailable(f"vault is sealed or not initialised (reading {what})") from None
        except requests.exceptions.SSLError:
            raise SecretUnavailable(f"TLS to vault failed (reading {what}); check secrets.vault.ca_file") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout, OSError):
            # OSError: requests also raises it when the CA file vanished; treated as an outage
            raise SecretUnavailable(f"vault at {self.settings.address} is unreachable (reading {what})") from None
        except hx.VaultError as exc:
            raise SecretUnavailable(f"vault error reading {what} ({type(exc).__name__})") from None

    def read(self, ref: SecretRef) -> Secret:
        if ref.kind != "vault":
            return EnvBackend(dict(self.environ)).read(ref)

        def fetch() -> Secret:
            if self.settings.kv_version == 2:
                response = self.client.secrets.kv.v2.read_secret_version(
                    path=ref.path, mount_point=ref.mount, raise_on_deleted_version=True
                )
                data = response["data"]["data"]
            else:
                data = self.client.secrets.kv.v1.read_secret(path=ref.path, mount_point=ref.mount)["data"]
            value = data.get(ref.field) if isinstance(data, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise SecretUnavailable(f"{ref} has no field {ref.field!r}")
            return Secret(value.strip())

        return self._call(str(ref), fetch)

    def check(self) -> str:
        def probe() -> str:
            info = self.client.auth.token.lookup_self()["data"]
            return f"vault {self.settings.address} (authenticated, policies: {', '.join(info.get('policies', []))})"

        return self._call("the token", probe)


@dataclass
class _Entry:
    secret: Secret | None = None
    fetched: float = 0.0
    error: str | None = None
    failed_at: float = 0.0
    refreshing: asyncio.Task[None] | None = None


@dataclass
class SecretStore:
    """An in-memory cache in front of a backend. `get()` answers from the cache; Vault is
    read in a worker thread, at most once at a time per reference, and refreshed in the
    background before the entry goes stale. A failure is remembered for `retry_after`
    seconds (requests fail fast with the reason), after which the next request tries again:
    the store recovers by itself when Vault returns."""

    backend: Backend
    ttl: float = 300.0
    retry_after: float = 1.0
    fetch_timeout: float = 5.0
    _entries: dict[SecretRef, _Entry] = field(default_factory=dict)

    async def _fetch(self, ref: SecretRef, entry: _Entry) -> None:
        try:
            secret = await asyncio.wait_for(asyncio.to_thread(self.backend.read, ref), self.fetch_timeout)
        except SecretUnavailable as exc:
            entry.error, entry.failed_at = str(exc), time.monotonic()
            log.warning("secret %s unavailable: %s", ref, exc)
            return
        except TimeoutError:
            entry.error, entry.failed_at = f"reading {ref} timed out", time.monotonic()
            return
        except Exception as exc:  # a backend bug: keep the type, never the message (it may echo data)
            entry.error, entry.failed_at = f"reading {ref} failed ({type(exc).__name__})", time.monotonic()
            return
        if entry.error:
            log.info("secret %s available again", ref)
        entry.secret, entry.fetched, entry.error = secret, time.monotonic(), None

    async def get(self, ref: SecretRef) -> Secret:
        entry = self._entries.setdefault(ref, _Entry())
        now = time.monotonic()
        fresh = entry.secret is not None and now - entry.fetched < self.ttl
        if fresh:
            if now - entry.fetched > self.ttl / 2 and entry.refreshing is None:
                entry.refreshing = asyncio.create_task(self._refresh(ref, entry))
            return entry.secret  # type: ignore[return-value]
        if entry.error and now - entry.failed_at < self.retry_after:
            raise SecretUnavailable(entry.error)
        if entry.refreshing is None:
            entry.refreshing = asyncio.create_task(self._refresh(ref, entry))
        await asyncio.shield(entry.refreshing)
        if entry.secret is not None and time.monotonic() - entry.fetched < self.ttl and not entry.error:
            return entry.secret
        raise SecretUnavailable(entry.error or f"{ref} unavailable")

    async def _refresh(self, ref: SecretRef, entry: _Entry) -> None:
        try:
            await self._fetch(ref, entry)
            if entry.error:
                entry.secret = None  # a failed read drops the old value: fail closed
        finally:
            entry.refreshing = None

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.refreshing is not None:
                entry.refreshing.cancel()
                with contextlib.suppress(BaseException):
                    await entry.refreshing


def make_backend(vault: VaultSettings | None) -> Backend:
    """The backend the config names: Vault/OpenBao when it has a vault section (secrets.backend:
    vault), else the proxy's own environment."""
    return VaultBackend(vault) if vault is not None else EnvBackend()
