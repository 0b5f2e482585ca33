"""Trust store presets on a real cluster (issue 9 item 9): `acmectl trust add
--preset letsencrypt` stores ISRG Root X1 and X2, `trust list` shows them as
roots, and every agent's trust_bundle_file gets them (pushed to a live agent,
written on registration by one that was down)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from clusteracme.localcluster.cluster import LocalCluster
from tests.integration.conftest import ctl_json

pytestmark = pytest.mark.integration

ISRG = {
    "CN=ISRG Root X1,O=Internet Security Research Group,C=US":
        ("96bcec06264976f37460779acf28c5a7cfe8a3c0aae11a8ffcee05c0bddf08c6", "2035-06-04"),
    "CN=ISRG Root X2,O=Internet Security Research Group,C=US":
        ("69729b8e15a86efc177a57afb7171dfc64add28c2fca8cf1507e34453ccb1470", "2040-09-17"),
}
SHAS = {sha for sha, _ in ISRG.values()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    run_dir = tmp_path_factory.mktemp("trustpresets")
    settings = {i: {"trust_bundle_file": str(run_dir / f"peer{i}-trust.pem")} for i in (1, 2)}
    with LocalCluster(run_dir, peers=2, agent_settings=settings) as c:
        yield c


def _bundle_shas(path: Path) -> set[str]:
    if not path.exists() or not path.read_text().strip():
        return set()
    return {c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(path.read_bytes())}


def _wait_bundle(path: Path, want: set[str], timeout: float = 60) -> set[str]:
    """The agent writes the bundle right after it registers; wait for that write."""
    deadline = time.monotonic() + timeout
    while (got := _bundle_shas(path)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_letsencrypt_preset(cluster: LocalCluster, tmp_path: Path) -> None:
    assert cluster.infra is not None
    cluster.stop_agent(2)  # down while the preset is added: gets the bundle when it registers again

    added = ctl_json(cluster, "trust", "add", "--preset", "letsencrypt")["certificates"]
    assert {c["subject"]: (c["sha256"], c["type"], c["self_signed"], c["added"]) for c in added} == {
        subject: (sha, "root", True, True) for subject, (sha, _) in ISRG.items()
    }

    # Idempotent: the second add writes nothing and says so.
    again = ctl_json(cluster, "trust", "add", "--preset", "letsencrypt")["certificates"]
    assert sorted(c["sha256"] for c in again) == sorted(SHAS) and not any(c["added"] for c in again)
    text = cluster.ctl("trust", "add", "--preset", "letsencrypt").stdout
    assert text.count("(already trusted)") == 2

    listed = ctl_json(cluster, "trust", "list")["certificates"]
    assert {c["subject"]: (c["sha256"], c["type"], c["issuer"], c["not_after"][:10]) for c in listed} == {
        subject: (sha, "root", subject, expiry) for subject, (sha, expiry) in ISRG.items()
    }
    table = cluster.ctl("trust", "list").stdout.splitlines()
    assert table[0].split() == ["TYPE", "SUBJECT", "ISSUER", "NOT", "AFTER", "SHA256"]
    rows = {row.split()[-1]: row for row in table[1:]}
    assert set(rows) == SHAS and all(row.startswith("root ") for row in rows.values())
    assert "2035-06-04T11:04:38" in rows[ISRG["CN=ISRG Root X1,O=Internet Security Research Group,C=US"][0]]

    # Pushed to the live agent's trust_bundle_file; written by the other one when it registers.
    assert _bundle_shas(cluster.run_dir / "peer1-trust.pem") == SHAS
    cluster.start_agent(2)
    cluster.wait_peers_alive(timeout=60)
    assert _wait_bundle(cluster.run_dir / "peer2-trust.pem", SHAS) == SHAS

    # An intermediate next to the preset is listed as one.
    intermediate = cluster.infra.pebble.fetch_intermediate()
    path = tmp_path / "intermediate.pem"
    path.write_text(intermediate)
    (inter,) = ctl_json(cluster, "trust", "add", str(path))["certificates"]
    assert inter["type"] == "intermediate" and not inter["self_signed"] and inter["issuer"] != inter["subject"]
    types = {c["sha256"]: c["type"] for c in ctl_json(cluster, "trust", "list")["certificates"]}
    assert types == {**dict.fromkeys(SHAS, "root"), inter["sha256"]: "intermediate"}
    assert _bundle_shas(cluster.run_dir / "peer1-trust.pem") == {*SHAS, inter["sha256"]}

    # Refusals change nothing: an unknown preset names the known ones; FILE and --preset together.
    unknown = cluster.ctl("trust", "add", "--preset", "digicert", check=False)
    assert unknown.returncode != 0 and "unknown trust preset 'digicert'" in unknown.stderr
    assert "the presets are: letsencrypt" in unknown.stderr
    both = cluster.ctl("trust", "add", str(path), "--preset", "letsencrypt", check=False)
    assert both.returncode == 2 and "exactly one of FILE and --preset NAME" in both.stderr
    assert len(ctl_json(cluster, "trust", "list")["certificates"]) == 3
