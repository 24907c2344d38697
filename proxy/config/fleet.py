"""The config of a fleet: `store:` (PostgreSQL, shared by replicas) and `metrics:`.

    store: postgresql://eg@db.internal:5432/egress_guard        # short form
    store: {url: …, password_file: …, replica: eu-1, timeout: 2}
    metrics: {listen: 127.0.0.1:9464}

No password in the config: it comes from `password_file`, or libpq's own `PGPASSWORD` /
`~/.pgpass`, so it is never in a file egress-guard prints, logs or copies.
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from egress_guard.config.errors import ConfigError
from egress_guard.config.wire import StoreWire


@dataclass(frozen=True)
class StoreSettings:
    """A PostgreSQL store. `url` holds no password; `name` is what messages show."""

    url: str
    password_file: Path | None = None
    replica: str = ""
    timeout: float = 2.0

    @property
    def name(self) -> str:
        """scheme://user@host:port/db: the URL without its query (libpq options stay out of
        every message)."""
        parts = urlsplit(self.url)
        return parts._replace(query="", fragment="").geturl()

    def conninfo(self) -> str:
        """The conninfo for psycopg: the URL, and the password from its file if there is one.
        Raises OSError naming the file (not its content) if it cannot be read."""
        if self.password_file is None:
            return self.url
        try:
            password = self.password_file.read_text().strip()
        except OSError as exc:
            raise OSError(f"store.password_file {self.password_file}: {exc.strerror}") from None
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.url, password=password)

    def __repr__(self) -> str:  # the URL holds no secret; say so rather than show a file's path
        return f"StoreSettings({self.url!r}, replica={self.replica!r}, timeout={self.timeout})"


def default_replica() -> str:
    """A replica's name when the config gives none: the host and a random suffix, so two
    replicas on one host never share an audit chain."""
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


def parse_store(file: Path, base: Path, wire: str | StoreWire | None) -> StoreSettings | None:
    if wire is None:
        return None
    if isinstance(wire, str):
        wire = StoreWire(url=wire)
    key = "store.url" if wire.replica or wire.password_file or wire.timeout != 2.0 else "store"
    url = wire.url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        # not the URL itself: a malformed one may hold a password
        raise ConfigError(file, key, f"not a URL ({exc})", "write postgresql://USER@HOST:PORT/DB") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            file,
            key,
            f"{parts.scheme or url!r} is not a store egress-guard knows",
            "write postgresql://USER@HOST:PORT/DB, or remove `store:` for the embedded SQLite file (audit.path)",
        )
    params = {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if params & {"password", "sslpassword"}:
        raise ConfigError(
            file,
            key,
            "the URL holds a password (a query parameter)",
            "remove it from the URL; give it in store.password_file, PGPASSWORD or ~/.pgpass",
        )
    if parts.password is not None:
        raise ConfigError(
            file,
            key,
            "the URL holds a password",
            "remove it from the URL; give it in store.password_file, PGPASSWORD or ~/.pgpass",
        )
    if not parts.hostname or not parts.path.strip("/"):
        raise ConfigError(file, key, f"{url!r} names no host or no database", "write postgresql://USER@HOST:PORT/DB")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(file, key, f"port {port} is out of range", "write postgresql://USER@HOST:PORT/DB")
    password_file = (base / wire.password_file).resolve() if wire.password_file else None
    if password_file is not None and not password_file.is_file():
        raise ConfigError(
            file, "store.password_file", f"{password_file} does not exist", "point it at a file holding the password"
        )
    replica = wire.replica or default_replica()
    if not all(c.isalnum() or c in "-_.:" for c in replica) or len(replica) > 64:
        raise ConfigError(
            file, "store.replica", f"{replica!r} is not a replica name", "use letters, digits, '-', '_', '.' or ':'"
        )
    return StoreSettings(url=url, password_file=password_file, replica=replica, timeout=wire.timeout)
