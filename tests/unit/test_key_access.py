"""``keys.group``: the deployed private keys readable by one group (0640,
directories 0750: Debian's ``ssl-cert`` convention) for services that run
as a user of that group; by default the agent's alone (0600 in 0700).

The reader checks run a real process as ``nobody`` (root only): with the
group it reads ``active/privkey.pem`` and still not the key store; without,
neither."""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusteracme.peer_agent.certs import CertStore
from clusteracme.peer_agent.keys import KeyAccess, KeyStore
from clusteracme.peer_agent.settings import AgentSettings

from clusteracme.config import build
from clusteracme.errors import InvalidArgument
from tests.unit.test_cert_store import CertFactory, issue

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["www.example.com"]
NOBODY = 65534


def _other_group() -> grp.struct_group:
    """A group the test may give files to, other than its own primary group
    when it can (root: any; else a supplementary group), so that the change
    is visible."""
    egid = os.getegid()
    if os.geteuid() == 0:
        candidates = [g for g in grp.getgrall() if g.gr_gid not in (egid, NOBODY)]
    else:
        candidates = [grp.getgrgid(g) for g in os.getgroups() if g != egid]
    return candidates[0] if candidates else grp.getgrgid(egid)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state directory other users can reach (tmp_path's parents are 0700),
    as /var/lib/clusteracme-agent is."""
    base = Path(tempfile.mkdtemp(prefix="clusteracme-keyaccess-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    base.chmod(0o755)
    try:
        state = base / "state"
        state.mkdir(mode=0o700)
        yield state
    finally:
        shutil.rmtree(base)


def deploy(state: Path, access: KeyAccess, factory: CertFactory) -> tuple[KeyStore, CertStore, Path]:
    keys = KeyStore(state, access=access)
    store = CertStore(state, keys)
    chain, _ = issue(keys, factory, "", NAMES)
    store.install("", store.validate("", chain, NAMES))
    return keys, store, state / "slots" / "server"


def can_read_as_nobody(path: Path, gid: int | None) -> bool:
    """Whether ``nobody`` (with ``gid`` as a supplementary group) can read
    ``path``: a real unprivileged process, no capabilities."""
    groups = ["--groups", str(gid)] if gid is not None else ["--clear-groups"]
    result = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *groups, "--inh-caps=-all",
                             "--bounding-set=-all", "cat", str(path)], capture_output=True)
    return result.returncode == 0


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="the reader checks switch to nobody (root and setpriv)")


def test_default_keys_are_the_agents_alone(state_dir: Path) -> None:
    keys, store, slot = deploy(state_dir, KeyAccess(), CertFactory())
    privkey = slot / "active" / "privkey.pem"
    assert mode(state_dir / "slots") == 0o700 and mode(slot) == 0o700 and mode(slot / "keys") == 0o700
    assert mode(privkey.resolve()) == 0o600
    assert all(mode(k) == 0o600 for k in (slot / "keys").glob("*.key"))
    assert mode(state_dir) == 0o700  # left as it was
    assert store.apply_access() == 0  # nothing to change


def test_a_group_gets_the_deployed_key_0640_and_the_slot_directories_0750(state_dir: Path) -> None:
    group = _other_group()
    keys, store, slot = deploy(state_dir, KeyAccess.of_group(group.gr_name), CertFactory())
    privkey = (slot / "active" / "privkey.pem").resolve()
    for directory in (state_dir / "slots", slot):
        assert (mode(directory), directory.stat().st_gid) == (0o750, group.gr_gid), directory
    assert (mode(privkey), privkey.stat().st_gid) == (0o640, group.gr_gid)
    assert mode(privkey.parent / "fullchain.pem") == 0o644
    # The key store stays the agent's: 0700, keys 0600, not the group's.
    assert mode(slot / "keys") == 0o700
    if group.gr_gid != os.getegid():
        assert (slot / "keys").stat().st_gid != group.gr_gid
    assert all(mode(k) == 0o600 for k in (slot / "keys").glob("*.key"))
    # Start-up applies the same: the state directory becomes passable (0711), nothing else changes.
    state_gid = state_dir.stat().st_gid
    assert store.apply_access() == 1 and mode(state_dir) == 0o711
    assert state_dir.stat().st_gid == state_gid  # systemd's StateDirectory: its group left alone
    assert store.apply_access() == 0
    # A second deploy (a new generation) is written with the group from the start.
    chain, _ = issue(keys, CertFactory(), "", NAMES)
    store.install("", store.validate("", chain, NAMES))
    new = (slot / "active" / "privkey.pem").resolve()
    assert new != privkey and (mode(new), new.stat().st_gid) == (0o640, group.gr_gid)


def test_switching_the_option_on_and_off_applies_to_what_is_on_disk(state_dir: Path) -> None:
    group = _other_group()
    _, _, slot = deploy(state_dir, KeyAccess(), CertFactory())
    privkey = (slot / "active" / "privkey.pem").resolve()
    on = CertStore(state_dir, KeyStore(state_dir, access=KeyAccess.of_group(group.gr_name)))
    assert on.apply_access() == 4  # state dir, slots/, slot, privkey.pem
    assert (mode(slot), slot.stat().st_gid, mode(privkey), privkey.stat().st_gid) == \
        (0o750, group.gr_gid, 0o640, group.gr_gid)
    off = CertStore(state_dir, KeyStore(state_dir))
    assert off.apply_access() == 3
    assert (mode(state_dir / "slots"), mode(slot), mode(privkey)) == (0o700, 0o700, 0o600)


@needs_root
def test_a_member_of_the_group_reads_the_live_key_and_nothing_else(state_dir: Path) -> None:
    group = _other_group()
    keys, store, slot = deploy(state_dir, KeyAccess.of_group(group.gr_name), CertFactory())
    store.apply_access()
    privkey = slot / "active" / "privkey.pem"
    key_file = next((slot / "keys").glob("*.key"))
    assert can_read_as_nobody(privkey, group.gr_gid)
    assert not can_read_as_nobody(key_file, group.gr_gid)       # the key store stays the agent's
    assert not can_read_as_nobody(privkey, None)                 # not a member: no
    # Without the option (the default), a member of that group reads nothing.
    off = CertStore(state_dir, KeyStore(state_dir))
    off.apply_access()
    assert not can_read_as_nobody(privkey, group.gr_gid)


def test_an_unknown_group_is_refused_with_its_name() -> None:
    with pytest.raises(InvalidArgument, match=r"keys.group: there is no group named 'no-such-group-h5'"):
        KeyAccess.of_group("no-such-group-h5")
    assert KeyAccess.of_group("") == KeyAccess()


def test_the_setting_parses_from_toml() -> None:
    settings = build(AgentSettings, {"keys": {"group": "ssl-cert"}})
    assert settings.keys.group == "ssl-cert"
    assert build(AgentSettings, {}).keys.group == ""
    with pytest.raises(InvalidArgument, match="unknown setting"):
        build(AgentSettings, {"keys": {"mode": "0640"}})


@needs_root
def test_an_agent_not_in_the_group_is_refused_before_anything_changes(state_dir: Path) -> None:
    """A real process as nobody (no supplementary groups): the group exists,
    but the agent could not give files to it."""
    python = shutil.which(f"python{sys.version_info.major}.{sys.version_info.minor}", path="/usr/bin:/usr/local/bin")
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    if python is None or str(Path(python).resolve()).startswith("/root") or not site.is_dir():
        pytest.skip("needs a system python of this minor version that nobody may run")
    group = _other_group()
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "from clusteracme.peer_agent.keys import KeyAccess\n"
            "KeyAccess.of_group(sys.argv[3])\n")
    result = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                             python, "-c", code, str(ROOT), str(site), group.gr_name],
                            capture_output=True, text=True, cwd="/")
    if "ModuleNotFoundError" in result.stderr or "Permission denied" in result.stderr:
        pytest.skip(f"nobody cannot import the project here: {result.stderr.strip()[-200:]}")
    assert result.returncode != 0
    assert f"is not a member of group {group.gr_name!r}" in result.stderr
    assert f"SupplementaryGroups={group.gr_name}" in result.stderr
