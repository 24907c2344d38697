"""The environment an agent needs to use the proxy: proxy URLs and CA locations for every
common runtime. Pure: builds and renders dicts, touches no files."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from egress_guard.ca import CAFiles
from egress_guard.config import Config

# Variables whose file *replaces* the runtime's trust store: they get system roots + our CA.
BUNDLE_VARS = (
    "SSL_CERT_FILE",  # OpenSSL, Python ssl, Ruby, many Go programs (via SSL_CERT_FILE)
    "REQUESTS_CA_BUNDLE",  # requests
    "CURL_CA_BUNDLE",  # curl, pycurl
    "GIT_SSL_CAINFO",  # git
    "PIP_CERT",  # pip
    "AWS_CA_BUNDLE",  # AWS SDKs and CLI
    "HTTPLIB2_CA_CERTS",  # httplib2 (Google API clients)
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",  # gRPC
    "CARGO_HTTP_CAINFO",  # cargo
    "NIX_SSL_CERT_FILE",  # nix
    "npm_config_cafile",  # npm, yarn classic
    "DENO_CERT",  # deno
    "CODEX_CA_CERTIFICATE",  # Codex CLI (its HTTPS and WebSocket connections)
)
# Variables that *add* to the runtime's own roots: our CA alone.
EXTRA_VARS = ("NODE_EXTRA_CA_CERTS",)
DEFAULT_NO_PROXY = "localhost,127.0.0.1,::1"


def agent_env(
    config: Config,
    *,
    bundle: Path,
    proxy_host: str | None = None,
    no_proxy: str | None = None,
    listen: tuple[str, int] | None = None,
) -> dict[str, str]:
    """`listen`: where the running proxy really listens (`up --listen` may differ from
    the config's); the config's listen address otherwise."""
    listen_host, listen_port = listen or (config.listen_host, config.listen_port)
    host = proxy_host or listen_host
    if host in ("0.0.0.0", "::"):  # noqa: S104 - a wildcard listen address is not dialable
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{listen_port}"
    cert = CAFiles(config.ca_dir).cert
    out = {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": DEFAULT_NO_PROXY if no_proxy is None else no_proxy,
    }
    out["no_proxy"] = out["NO_PROXY"]
    out |= {var: str(bundle) for var in BUNDLE_VARS}
    out |= {var: str(cert) for var in EXTRA_VARS}
    out["EGRESS_GUARD_CA"] = str(cert)
    return out


def render(env: dict[str, str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(env, indent=2) + "\n"
    if fmt == "dotenv":
        return "".join(f"{k}={v}\n" for k, v in env.items())
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
