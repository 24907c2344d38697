"""`egress-guard doctor`: each check returns (ok, text). Texts say yes/no and the fix; they
never contain a secret value."""

from __future__ import annotations

import asyncio
import datetime
import os
import stat
from collections.abc import Iterator

from cryptography import x509

from egress_guard import audit, ca
from egress_guard.config import Config
from egress_guard.fakekeys import HMAC_KEY_FILE, load_or_create_hmac_key
from egress_guard.secrets import EnvBackend, SecretStore, SecretUnavailable, VaultBackend


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
        audit.migrate(config.audit_path)
        writable = os.access(config.audit_path, os.W_OK)
        yield writable, f"audit DB {config.audit_path} " + ("writable" if writable else "NOT writable")
    except Exception as exc:
        yield False, f"audit DB {config.audit_path}: {type(exc).__name__}. Fix: check audit.path and permissions"
    backend = VaultBackend(config.vault) if config.vault is not None else EnvBackend()
    try:
        yield True, f"secret backend: {backend.check()}"
    except SecretUnavailable as exc:
        yield False, f"secret backend: {exc}"
        return
    store = SecretStore(backend, retry_after=0)
    for service in config.services:
        try:
            asyncio.run(store.get(service.secret))
            yield True, f"service {service.name}: secret {service.secret} resolves: yes"
        except SecretUnavailable as exc:
            yield False, f"service {service.name}: secret {service.secret} resolves: no ({exc})"
