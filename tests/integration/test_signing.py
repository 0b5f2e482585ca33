"""Signing end to end on 3 peers against the real pebble (SPEC R3-R7; issue 2
acceptance 2, 3 and 6)."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusteracme.coordinator.accounts import account_binding
from clusteracme.coordinator.secretbox import SecretBox
from cryptography.hazmat.primitives import serialization

from clusteracme.errors import FailedPrecondition
from clusteracme.localcluster.cluster import LocalCluster, peer_address
from tests.integration.conftest import agent_log, ctl_json, keyspace, make_cluster, record, register_account

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from make_cluster(tmp_path_factory, "signing", peers=3, front_mode="closed")


@pytest.fixture(scope="module")
def with_account(cluster: LocalCluster) -> LocalCluster:
    register_account(cluster)
    for i in (1, 2, 3):
        cluster.ctl("peer", "enable", f"peer{i}")
    return cluster


def _tokens(cluster: LocalCluster, order_id: str) -> list[str]:
    return [a["token"] for a in record(cluster, f"orders/{order_id}")["authorizations"] if a["token"]]


def test_each_peer_serves_a_validation(with_account: LocalCluster) -> None:
    """Order k puts peer k first in DNS; pebble validates only the first
    address, so a valid order proves that peer served its tokens."""
    cluster = with_account
    for k in (1, 2, 3):
        names = [f"a{k}.rotate.example", f"b{k}.rotate.example"]
        first_order = [k, *[i for i in (1, 2, 3) if i != k]]
        for name in names:
            cluster.set_dns(name, first_order)
        cluster.ctl("csr", "create", f"peer{k}", "--cn", names[0], "--san", names[1])
        order = ctl_json(cluster, "sign", f"peer{k}", "--wait")
        assert order["succeeded"], order
        assert {a["status"] for a in order["authorizations"]} == {"valid"}
        assert all(p["acknowledged"] and p["self_checked"] for p in order["peers"])
        assert len(order["peers"]) == 3
        # The validator's requests reached peer k (it was first in DNS) ...
        validations = [line for line in agent_log(cluster, k).splitlines()
                       if "challenge " in line and "Pebble" in line and "HTTP 200" in line]
        for token in _tokens(cluster, order["order_id"]):
            assert any(token in line for line in validations), f"peer{k} did not serve {token} to pebble"
        pending = ctl_json(cluster, "pending", "show", f"peer{k}")
        assert sorted(pending["certificate"]["sans"]) == sorted(names)
        assert pending["certificate"]["matches_peer_key"] is True


def test_stopped_agent_fails_the_self_check_not_the_ca(with_account: LocalCluster) -> None:
    cluster = with_account
    names = ["c.down.example", "d.down.example"]
    for name in names:
        cluster.set_dns(name, [1, 2, 3])
    cluster.ctl("pending", "discard", "peer1", check=False)
    cluster.ctl("csr", "create", "peer1", "--cn", names[0], "--san", names[1])
    cluster.stop_agent(2)
    try:
        failed = cluster.ctl("sign", "peer1", "--wait", check=False)
        assert failed.returncode != 0
        assert "self-check failed" in failed.stderr and "peer2" in failed.stderr, failed.stderr
        order_id = re.search(r"order ([0-9a-f]{16})", failed.stdout).group(1)  # type: ignore[union-attr]
        # The CA was never asked to validate: its authorizations are still pending.
        live = ctl_json(cluster, "order", "show", order_id, "--refresh")
        assert [a["status"] for a in live["authorizations"]] == ["pending", "pending"]
        # The peers that did take the tokens no longer serve them (closed mode:
        # the front is not even listening).
        for index in (1, 3):
            for token in _tokens(cluster, order_id):
                url = f"http://{peer_address(index)}:{cluster.front_port}/.well-known/acme-challenge/{token}"
                with pytest.raises((urllib.error.URLError, ConnectionError)):
                    urllib.request.urlopen(url, timeout=2)
        status = ctl_json(cluster, "status", "peer1")["peers"][0]["slots"][0]
        assert status["last_sign_status"] == "failed" and "peer2" in status["last_sign_error"]
    finally:
        cluster.start_agent(2)
    cluster.wait_peers_alive()
    order = ctl_json(cluster, "sign", "peer1", "--wait")
    assert order["succeeded"], order


def test_no_peer_private_key_in_etcd(with_account: LocalCluster) -> None:
    cluster = with_account
    values = [value for _, value, _ in keyspace(cluster)]
    blob = b"\n".join(values)
    assert b"PRIVATE KEY" not in blob
    key_files = sorted(Path(cluster.run_dir / "agents").glob("*/slots/*/keys/*.key"))
    assert len(key_files) >= 3
    for path in key_files:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        secret = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[attr-defined]
        for needle in (der, base64.b64encode(der), secret, secret.hex().encode(), base64.b64encode(secret)):
            assert needle not in blob, f"material of {path} found in etcd"
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_account_key_is_sealed(with_account: LocalCluster) -> None:
    cluster = with_account
    provider = record(cluster, "providers/pebble")
    sealed = provider["account_key"]
    assert sealed.startswith("v2:") and b"BEGIN" not in base64.b64decode(sealed.split(":")[2])
    bound = account_binding(provider)  # the directory URL and CA bundle it was registered with
    with pytest.raises(FailedPrecondition, match="does not open"):
        SecretBox(bytes(32)).open(sealed, "provider/pebble", bound)
    opened = SecretBox.from_file(cluster.run_dir / "account-key.secret").open(sealed, "provider/pebble", bound)
    assert opened.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert json.loads(json.dumps(provider))["account_url"].startswith("https://127.0.0.1:")
