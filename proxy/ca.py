"""egress-guard's own certificate authority.

The CA is made here with `cryptography` (EC P-256, CA:TRUE, keyCertSign) and written in the
file layout mitmproxy's CertStore reads (`mitmproxy-ca.pem`: key + certificate, mode 0600).
Agents get only the public certificate, or a bundle of the system roots plus it.
Never overwrites an existing CA: rotating it is a deliberate act (delete the files).
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KEY_AND_CERT = "mitmproxy-ca.pem"  # the name mitmproxy's CertStore.from_store(dir, "mitmproxy") loads
CERT = "egress-guard-ca.pem"
BUNDLE = "ca-bundle.pem"
SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/cert.pem",  # macOS, BSDs
)


@dataclass(frozen=True)
class CAFiles:
    dir: Path

    @property
    def key_and_cert(self) -> Path:
        return self.dir / KEY_AND_CERT

    @property
    def cert(self) -> Path:
        return self.dir / CERT

    @property
    def bundle(self) -> Path:
        return self.dir / BUNDLE

    def exists(self) -> bool:
        return self.key_and_cert.is_file() and self.cert.is_file()


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def create_ca(ca_dir: Path, *, days: int = 3650) -> bool:
    """Create the CA in `ca_dir` unless one is there. Returns True if it created one."""
    files = CAFiles(ca_dir)
    if files.key_and_cert.exists():
        if not files.cert.exists():  # only the public half is missing: derive it, keep the key
            pem = files.key_and_cert.read_bytes()
            cert = x509.load_pem_x509_certificate(pem)
            _write(files.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return False
    ca_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"egress-guard CA ({socket.gethostname()[:40]})"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egress-guard"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(files.key_and_cert, key_pem + cert_pem, 0o600)
    if files.cert.exists():
        files.cert.unlink()  # a stale public cert without its key is useless
    _write(files.cert, cert_pem, 0o644)
    return True


def system_roots() -> bytes:
    for candidate in SYSTEM_BUNDLES:
        try:
            return Path(candidate).read_bytes()
        except OSError:
            continue
    import certifi  # mitmproxy depends on it; the fallback on systems without a bundle file

    return Path(certifi.where()).read_bytes()


def write_bundle(ca_dir: Path) -> Path:
    """(Re)write system roots + the egress-guard CA; returns its path."""
    files = CAFiles(ca_dir)
    data = system_roots().rstrip(b"\n") + b"\n" + files.cert.read_bytes()
    tmp = files.bundle.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(files.bundle)
    return files.bundle


def os_trust_bundles(candidates: Sequence[str] | None = None) -> list[Path]:
    """The operating system's CA bundle files that exist here (each file once, however
    many of the usual paths link to it). `candidates` defaults to SYSTEM_BUNDLES, read at
    call time so a test can point it elsewhere."""
    found: list[Path] = []
    seen: set[Path] = set()
    for candidate in SYSTEM_BUNDLES if candidates is None else candidates:
        path = Path(candidate)
        try:
            real = path.resolve(strict=True)
        except OSError:
            continue
        if real not in seen and real.is_file():
            seen.add(real)
            found.append(path)
    return found


def upstream_trust_file(ca_dir: Path, extra_ca: Path | None, system_bundles: Sequence[str] | None = None) -> Path:
    """The roots egress-guard trusts for upstream TLS, in one file: certifi (mitmproxy's
    default), the operating system's store (where an internal or corporate CA is installed
    with update-ca-certificates / update-ca-trust) and network.upstream_ca if set.
    mitmproxy's ssl_verify_upstream_trusted_ca *replaces* certifi, hence all of them here.
    Written on every start, so a CA added to the OS store is trusted after a restart."""
    import certifi

    parts = [Path(certifi.where()).read_bytes()]
    for bundle in os_trust_bundles(system_bundles):
        try:
            parts.append(bundle.read_bytes())
        except OSError:
            continue
    if extra_ca is not None:
        parts.append(extra_ca.read_bytes())
    path = ca_dir / "upstream-trust.pem"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(b"".join(p.rstrip(b"\n") + b"\n" for p in parts))
    tmp.chmod(0o644)
    tmp.replace(path)
    return path
