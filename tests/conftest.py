"""Shared test fixtures: a real etcd on loopback, from the product's launcher."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from clusteracme.localcluster.infra import Etcd


def start_etcd(tmp_path: Path, *, extra_args: Sequence[str] = ()) -> Etcd:
    """A one-member etcd on 127.0.0.1 with its data under ``tmp_path``;
    ``stop()`` then ``start()`` restarts the same member with its data."""
    etcd = Etcd(tmp_path, extra_args=extra_args)
    etcd.start()
    return etcd


@pytest.fixture(scope="module")
def etcd_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real etcd for the module; isolate tests with distinct key prefixes."""
    etcd = start_etcd(tmp_path_factory.mktemp("etcd"))
    try:
        yield etcd.endpoint
    finally:
        etcd.stop()
