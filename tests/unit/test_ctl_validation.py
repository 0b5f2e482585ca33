"""Every acmectl argument is checked before any call (issue 13, point 8).

The subcommands and their options are found by walking the parser, so a
command added later is covered without touching this file: every option or
positional that has a type or choices gets out-of-range and malformed values
(hypothesis, derandomized), and each must end with exit status 2, one line on
stderr starting ``acmectl:`` that names the argument, no traceback, and no
call at all: acmectl points at a fake coordinator on loopback that counts
every call it receives (and answers, so a line that got through would call).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clusteracme.ctl import main as ctl_main
from clusteracme.ctl import validate
from tests.unit import ctlfake

BOUNDED = settings(max_examples=30, deadline=None, database=None, print_blob=True, derandomize=True)

NAME_CHARS = string.ascii_letters + string.digits + "._-"
BLANKS_AND_CONTROLS = [" ", "\t", "\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u202e", "\u00a0"]


# --- the parser, walked ----------------------------------------------------------------------------------------------
def _is_group(p: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in p._actions)


def leaves() -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return [(words, p) for words, p, _ in ctl_main.subcommands(ctl_main.parser()) if not _is_group(p)]


def checked(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments of a leaf that have a type or a closed set of values."""
    return [a for a in p._actions if a.help != argparse.SUPPRESS and (a.type is not None or a.choices)
            and not isinstance(a, argparse._HelpAction | argparse._VersionAction)]


def name(action: argparse.Action) -> str:
    """How the error names the argument: the option's flags (argparse joins them with '/'), or its metavar."""
    return "/".join(action.option_strings) if action.option_strings else str(action.metavar)


CASES = [pytest.param(words, action.dest, id=" ".join([*words, name(action)]))
         for words, p in leaves() for action in checked(p)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("files")
    (d / "small.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")
    (d / "dir").mkdir()
    os.mkfifo(d / "fifo")
    return {"small": d / "small.pem", "dir": d / "dir", "fifo": d / "fifo", "missing": d / "missing.pem", "root": d}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ctlfake.Running]:
    """The fake coordinator, and this process's ACMECTL_* pointing at it, for the whole module."""
    with ctlfake.running(ctlfake.make_pki(tmp_path_factory.mktemp("pki"))) as running, ctlfake.environ(running.env):
        yield running


@pytest.fixture(scope="module")
def cached_parser() -> Iterator[None]:
    """One parser for the module (building one per example would dominate the run time); the
    environment it reads its defaults from is fixed for the module by ``fake``."""
    built = ctl_main.parser()
    saved = ctl_main.parser
    ctl_main.parser = lambda: built  # type: ignore[assignment]
    try:
        yield
    finally:
        ctl_main.parser = saved  # type: ignore[assignment]


def _action(words: tuple[str, ...], dest: str) -> tuple[argparse.ArgumentParser, argparse.Action]:
    (p,) = [p for w, p in leaves() if w == words]
    (action,) = [a for a in checked(p) if a.dest == dest]
    return p, action


def valid(action: argparse.Action, files: dict[str, Path]) -> str:
    """A value the argument takes."""
    kind = action.type
    if isinstance(kind, validate.PeerList):
        return "edge-1,edge-2"
    if isinstance(kind, validate.PeerId):
        return "edge-1"
    if isinstance(kind, validate.Domain):
        return "www.example.com"
    if isinstance(kind, validate.Integer):
        return str(kind.low)
    if isinstance(kind, validate.Seconds):
        return "5"
    if isinstance(kind, validate.Sha256):
        return "ab" * 32
    if isinstance(kind, validate.Word):
        return "0123456789abcdef"
    if isinstance(kind, validate.Choice):
        return kind.choices[0]
    if isinstance(kind, validate.ReadableFile):
        return str(files["small"])
    if isinstance(kind, validate.LocalPath):
        return str(files["root"] / "new")
    if isinstance(kind, validate.ClusterName):
        return "prod cluster"
    if isinstance(kind, validate.Hostname):
        return "node-1.example.com"
    if action.choices:
        return str(list(action.choices)[0])
    return "x"


def line(words: tuple[str, ...], p: argparse.ArgumentParser, files: dict[str, Path],
         bad: tuple[argparse.Action, str] | None = None) -> list[str]:
    """A command line for the leaf: its required arguments with valid values; ``bad``: one argument given this value
    instead (an option as --opt=VALUE, so a value that starts with '-' is still its value)."""
    argv = list(words)
    # One of each required group of alternatives (rollout --peers or --all): its first, unless the bad one is in it.
    chosen = [g._group_actions[0] for g in p._mutually_exclusive_groups
              if g.required and (bad is None or bad[0] not in g._group_actions)]
    for a in p._actions:
        if not a.option_strings or isinstance(a, argparse._HelpAction):
            continue
        if bad is not None and a is bad[0]:
            argv.append(f"{a.option_strings[-1]}={bad[1]}")
        elif a.required or a in chosen:
            argv += [a.option_strings[-1]] + ([] if a.nargs == 0 else [valid(a, files)])
    for a in p._actions:
        if a.option_strings:
            continue
        if bad is not None and a is bad[0]:
            argv.append(bad[1])
        elif a.nargs != "?":
            argv.append(valid(a, files))
    return argv


@contextlib.contextmanager
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def run(argv: list[str]) -> tuple[int | str | None, str, str]:
    with captured() as (out, err):
        try:
            ctl_main.main(argv)
        except SystemExit as exc:
            return exc.code, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def assert_refused(argv: list[str], fake: ctlfake.Running, names: str | None = None) -> None:
    before = sum(fake.calls.values())
    code, out, err = run(argv)
    assert code == 2, (argv, code, out, err)
    assert err.startswith("acmectl: ") and err.count("\n") == 1 and err.endswith("\n"), (argv, err)
    assert "Traceback" not in err and out == "", (argv, out, err)
    if names is not None:
        assert names in err, (argv, err)
    assert sum(fake.calls.values()) == before, (argv, fake.calls)


# --- bad values, by the argument's type ------------------------------------------------------------------------------
def _with_one(bad_chars: list[str], alphabet: str = NAME_CHARS) -> st.SearchStrategy[str]:
    part = st.text(alphabet=alphabet, max_size=8)
    return st.tuples(part, st.sampled_from(bad_chars), part).map("".join)


def bad_values(action: argparse.Action, files: dict[str, Path]) -> st.SearchStrategy[str]:
    kind = action.type
    if isinstance(kind, validate.Integer):
        return st.one_of(st.integers(max_value=kind.low - 1).map(str), st.integers(min_value=kind.high + 1).map(str),
                         st.sampled_from(["", "1.5", "0x10", "1_0", " 1", "1 ", "1e3", "one", "\u0663", "+", "--1",
                                          "9" * 400]))
    if isinstance(kind, validate.Seconds):
        return st.one_of(st.floats(max_value=0.0).map(repr), st.floats(min_value=kind.high, exclude_min=True).map(repr),
                         st.sampled_from(["", "nan", "inf", "-inf", "NaN", "1e999", "5s", "1,5", "0x10", "1_0", " 5",
                                          "0", "-0", "\u0663"]))
    if isinstance(kind, validate.PeerList):
        return st.one_of(st.sampled_from(["", ",", "edge-1,", ",edge-1", "edge-1,,edge-2", "edge-1,edge-1",
                                          "edge-1,edge-2,edge-1"]),
                         bad_values(argparse.Action([], "p", type=validate.PeerId()), files).map("edge-1,{}".format))
    if isinstance(kind, validate.PeerId):
        return st.one_of(
            st.just(""),
            _with_one([*BLANKS_AND_CONTROLS, "/", ":", "@", "*", ",", "\u00e9", "\u0131"]),
            st.tuples(st.sampled_from(["_", ".", "-"]), st.text(NAME_CHARS, max_size=8)).map("".join),
            st.tuples(st.sampled_from("aZ9"), st.text(NAME_CHARS, min_size=63, max_size=80)).map("".join),
        ).filter(lambda v: v not in kind.extra)
    if isinstance(kind, validate.Domain):
        return st.one_of(st.just(""), _with_one([*BLANKS_AND_CONTROLS, "/"], string.ascii_lowercase + "."),
                         st.text("abc.", min_size=254, max_size=300))
    if isinstance(kind, validate.Word):
        return st.one_of(st.just(""), _with_one([*BLANKS_AND_CONTROLS, "/"]),
                         st.text(NAME_CHARS, min_size=kind.high + 1, max_size=kind.high + 20))
    if isinstance(kind, validate.Sha256):
        return st.one_of(st.text("0123456789abcdef", max_size=63), st.text("0123456789abcdef", min_size=65,
                                                                          max_size=80),
                         st.text("0123456789abcdef", min_size=63, max_size=63).map("{}g".format))
    if isinstance(kind, validate.ReadableFile):
        return st.sampled_from(["", str(files["dir"]), str(files["missing"]), str(files["fifo"]), "/dev/zero",
                                str(files["root"] / f"big-{kind.limit}")])
    if isinstance(kind, validate.LocalPath):
        return st.sampled_from(["", "a\x00b"])
    if isinstance(kind, validate.ClusterName):
        return st.one_of(st.just(""), _with_one(BLANKS_AND_CONTROLS[1:]),
                         st.text(NAME_CHARS, min_size=kind.high + 1, max_size=300))
    if isinstance(kind, validate.Hostname):
        label = st.text(string.ascii_lowercase, min_size=1, max_size=8)
        return st.one_of(
            st.sampled_from(["", ".", "a..b", "-a.com", "a-.com", "a.*.com", "**.com", "a_b.com", "\u00e9.com",
                             "xn--\u00e9.com", "a.com..", "a b.com"]),
            _with_one([*BLANKS_AND_CONTROLS, "/", "@", ":", "\u00e9", "\u0131"], string.ascii_lowercase + "."),
            st.text(string.ascii_lowercase, min_size=64, max_size=300).map("{}.com".format),  # a label over 63
            st.lists(label, min_size=32, max_size=60).map(".".join).filter(lambda v: len(v) > 253))
    if isinstance(kind, validate.Choice) or (kind is None and action.choices):
        choices = kind.choices if isinstance(kind, validate.Choice) else action.choices
        return st.text(max_size=12).filter(lambda v: v not in choices)
    pytest.fail(f"{name(action)} has type {kind!r}: take a type from clusteracme.ctl.validate (it knows its range, "
                "and this test knows how to refuse it)")


@pytest.mark.parametrize(("words", "dest"), CASES)
def test_every_checked_argument_refuses_bad_values_before_any_call(
        words: tuple[str, ...], dest: str, fake: ctlfake.Running, files: dict[str, Path], cached_parser: None) -> None:
    p, action = _action(words, dest)
    if isinstance(action.type, validate.ReadableFile):
        big = files["root"] / f"big-{action.type.limit}"
        with open(big, "wb") as f:
            f.truncate(action.type.limit + 1)  # sparse: one byte over the cap

    @BOUNDED
    @given(bad_values(action, files))
    def refused(value: str) -> None:
        positional = not action.option_strings
        # A positional that starts with '-' is taken as an option by argparse (refused all the same, but not by
        # the type this test is about).
        assume(not (positional and value.startswith("-")))
        assert_refused(line(words, p, files, (action, value)), fake, names=name(action))

    refused()


@pytest.mark.parametrize("words", [pytest.param(w, id=" ".join(w)) for w, _ in leaves()])
def test_every_leaf_takes_its_valid_line(words: tuple[str, ...], files: dict[str, Path]) -> None:
    """The control of the test above: the same lines with valid values parse (so a refusal there is the bad
    value's), and every global option is taken after the command."""
    (p,) = [p for w, p in leaves() if w == words]
    argv = line(words, p, files)
    args = ctl_main.parser().parse_args(argv)
    assert args.cmd == words[0]
    args = ctl_main.parser().parse_args([*argv, "--timeout", "7", "--json", "--no-headers", "-o", "wide"])
    assert (args.timeout, args.output, args.no_headers) == (7.0, "wide", True)


def test_a_valid_line_does_call(fake: ctlfake.Running, cached_parser: None) -> None:
    """The fake counts calls: a line that gets through reaches it."""
    before = fake.calls["ListPeers"]
    code, out, err = run(["peer", "list"])
    assert (code, err) == (0, "") and "edge-1" in out
    assert fake.calls["ListPeers"] == before + 1


@pytest.mark.parametrize(("given_", "said"), [
    (["--coordinator", "127.0.0.1:7443,,127.0.0.1:7444"], "has an empty item"),
    (["--coordinator", "0.0.0.0:7443"], "wildcard"),
    (["--coordinator", "host-without-port"], "is not host:port"),
    (["--coordinator", "127.0.0.1:99999"], "has no valid port"),
    (["--coordinator", "::1:7443"], "[address]:port"),
    (["--ca", "/nonexistent/ca.pem"], "cannot read the --ca file /nonexistent/ca.pem"),
    (["--cert", "/dev/zero"], "the --cert file /dev/zero is not a regular file"),
    (["--key", "/"], "the --key file / is not a regular file"),
    (["--ca", ""], "missing --ca"),
])
def test_connection_settings_are_checked_before_any_call(given_: list[str], said: str, fake: ctlfake.Running,
                                                         cached_parser: None) -> None:
    for argv in (["peer", "list", *given_], [*given_, "status"], ["domain", "list", "edge-1", *given_]):
        assert_refused(argv, fake, names=said)


@BOUNDED
@given(option=st.sampled_from(["--timeout", "--output", "-o"]), value=st.text(max_size=10))
def test_global_options_before_the_command_are_checked_too(option: str, value: str, fake: ctlfake.Running,
                                                           cached_parser: None) -> None:
    if option == "--timeout":
        try:
            validate.Seconds(ctl_main.DAY)(value)
        except argparse.ArgumentTypeError:
            pass
        else:
            assume(False)  # a valid timeout
    else:
        assume(value not in ("table", "wide", "json", "yaml"))
    assert_refused([f"{option}={value}", "peer", "list"], fake)


def test_refusals_name_the_rule(fake: ctlfake.Running, cached_parser: None) -> None:
    """The sentences an operator reads for the cases issue 13 found."""
    for argv, said in ((["events", "edge-1", "--limit", "-5"], "acmectl: events --limit: '-5' is out of range: 0 "
                                                                "(all) to 100000\n"),
                       (["rollout", "--all", "--batch", "0"], "acmectl: rollout --batch: '0' is out of range: 1 to "
                                                              "10000\n"),
                       (["status", "--timeout", "nan"], "acmectl: status --timeout: 'nan' is not a number of "
                                                        "seconds\n"),
                       (["peer", "list", "--timeout", "0"], "acmectl: peer list --timeout: '0' is out of range: more "
                                                            "than 0, at most 86400 seconds\n"),
                       (["peer"], "acmectl: peer: the following arguments are required: COMMAND\n"),
                       (["peer", "list", "--bogus"], "acmectl: unrecognized arguments: --bogus\n")):
        code, out, err = run(argv)
        assert (code, out, err) == (2, "", said)
    assert sum(fake.calls.values()) == fake.calls["ListPeers"]  # only test_a_valid_line_does_call's


def test_types_in_isolation() -> None:
    assert validate.PeerId(extra=[validate.UNATTACHED])("_unattached") == "_unattached"
    with pytest.raises(argparse.ArgumentTypeError):
        validate.PeerId()("_unattached")
    assert validate.Sha256()("AB:" * 31 + "AB") == "ab" * 32
    assert validate.Domain(server=True)("server") == "server"
    assert validate.Integer(0, 10)("+7") == 7
    assert validate.Seconds(60)("1e1") == 10.0
    from clusteracme.coordinator import revocation
    assert validate.UNATTACHED == revocation.UNATTACHED


def test_cases_were_found() -> None:
    """The walk sees the commands (a broken walk would pass every test above vacuously)."""
    ids = {case.id for case in CASES}
    for expected in ("events --limit", "rollout --batch", "rollout --peers", "status --timeout", "peer list -o/--output",
                     "pending import FILE", "domain enable DOMAIN", "trust remove SHA256", "csr create --key-type"):
        assert expected in ids, sorted(ids)


# --- review of issue 13: input that reached a call, or a traceback --------------------------------------------------
def test_an_argument_that_is_not_utf8_is_refused_first(fake: ctlfake.Running, cached_parser: None) -> None:
    """sys.argv holds undecodable bytes as surrogate escapes (PEP 383): $'\\xff' arrives as '\\udcff'."""
    assert_refused(["peer", "block", "edge-1", "--reason", "\udcff"], fake,
                   names="acmectl: an argument is not valid UTF-8: b'\\xff'; give every argument as UTF-8 text\n")
    assert_refused(["--coordinator", "127.0.0.1:9", "peer", "block", "p1", "--reason", "caf\udcc3"], fake)
    assert_refused(["pki", "init", "ca-\udcff"], fake, names="not valid UTF-8")  # even a local command
    assert_refused(["--bogus\udcff", "status"], fake, names="not valid UTF-8")  # before anything else


@pytest.mark.parametrize(("argv", "said"), [
    (["rollout"], "acmectl: rollout: one of the arguments --peers --all is required\n"),
    (["rollout", "--batch", "2"], "acmectl: rollout: one of the arguments --peers --all is required\n"),
    (["rollout", "--all", "--peers", "edge-1"], "acmectl: rollout --peers: not allowed with argument --all\n"),
    (["rollout", "--peers", "edge-1", "--all"], "acmectl: rollout --all: not allowed with argument --peers\n"),
    (["rollout", "--peers", "edge-1,edge-1"], "acmectl: rollout --peers: 'edge-1,edge-1' names edge-1 more than "
                                              "once; give each peer id once\n"),
    (["backup", ""], "acmectl: backup FILE: the backup file path is empty\n"),
])
def test_rollout_and_backup_lines_refused_before_the_call(argv: list[str], said: str, fake: ctlfake.Running,
                                                          cached_parser: None) -> None:
    assert_refused(argv, fake)
    assert run(argv)[2] == said


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path_factory.mktemp("tls")
    (d / "garbage.pem").write_text("not PEM at all\n")
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (d / "other.key").write_bytes(other)
    return {"garbage": d / "garbage.pem", "other": d / "other.key"}


def test_tls_files_are_parsed_before_any_call(fake: ctlfake.Running, tls_files: dict[str, Path],
                                              files: dict[str, Path], cached_parser: None) -> None:
    """Contents, not just readable files: a certificate in --ca and --cert, a key in --key, the key of --cert."""
    garbage, other = str(tls_files["garbage"]), str(tls_files["other"])
    cert, key = fake.env["ACMECTL_CERT"], fake.env["ACMECTL_KEY"]
    for given_, said in ((["--cert", garbage], f"acmectl: the --cert file {garbage} holds no PEM certificate\n"),
                         (["--cert", key], f"acmectl: the --cert file {key} holds no PEM certificate\n"),
                         (["--ca", str(files["small"])], f"acmectl: the --ca file {files['small']} holds no PEM "
                                                         "certificate\n"),
                         (["--key", garbage], f"acmectl: the --key file {garbage} holds no unencrypted PEM private "
                                              "key\n"),
                         (["--key", cert], f"acmectl: the --key file {cert} holds no unencrypted PEM private key\n"),
                         (["--key", other], f"acmectl: the --key file {other} is not the key of the --cert file "
                                            f"{cert}'s certificate\n")):
        assert_refused(["peer", "list", *given_], fake)
        assert run(["status", *given_])[2] == said
