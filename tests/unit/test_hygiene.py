"""Input hygiene (issue 12, item 8): validators match the whole text (a trailing
newline is refused), secret files are written through unique O_EXCL|O_NOFOLLOW
temp files, the EAB MAC key never goes on acmectl's command line, and remote
text reaches the terminal with its control characters escaped."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from clusteracme.coordinator import names, preflight, records
from clusteracme.coordinator.accounts import Accounts
from clusteracme.coordinator.store.keys import Keys
from clusteracme.coordinator.store.memory import MemoryStore
from clusteracme.peer_agent import keys as agent_keys
from clusteracme.peer_agent import tokens
from clusteracme.peer_agent.challenge_server import CHALLENGE_PREFIX, challenge_token
from clusteracme.peer_agent.errors import AgentError
from cryptography import x509

from clusteracme import certinfo, netaddr, pki
from clusteracme.ctl import base as ctl_base
from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import providers as ctl_providers
from clusteracme.errors import AlreadyExists, InvalidArgument, NotFound
from clusteracme.safetext import safe_message, terminal_safe
from clusteracme.v1 import common_pb2
from clusteracme.v1 import coordinator_pb2 as pb
from clusteracme.v1 import coordinator_pb2_grpc as pb_grpc

# --- fullmatch: "valid" passes, "valid\n" is refused, for every validator -------------------

def _refused(check: Callable[[str], object], value: str) -> bool:
    try:
        result = check(value)
    except (InvalidArgument, AgentError, ValueError):
        return True
    return result is None  # the validators that answer None instead of raising


VALIDATORS: dict[str, tuple[Callable[[str], object], str]] = {
    "identity": (pki.Identity.parse, "agent:node-1"),
    "endpoint host": (lambda v: netaddr.split_bind(f"{v}:443", "x"), "node1.example"),
    "endpoint port": (lambda v: netaddr.split_bind(f"node1.example:{v}", "x"), "443"),
    "reachable endpoint": (lambda v: netaddr.split_hostport(v, "x"), "10.0.0.1:7443"),
    "ipv6 zone": (lambda v: netaddr.split_bind(f"[fe80::1%{v}]:443", "x"), "eth0"),
    "nameserver": (preflight._parse_nameserver, "9.9.9.9:53"),
    "agent slot": (agent_keys.slot_dirname, "a.example"),
    "agent slot directory": (lambda v: agent_keys._domain_of(Path("domain-" + v)), "a.example"),
    "challenge token": (tokens.validate_token, "tok_en-1"),
    "challenge path": (lambda v: challenge_token(CHALLENGE_PREFIX + v), "tok_en-1"),
    "certificate name": (lambda v: names.normalize_names(v, []), "a.example"),
    "store key component": (lambda v: Keys("/t/").provider(v), "pebble"),
}


@pytest.mark.parametrize("what", sorted(VALIDATORS))
def test_each_validator_refuses_a_trailing_newline(what: str) -> None:
    check, valid = VALIDATORS[what]
    assert not _refused(check, valid), f"{what}: {valid!r} should pass"
    for bad in (valid + "\n", valid + "\r\n", "\n" + valid, valid + "\x00"):
        assert _refused(check, bad), f"{what}: {bad!r} was accepted"


def test_identity_with_a_newline_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidArgument, match="not a clusteracme identity"):
        pki.Identity.parse("operator:admin\n")


def test_endpoint_ports_are_ascii_digits_only() -> None:
    assert netaddr.split_bind("h.example:080", "x") == ("h.example", 80)
    for port in (" 80", "80 ", "+80", "8_0", "\u0668\u0660", "80\n", "000000080"):
        with pytest.raises(InvalidArgument, match="no valid port"):
            netaddr.split_bind(f"h.example:{port}", "x")


def test_agent_refuses_a_csr_name_with_a_newline_and_writes_nothing(tmp_path: Path) -> None:
    store = agent_keys.KeyStore(tmp_path)
    with pytest.raises(AgentError, match="not a valid A-label DNS name"):
        store.generate_csr("", "a.example\n", [], common_pb2.KEY_TYPE_EC_P256)
    with pytest.raises(AgentError, match="not a valid domain slot name"):
        store.generate_csr("a.example\n", "a.example", [], common_pb2.KEY_TYPE_EC_P256)
    assert not (tmp_path / "slots").exists()


async def test_provider_names_and_contact_addresses_are_matched_whole() -> None:
    store, keys = MemoryStore(), Keys("/t/")
    accounts = Accounts(store, keys, None, acme_timeout=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="not a valid provider name"):
        await accounts.add_provider("ca\n", "http://127.0.0.1:9/dir", "")
    await store.put_if(keys.provider("pebble"), records.encode(
        {"name": "pebble", "directory_url": "https://ca.example/dir", "account_url": "https://ca.example/acct/1"}),
        expect_mod_revision=0)
    assert await accounts.exists("pebble") == "pebble"
    with pytest.raises(NotFound):
        await accounts.exists("pebble\n")
    with pytest.raises(InvalidArgument, match="not a valid contact e-mail"):
        await accounts.register("pebble", "ops@a.example\n", agree_tos=True)
    with pytest.raises(AlreadyExists):  # the address passed; the existing account stops it
        await accounts.register("pebble", "ops@a.example", agree_tos=True)


# --- write_private ---------------------------------------------------------------------------

def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_concurrent_writers_of_one_path_both_complete_and_leave_one_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "slot" / "csr.pem"
    payloads = [bytes([ord("A") + i]) * (2 << 20) for i in range(2)]  # 2 MiB each: writes take a while
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(10):
                barrier.wait()
                pki.write_private(path, data)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(data,)) for data in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    assert path.read_bytes() in payloads  # one writer's data, whole
    assert path.stat().st_mode & 0o777 == 0o600
    assert _temps(path.parent) == []


def test_a_symlink_at_a_temp_name_is_never_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    path = tmp_path / "ca.key"
    for planted in (tmp_path / "ca.key.tmp", tmp_path / ".ca.key.tmp"):  # fixed names: older versions, certs.py
        planted.symlink_to(victim)
    pki.write_private(path, b"secret")
    assert victim.read_bytes() == b"untouched"
    assert path.read_bytes() == b"secret" and not path.is_symlink()
    # The next random name, planted (as if guessed): skipped for another, never followed.
    names_given = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names_given))
    planted = tmp_path / f".ca.key.{'0' * 16}.tmp"
    planted.symlink_to(victim)
    pki.write_private(path, b"secret 2")
    assert victim.read_bytes() == b"untouched"
    assert path.read_bytes() == b"secret 2" and not path.is_symlink()
    assert planted.is_symlink() and os.readlink(planted) == str(victim)  # left alone, not reused


def test_write_private_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        pki.write_private(tmp_path / "k", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


def test_temp_files_a_crash_left_are_dropped_later(tmp_path: Path) -> None:
    stale, fresh = tmp_path / f".k.{'a' * 16}.tmp", tmp_path / f".k.{'b' * 16}.tmp"
    other = tmp_path / f".other.{'c' * 16}.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"left by a crash")
    old = time.time() - pki.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    pki.write_private(tmp_path / "k", b"x")
    assert not stale.exists()
    assert fresh.exists()  # may be a concurrent writer's
    assert other.exists()  # another file's


def test_two_key_stores_writing_one_slot_at_once_stay_consistent(tmp_path: Path) -> None:
    """Two writers of the same slot (the in-process lock does not span them):
    every CSR completes, csr.pem and current name the same key, no temp left."""
    stores = [agent_keys.KeyStore(tmp_path), agent_keys.KeyStore(tmp_path)]
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []
    made: list[str] = []

    def run(store: agent_keys.KeyStore) -> None:
        try:
            for _ in range(6):
                barrier.wait()
                made.append(store.generate_csr("a.example", "a.example", [], common_pb2.KEY_TYPE_EC_P256)[1])
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    slot = tmp_path / "slots" / "domain-a.example"
    current = (slot / "current").read_text()
    csr = x509.load_pem_x509_csr((slot / "csr.pem").read_bytes())
    assert certinfo.spki_sha256(csr.public_key()) == current
    assert sorted(p.stem for p in (slot / "keys").glob("*.key")) == sorted(made)
    assert _temps(slot) == [] and _temps(slot / "keys") == []


# --- the sanitiser ---------------------------------------------------------------------------

HOSTILE = "ok\x1b[2J\x1b]0;owned\x07\rFAKE \x9b31m\u202eevil\x00\nacmectl: forged line"


def _no_controls(text: str, *, newlines: bool) -> bool:
    return not any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and not (newlines and ch == "\n")
                   for ch in text)


def test_terminal_safe_escapes_every_control_and_keeps_newlines_only_when_asked() -> None:
    one = terminal_safe(HOSTILE)
    assert _no_controls(one, newlines=False) and "\n" not in one
    assert one == ("ok\\x1b[2J\\x1b]0;owned\\x07\\rFAKE \\x9b31m\\u202eevil\\x00\\nacmectl: forged line")
    many = terminal_safe("-----BEGIN X-----\r\nAB\x1bCD\n-----END X-----\n", multiline=True)
    assert many == "-----BEGIN X-----\nAB\\x1bCD\n-----END X-----\n"
    assert terminal_safe("Société Générale, 東京 ok") == "Société Générale, 東京 ok"


def test_safe_message_reaches_nested_and_repeated_strings() -> None:
    msg = pb.ListAlarmsResponse(alarms=[pb.Alarm(kind=HOSTILE, detail=HOSTILE, slot=common_pb2.Slot(domain=HOSTILE))])
    clean = safe_message(msg, ctl_base.MULTILINE_FIELDS)
    (alarm,) = clean.alarms
    assert _no_controls(alarm.kind, newlines=False) and _no_controls(alarm.slot.domain, newlines=False)
    assert alarm.detail.count("\n") == 1 and _no_controls(alarm.detail, newlines=True)  # kept: _one_line cuts it
    assert msg.alarms[0].kind == HOSTILE  # the original is untouched
    order = safe_message(pb.OrderInfo(error=HOSTILE, names=[HOSTILE], peers=[pb.PeerAck(peer_id="p", error=HOSTILE)]))
    assert all(_no_controls(t, newlines=False) for t in (order.error, order.names[0], order.peers[0].error))


# --- acmectl against a coordinator that answers hostile text ----------------------------------

class HostileCoordinator(pb_grpc.CoordinatorServiceServicer):
    """A gRPC server (mTLS, the cluster CA) whose answers carry what a CA's
    problem detail or a hook's output could: escape sequences, CR, C1, bidi
    overrides, newlines forging lines. It records RegisterAccount requests."""

    def __init__(self) -> None:
        self.registered: list[pb.RegisterAccountRequest] = []

    async def RegisterAccount(self, request: Any, context: Any) -> Any:
        self.registered.append(request)
        return pb.Provider(name=request.provider, account_url="https://ca.example/acct/1\x1b[8m",
                           account_status="valid")

    async def ListEvents(self, request: Any, context: Any) -> Any:
        return pb.ListEventsResponse(events=[pb.HistoryEvent(at="t", what="deploy", result="failed", who="op",
                                                             detail=HOSTILE)])

    async def Deploy(self, request: Any, context: Any) -> Any:
        return pb.DeployResult(peer_id="p1", ok=False, error=HOSTILE, reloads=[
            common_pb2.ReloadResult(target="command nginx", ok=False, detail=HOSTILE)])

    async def GetOrder(self, request: Any, context: Any) -> Any:
        return pb.OrderInfo(order_id="0123456789abcdef", peer_id="p1", phase="failed", done=True, error=HOSTILE)

    async def Rollout(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield pb.RolloutEvent(peer_id="p1", stage="failed", detail=HOSTILE)
        yield pb.RolloutEvent(stage="stopped")

    async def RemovePeer(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, HOSTILE)

    async def ListAlarms(self, request: Any, context: Any) -> Any:
        return pb.ListAlarmsResponse(alarms=[pb.Alarm(kind="auto-sign-failing", peer_id="p1", severity="warning",
                                                      raised_at="t", detail=HOSTILE)])

    async def GetPending(self, request: Any, context: Any) -> Any:
        return pb.PendingCertificate(peer_id="p1", chain_pem="-----BEGIN CERTIFICATE-----\nAB\x1b[2JCD\n"
                                                             "-----END CERTIFICATE-----\n")


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[tuple[HostileCoordinator, dict[str, str]]]:
    ca_dir, out = tmp_path / "ca", tmp_path / "pki"
    pki.init_ca(ca_dir)
    cert, key = pki.issue(ca_dir, pki.Identity(pki.Role.COORDINATOR, "c1"), out_dir=out, ips=["127.0.0.1"])
    op_cert, op_key = pki.issue(ca_dir, pki.Identity(pki.Role.OPERATOR, "admin"), out_dir=out)
    servicer = HostileCoordinator()
    server = grpc.aio.server()
    pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                        root_certificates=(ca_dir / pki.CA_CERT).read_bytes(),
                                        require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACMECTL_")}
    env.update(ACMECTL_COORDINATOR=f"127.0.0.1:{port}", ACMECTL_CA=str(ca_dir / pki.CA_CERT),
               ACMECTL_CERT=str(op_cert), ACMECTL_KEY=str(op_key))
    try:
        yield servicer, env
    finally:
        await server.stop(None)


async def acmectl(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """The real acmectl, as a process; stdout and stderr exactly as a terminal would get them."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "clusteracme.ctl", "--timeout", "10", *args,
                                                env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _forged(text: str) -> bool:
    return any(line.startswith("acmectl: forged") for line in text.splitlines())


@pytest.mark.parametrize("args", [
    ("events", "p1"), ("deploy", "p1"), ("order", "show", "0123456789abcdef"), ("rollout", "--peers", "p1"),
    ("peer", "remove", "p1"), ("alarms",),
])
async def test_acmectl_prints_remote_text_with_controls_escaped(
        hostile: tuple[HostileCoordinator, dict[str, str]], args: tuple[str, ...]) -> None:
    _, env = hostile
    code, out, err = await acmectl(env, *args)
    assert out or err
    for stream in (out, err):
        assert _no_controls(stream, newlines=True), repr(stream)  # newlines between lines only
        assert not _forged(stream), stream
    assert "\\x1b[2J" in out + err  # shown, inert
    if args[0] in ("deploy", "peer", "rollout"):
        assert code != 0 and err.startswith("acmectl: ") and err.count("\n") == 1  # the error path: one line


async def test_acmectl_keeps_pem_lines_and_escapes_controls_in_them(
        hostile: tuple[HostileCoordinator, dict[str, str]]) -> None:
    _, env = hostile
    code, out, _ = await acmectl(env, "pending", "show", "p1", "--pem")
    assert code == 0 and "-----BEGIN CERTIFICATE-----\nAB\\x1b[2JCD\n-----END CERTIFICATE-----\n" in out
    assert _no_controls(out, newlines=True)
    code, out, _ = await acmectl(env, "--json", "pending", "show", "p1")
    assert code == 0 and "\\u001b[2J" in out and "\x1b" not in out  # JSON escapes by itself


# --- the EAB MAC key: from a file or the environment, never from argv ---------------------------

async def test_eab_key_from_a_file_or_the_environment_reaches_the_coordinator(
        hostile: tuple[HostileCoordinator, dict[str, str]], tmp_path: Path) -> None:
    servicer, env = hostile
    base = ("account", "register", "--provider", "pebble", "--email", "ops@a.example", "--agree-tos",
            "--eab-kid", "kid-1")
    key_file = tmp_path / "eab.key"
    key_file.write_text("  zWNDZM6eQGHWpSRTPal5eIUYFTu7EajV_-\n\n")
    code, out, err = await acmectl(env, *base, "--eab-hmac-key-file", str(key_file))
    assert code == 0, err
    assert "\\x1b[8m" in out and "\x1b" not in out
    code, _, err = await acmectl({**env, ctl_base.EAB_KEY_ENV: "fromEnv_123\n"}, *base)
    assert code == 0, err
    # The file wins over the environment, as every flag does.
    code, _, err = await acmectl({**env, ctl_base.EAB_KEY_ENV: "fromEnv_123"}, *base, "--eab-hmac-key-file", str(key_file))
    assert code == 0, err
    assert [(r.eab_kid, r.eab_hmac_key) for r in servicer.registered] == [
        ("kid-1", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajV_-"), ("kid-1", "fromEnv_123"),
        ("kid-1", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajV_-")]


def _eab_args(**given: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"eab_kid": "kid-1", "eab_hmac_key": None, "eab_hmac_key_file": None, **given})


@contextlib.contextmanager
def _env(value: str | None) -> Iterator[None]:
    old = os.environ.pop(ctl_base.EAB_KEY_ENV, None)
    if value is not None:
        os.environ[ctl_base.EAB_KEY_ENV] = value
    try:
        yield
    finally:
        os.environ.pop(ctl_base.EAB_KEY_ENV, None)
        if old is not None:
            os.environ[ctl_base.EAB_KEY_ENV] = old


@pytest.mark.parametrize(("given", "env", "message"), [
    ({"eab_hmac_key": "secret"}, None, "--eab-hmac-key is not taken: a key on the command line is visible"),
    ({"eab_hmac_key_file": "EMPTY"}, None, "the EAB MAC key file .* is empty"),
    ({"eab_hmac_key_file": "BLANK"}, None, "the EAB MAC key file .* is empty"),
    ({"eab_hmac_key_file": "MISSING"}, None, "cannot read the EAB MAC key file .*: No such file or directory"),
    ({"eab_hmac_key_file": "DIRECTORY"}, None, "cannot read the EAB MAC key file .*: Is a directory"),
    ({"eab_hmac_key_file": "TWO"}, None, "holds more than one word"),
    ({"eab_hmac_key_file": "BINARY"}, None, "is not text"),
    ({"eab_hmac_key_file": "HUGE"}, None, "larger than 4096 bytes"),
    ({}, "  \n", r"\$ACMECTL_EAB_HMAC_KEY is empty"),
    ({}, None, "--eab-kid needs the MAC key: --eab-hmac-key-file FILE or ACMECTL_EAB_HMAC_KEY"),
    ({"eab_kid": ""}, "abc", "needs --eab-kid.*; or unset ACMECTL_EAB_HMAC_KEY"),
    ({"eab_kid": "", "eab_hmac_key_file": "GOOD"}, None, "needs --eab-kid"),
])
def test_eab_key_refusals_are_specific(tmp_path: Path, given: dict[str, str], env: str | None, message: str) -> None:
    files = {"EMPTY": b"", "BLANK": b" \n\t\n", "TWO": b"abc def\n", "BINARY": b"\xff\xfe", "HUGE": b"a" * 5000,
             "GOOD": b"abc\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "DIRECTORY").mkdir()
    if "eab_hmac_key_file" in given:
        given = {**given, "eab_hmac_key_file": str(tmp_path / given["eab_hmac_key_file"])}
    with _env(env), pytest.raises(ctl_base.CtlError, match=message):
        ctl_providers._eab_hmac_key(_eab_args(**given))


def test_a_refused_eab_key_stops_acmectl_before_any_call(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    with _env(None), pytest.raises(SystemExit) as exit_:
        # 127.0.0.1:9 and missing TLS files: any attempt to call would fail differently.
        ctl_main.main(["--coordinator", "127.0.0.1:9", "account", "register", "--provider", "p", "--email",
                  "ops@a.example", "--agree-tos", "--eab-kid", "k", "--eab-hmac-key-file", str(tmp_path / "empty")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"acmectl: the EAB MAC key file {tmp_path / 'empty'} is empty\n"
    with _env(None):
        assert ctl_providers._eab_hmac_key(_eab_args(eab_kid="")) == ""  # no EAB at all: nothing asked
