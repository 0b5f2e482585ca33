"""Fixtures shared by the unit tests of the agent's gRPC service."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusteracme import pki

AGENT_HOST = "127.0.0.1"
AGENT_PEER = pki.Identity(pki.Role.AGENT, "peer1")


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cluster CA with peer1's agent pair (for 127.0.0.1) and coordinator c1's pair.
    A module that needs other identities defines its own ``pki_dir``."""
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory)
    pki.issue(directory, AGENT_PEER, out_dir=directory, ips=[AGENT_HOST])
    pki.issue(directory, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=directory)
    return directory
