"""clusteracme.procstat against this very process and a child that has gone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clusteracme import procstat
from clusteracme.errors import NotFound


def test_rss_of_this_process_tracks_what_it_touches() -> None:
    before = procstat.rss_bytes(os.getpid())
    block = bytearray(64 * 2**20)  # zero-filled: every page is written
    try:
        after = procstat.rss_bytes(os.getpid())
        assert after - before >= 60 * 2**20
        assert procstat.peak_rss_bytes(os.getpid()) >= after
    finally:
        del block


def test_fields_are_those_of_proc_status() -> None:
    fields = procstat.status_fields(os.getpid())
    assert fields["Pid"] == str(os.getpid())
    assert fields["VmRSS"].endswith(" kB")


def test_a_process_that_is_gone_is_not_found() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its /proc entry is gone
    with pytest.raises(NotFound, match=str(child.pid)):
        procstat.rss_bytes(child.pid)
