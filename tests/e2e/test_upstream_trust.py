"""Upstream TLS trusts certifi, the operating system's store and network.upstream_ca.

The OS store is stood in for by a bundle file of our own (ca.SYSTEM_BUNDLES points at it):
the test never touches /etc.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from support.clients import curl
from support.upstream import Upstream

from egress_guard import ca


def test_the_bundle_holds_certifi_the_os_store_and_upstream_ca(tmp_path: Path) -> None:
    import certifi

    os_store = tmp_path / "os-ca-certificates.crt"
    os_store.write_bytes(trustme.CA().cert_pem.bytes())
    extra = tmp_path / "extra.pem"
    extra.write_bytes(trustme.CA().cert_pem.bytes())
    link = tmp_path / "cert.pem"
    link.symlink_to(os_store)  # two paths of one file (as on many distributions): read once
    path = ca.upstream_trust_file(tmp_path, extra, [str(tmp_path / "missing.crt"), str(os_store), str(link)])
    data = path.read_bytes()
    certifi_pem = Path(certifi.where()).read_bytes()
    assert data.startswith(certifi_pem.rstrip(b"\n"))
    assert data.count(os_store.read_bytes()) == 1 and data.endswith(extra.read_bytes())
    assert data.count(b"BEGIN CERTIFICATE") == certifi_pem.count(b"BEGIN CERTIFICATE") + 2
    # without network.upstream_ca there is still a bundle: certifi + the OS store
    assert ca.upstream_trust_file(tmp_path, None, [str(os_store)]).read_bytes().endswith(os_store.read_bytes())


@pytest.mark.parametrize("in_os_store", [True, False])
def test_an_upstream_signed_by_a_ca_in_the_os_store_is_trusted(
    make_proxy, upstream: Upstream, test_ca: tuple[trustme.CA, Path], tmp_path: Path, monkeypatch, in_os_store: bool
) -> None:
    """An internal upstream whose CA the operator installed in the OS store (and not in
    network.upstream_ca) is reachable; with the CA in neither place it is refused."""
    os_store = tmp_path / "os-ca-certificates.crt"
    os_store.write_bytes(test_ca[1].read_bytes() if in_os_store else trustme.CA().cert_pem.bytes())
    monkeypatch.setattr(ca, "SYSTEM_BUNDLES", (str(os_store),))
    proxy = make_proxy(network={"upstream_ca": None})
    status, headers, _ = curl(proxy, f"https://api.test.local:{upstream.port}/json")
    if in_os_store:
        assert status == 200
    else:
        assert status == 502, headers
        assert upstream.state.requests == []
