"""Authorizations the CA already holds as valid are skipped: no tokens pushed,
no validation spent (DESIGN: "skip authorizations that are already valid")."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clusteracme.localcluster.cluster import LocalCluster
from tests.integration.conftest import ctl_json, make_cluster, register_account

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # Pebble reuses valid authorizations only sometimes by default; always here.
    yield from make_cluster(tmp_path_factory, "reuse", peers=2, pebble_env={"PEBBLE_AUTHZREUSE": "100"})


def test_second_order_for_the_same_names_reuses_valid_authorizations(cluster: LocalCluster) -> None:
    register_account(cluster)
    names = ["x.reuse.example", "y.reuse.example"]
    for name in names:
        cluster.set_dns(name, [1, 2])
    cluster.ctl("peer", "enable", "peer1")
    cluster.ctl("csr", "create", "peer1", "--cn", names[0], "--san", names[1])
    first = ctl_json(cluster, "sign", "peer1", "--wait")
    assert first["succeeded"] and len(first["peers"]) == 2
    serial_1 = ctl_json(cluster, "pending", "show", "peer1")["certificate"]["serial_hex"]
    cluster.ctl("pending", "discard", "peer1")

    second = ctl_json(cluster, "sign", "peer1", "--wait")
    assert second["succeeded"], second
    assert {a["status"] for a in second["authorizations"]} == {"valid"}
    assert second["peers"] == [], "tokens were pushed although every authorization was already valid"
    assert ctl_json(cluster, "pending", "show", "peer1")["certificate"]["serial_hex"] != serial_1
