"""`egress-guard doctor`: each check returns (ok, text). Texts say yes/no and the fix; they
never contain a secret value.

Secrets are checked where they matter: when a proxy for this config is running, its own
answers (from the status file `up` keeps); otherwise this shell's, and doctor says so."""

from __future__ import annotations

import asyncio
import datetime
import os
import stat
from collections.abc import Iterator

from cryptography import x509

from egress_guard import ca, status
from egress_guard.config import Config
from egress_guard.fakekeys import HMAC_KEY_FILE, load_or_create_hmac_key
from egress_guard.secrets import SecretStore, SecretUnavailable, make_backend
from egress_guard.store import migrate


def run_checks(config: Config) -> Iterator[tuple[bool, str]]:
    files = ca.CAFiles(config.ca_dir)
    if not files.exists():
        yield False, f"CA: none in {config.ca_dir}. Fix: run 'egress-guard init'"
    else:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        days = (cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days
        mode = stat.S_IMODE(files.key_and_cert.stat().st_mode)
        ok = days > 0 and mode & 0o077 == 0
        yield (
            ok,
            f"CA {files.cert}: valid {days} more days, key mode {mode:o}"
            + ("" if ok else ". Fix: chmod 600 the key, or delete certs/ and re-run init to rotate"),
        )
    hmac_path = config.ca_dir / HMAC_KEY_FILE
    try:
        load_or_create_hmac_key(config.ca_dir, create=False)
        mode = stat.S_IMODE(hmac_path.stat().st_mode)
        yield mode & 0o077 == 0, f"fake-key HMAC key {hmac_path} (mode {mode:o})"
    except (FileNotFoundError, ValueError) as exc:
        yield False, f"fake-key HMAC key: {exc}. Fix: run 'egress-guard init'"
    try:
        migrate(config.audit_path)
        writable = os.access(config.audit_path, os.W_OK)
        yield writable, f"audit DB {config.audit_path} " + ("writable" if writable else "NOT writable")
    except Exception as exc:
        yield False, f"audit DB {config.audit_path}: {type(exc).__name__}. Fix: check audit.path and permissions"
    running = status.read(config)
    if running is not None:
        yield from _running_proxy(config, running)
        return
    yield (
        True,
        f"no running proxy found for this config (no live {status.status_path(config)}): checking secrets "
        "from THIS shell's environment; `up` reads them from the environment of the shell it is started in",
    )
    backend = make_backend(config.vault)
    try:
        yield True, f"secret backend: {backend.check()} (checked from this shell)"
    except SecretUnavailable as exc:
        yield False, f"secret backend: {exc} (checked from this shell)"
        return
    store = SecretStore(backend, retry_after=0)
    for service in config.services:
        try:
            asyncio.run(store.get(service.secret))
            yield True, f"service {service.name}: secret {service.secret} resolves: yes (in this shell)"
        except SecretUnavailable as exc:
            yield False, f"service {service.name}: secret {service.secret} resolves: no (in this shell: {exc})"


def _running_proxy(config: Config, running: status.Status) -> Iterator[tuple[bool, str]]:
    """The running proxy's own answers (from its status file), not this shell's."""
    yield (
        True,
        f"running proxy: pid {running.pid}, up since {running.started_at}, listening on {running.listen}; "
        f"secrets as the proxy sees them (checked {running.checked_at})",
    )
    for service in config.services:
        seen = running.services.get(service.name)
        if seen is None:
            yield False, f"service {service.name}: not known to the running proxy. Fix: restart 'up' (config changed)"
        elif seen.resolves:
            yield True, f"service {service.name}: secret {seen.secret} resolves: yes (in the running proxy)"
        else:
            fix = (
                f"export {seen.secret.removeprefix('env:')} in the shell that runs 'up', then restart it"
                if seen.secret.startswith("env:")
                else "check the secret in vault; the proxy retries by itself"
            )
            yield (
                False,
                f"service {service.name}: secret {seen.secret} resolves: no (in the running proxy: {seen.problem}). "
                f"Fix: {fix}",
            )
