"""Property-based tests (hypothesis) of the validators that take text from
outside: certificate names, cluster identities, host:port endpoints, challenge
paths and CSR subject fields. Each property holds for every input; each test
is bounded (examples and a per-example deadline) so the file runs in seconds.
No example database is written (``database=None``): a failure prints the
input and the ``@reproduce_failure`` blob."""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata

import pytest
from clusteracme.coordinator import imports, names
from clusteracme.coordinator.errors import InvalidNames
from clusteracme.peer_agent import tokens
from clusteracme.peer_agent.challenge_server import CHALLENGE_PREFIX, MAX_RAW_PATH, challenge_token
from clusteracme.peer_agent.errors import AgentError, InvalidToken
from clusteracme.peer_agent.front import host_without_port
from clusteracme.peer_agent.keys import SUBJECT_ATTRIBUTES, validate_subject
from cryptography import x509
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from clusteracme import netaddr
from clusteracme.errors import InvalidArgument
from clusteracme.pki import Identity, Role
from clusteracme.safetext import terminal_safe

# Derandomized: the same examples on every run, so a test run never fails
# on a new random counterexample unrelated to the change under test (run
# with --hypothesis-seed=random to explore); no deadline on a shared CI box.
BOUNDED = settings(max_examples=100, deadline=None, database=None, print_blob=True, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow])

# Text from anywhere: every code point but surrogates (which cannot arrive as UTF-8),
# and text biased to the characters validators trip on.
TRICKY = st.sampled_from(["\n", "\r", "\t", " ", "\x00", "\x1b", "\x7f", "\x85", "\xa0", "\u2028", "\u202e",
                          "\ufeff", ".", ":", "-", "_", "/", "%", "[", "]", "*", "@", "xn--", "A", "0"])
ANY_TEXT = st.one_of(st.text(max_size=40), st.lists(st.one_of(TRICKY, st.text(max_size=4)), max_size=12).map("".join))
CONTROL = st.sampled_from(["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\x9b", "\t"])

# --- names (coordinator/names.py) ------------------------------------------------------------

# Built from alphabets rather than st.from_regex: as general, and several times faster.
ALNUM = string.ascii_lowercase + string.digits


def _ldh(first: str, size: int) -> st.SearchStrategy[str]:
    """A label: ``first``-alphabet start, letters, digits and hyphens, no hyphen at the end,
    none in positions 3-4 (reserved for IDNA)."""
    return st.one_of(st.sampled_from(first), st.builds(lambda a, mid, z: a + mid + z, st.sampled_from(first),
                                                       st.text(ALNUM + "-", max_size=size), st.sampled_from(ALNUM))
                     ).filter(lambda s: s[2:4] != "--")


LABEL, TLD = _ldh(ALNUM, 12), _ldh(string.ascii_lowercase, 6)
DNS_NAME = st.builds(lambda labels, tld: ".".join([*labels, tld]), st.lists(LABEL, min_size=1, max_size=3), TLD)
HOST_NAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@BOUNDED
@given(DNS_NAME, st.sampled_from([str.lower, str.upper, str.title]), st.booleans())
def test_a_host_name_normalises_to_itself_lowercase(name: str, case: object, final_dot: bool) -> None:
    given_as = case(name) + ("." if final_dot else "")  # type: ignore[operator]
    assert names.normalize_names(given_as, []) == [name]


@BOUNDED
@given(DNS_NAME, CONTROL, st.integers(min_value=0, max_value=60))
def test_a_name_with_a_control_character_anywhere_is_refused(name: str, control: str, at: int) -> None:
    at = min(at, len(name))
    with pytest.raises(InvalidNames, match="whitespace or a control character"):
        names.normalize_names(name[:at] + control + name[at:], [])


@BOUNDED
@given(ANY_TEXT)
def test_any_text_is_refused_or_becomes_one_canonical_a_label_name(raw: str) -> None:
    try:
        result = names.normalize_names(raw, [])
    except InvalidNames as exc:
        assert exc.problems  # a reason for the operator, never an empty refusal
        return
    (name,) = result
    assert name.isascii() and HOST_NAME.fullmatch(name), name
    assert not name.rsplit(".", 1)[1].isdigit()
    assert all(len(label) <= 63 for label in name.split("."))
    assert names.normalize_names(name, []) == [name]  # canonical: a second pass changes nothing
    assert not any(unicodedata.category(ch) == "Cc" or ch.isspace() for ch in raw)


@BOUNDED
@given(DNS_NAME, st.lists(DNS_NAME, max_size=4))
def test_sans_keep_the_common_name_first_without_duplicates(cn: str, sans: list[str]) -> None:
    out = names.normalize_names(cn, [*sans, cn.upper()])
    assert out[0] == cn and len(out) == len(set(out)) and set(out) == {cn, *sans}


# --- identities (clusteracme/pki.py Identity.parse) -------------------------------------------

IDENTITY_NAME = st.builds(lambda a, rest: a + rest, st.sampled_from(string.ascii_letters + string.digits),
                          st.text(string.ascii_letters + string.digits + "._-", max_size=62))
ROLE = st.sampled_from(list(Role))


@BOUNDED
@given(ROLE, IDENTITY_NAME)
def test_identities_round_trip_through_their_common_name(role: Role, name: str) -> None:
    identity = Identity.parse(f"{role.value}:{name}")
    assert identity == Identity(role, name)
    assert Identity.parse(identity.common_name) == identity


@BOUNDED
@given(ANY_TEXT)
def test_any_text_is_refused_or_is_exactly_role_colon_name(text: str) -> None:
    try:
        identity = Identity.parse(text)
    except InvalidArgument:
        return
    assert identity.common_name == text
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", identity.name)
    assert text.isascii() and text.isprintable()


@BOUNDED
@given(ROLE, IDENTITY_NAME, CONTROL, st.booleans())
def test_an_identity_with_a_control_character_is_refused(role: Role, name: str, control: str, end: bool) -> None:
    text = f"{role.value}:{name}{control}" if end else f"{role.value}:{control}{name}"
    with pytest.raises(InvalidArgument, match="not a clusteracme identity"):
        Identity.parse(text)


@BOUNDED
@given(ROLE, IDENTITY_NAME, ROLE, IDENTITY_NAME)
def test_agents_and_operators_have_server_names_of_their_own(r1: Role, n1: str, r2: Role, n2: str) -> None:
    """Clients recognise a server by its server name: two identities that are
    not the same (beyond letter case) never share one, except the coordinators,
    which all answer for coordinator.clusteracme."""
    a, b = Identity(r1, n1), Identity(r2, n2)
    assume(Role.COORDINATOR not in (r1, r2))
    same_name = a.server_name.lower() == b.server_name.lower()
    assert same_name == ((r1, n1.lower()) == (r2, n2.lower()))


# --- host:port (clusteracme/netaddr.py) -------------------------------------------------------

PORT = st.integers(min_value=1, max_value=65535)
HOST = st.one_of(
    DNS_NAME, LABEL,
    st.ip_addresses(v=4).filter(lambda ip: not ip.is_unspecified).map(str),
)
V6 = st.ip_addresses(v=6).filter(lambda ip: not ip.is_unspecified).map(str)


@BOUNDED
@given(HOST, PORT)
def test_host_port_round_trips(host: str, port: int) -> None:
    assert netaddr.split_hostport(f"{host}:{port}", "x") == (host, port)
    assert netaddr.split_bind(f"{host}:{port}", "x") == (host, port)


@BOUNDED
@given(V6, PORT)
def test_bracketed_ipv6_round_trips_and_bare_ipv6_is_refused(host: str, port: int) -> None:
    assert netaddr.split_hostport(f"[{host}]:{port}", "x") == (host, port)
    with pytest.raises(InvalidArgument):
        netaddr.split_hostport(f"{host}:{port}", "x")


@BOUNDED
@given(ANY_TEXT, st.sampled_from(["", ":", ":80", ":443"]))
def test_any_endpoint_is_refused_or_parses_to_a_clean_host_and_a_port(text: str, tail: str) -> None:
    value = text + tail
    try:
        host, port = netaddr.split_bind(value, "x")
    except InvalidArgument:
        return
    assert 0 < port < 65536
    assert host and host.isascii() and host.isprintable() and " " not in host
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert netaddr.split_bind(shown, "x") == (host, port)
    ipaddress_or_name = host.split("%")[0]
    assert ":" in ipaddress_or_name or re.fullmatch(r"[A-Za-z0-9.-]+", ipaddress_or_name)
    for bad in ("\n", "\r\n", " ", "\x00"):
        with pytest.raises(InvalidArgument):
            netaddr.split_bind(value + bad, "x")


@BOUNDED
@given(st.sampled_from(["0.0.0.0", "[::]", "[::0]", "[0:0::0]"]), PORT)
def test_reachable_endpoints_refuse_wildcards(host: str, port: int) -> None:
    with pytest.raises(InvalidArgument, match="wildcard"):
        netaddr.split_hostport(f"{host}:{port}", "x")
    assert netaddr.split_bind(f"{host}:{port}", "x")[1] == port


@BOUNDED
@given(ANY_TEXT)
def test_ip_checks_refuse_or_normalise(text: str) -> None:
    try:
        ip = netaddr.check_ip(text, "x")
    except InvalidArgument:
        return
    assert netaddr.check_ip(ip, "x") == ip == str(ipaddress.ip_address(text))


# --- challenge paths (peer_agent challenge server and token store) ----------------------------

TOKEN = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=128)


@BOUNDED
@given(TOKEN)
def test_a_challenge_path_names_its_token(token: str) -> None:
    assert challenge_token(CHALLENGE_PREFIX + token) == token
    assert tokens.validate_token(token) == token
    thumbprint = token[::-1]
    assert tokens.validate_key_authorization(token, f"{token}.{thumbprint}") == f"{token}.{thumbprint}"


@BOUNDED
@given(TOKEN, st.sampled_from(["\n", "\r\n", "/", "/..", "%00", "%2F", ".", " ", "\x00", "#", ";x", "//"]))
def test_a_challenge_path_with_anything_after_the_token_is_not_one(token: str, suffix: str) -> None:
    assert challenge_token(CHALLENGE_PREFIX + token + suffix) is None
    with pytest.raises(InvalidToken):
        tokens.validate_token(token + suffix)


@BOUNDED
@given(st.sampled_from(["/.well-known/acme-challenge", "//.well-known/acme-challenge/", "/.well-known/ACME-challenge/",
                        "/.well-known/acme-challenge%2F", "/.well-known/./acme-challenge/",
                        "/x/../.well-known/acme-challenge/", "/.well-known/acme-challenge/../acme-challenge/",
                        ".well-known/acme-challenge/", "/%2Ewell-known/acme-challenge/"]), TOKEN)
def test_only_the_exact_prefix_is_a_challenge_path(prefix: str, token: str) -> None:
    assert challenge_token(prefix + token) is None


@BOUNDED
@given(ANY_TEXT)
def test_any_path_is_no_challenge_or_exactly_prefix_and_token(text: str) -> None:
    for path in (text, CHALLENGE_PREFIX + text):
        token = challenge_token(path)
        if token is not None:
            assert path == CHALLENGE_PREFIX + token and len(path.encode()) <= MAX_RAW_PATH
            assert tokens.validate_token(token) == token


@BOUNDED
@given(ANY_TEXT)
def test_any_host_header_is_refused_or_gives_a_clean_host(text: str) -> None:
    host = host_without_port(text)
    if host is not None:
        assert host and host.isascii() and host.isprintable() and " " not in host
        assert text.startswith(host)


# --- CSR subject fields (coordinator/imports.py, and the agent's check) -----------------------

SUBJECT_KEYS = [f.key for f in imports.SUBJECT_FIELDS]
FIELD_TEXT = st.one_of(
    st.text(max_size=70),
    st.text(alphabet=string.ascii_letters + " -.,'&", min_size=1, max_size=70),
    st.sampled_from(["FR", "fr", "DE", "GB", "UK", "us", "ZZ", " jp ", "F", "FRA"]),
    st.lists(st.one_of(TRICKY, st.text(max_size=3)), max_size=10).map("".join),
)
SUBJECT = st.dictionaries(st.sampled_from(SUBJECT_KEYS), FIELD_TEXT, max_size=5)
REFUSED = ("Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn")
BOUNDS = {f.key: f.max_chars for f in imports.SUBJECT_FIELDS}


@settings(BOUNDED, max_examples=200)
@given(SUBJECT)
def test_a_subject_is_refused_or_clean_and_the_agent_takes_it_as_is(given_subject: dict[str, str]) -> None:
    try:
        subject = imports.check_csr_subject(given_subject)
    except InvalidArgument as exc:
        assert str(exc)  # a specific reason
        return
    for key, value in subject.items():
        assert value == value.strip() and value
        assert not any(unicodedata.category(ch) in REFUSED for ch in value)
        assert len(value) <= BOUNDS[key]
        assert unicodedata.is_normalized("NFC", value)
    if "country" in subject:
        assert subject["country"] in imports.ISO_3166_ALPHA2
    # What the coordinator accepts, the agent accepts unchanged (no refusal after the order was planned) ...
    assert validate_subject(subject) == subject
    # ... a second check changes nothing, and it builds an X.509 name.
    assert imports.check_csr_subject(subject) == subject
    oids = {name: oid for name, oid, _, _ in SUBJECT_ATTRIBUTES}
    x509.Name([x509.NameAttribute(oids[key], value) for key, value in subject.items()])


@BOUNDED
@given(st.sampled_from(SUBJECT_KEYS), st.text(alphabet=string.ascii_letters, min_size=1, max_size=20), CONTROL)
def test_a_subject_field_with_a_control_character_is_refused_by_both(key: str, text: str, control: str) -> None:
    value = text + control + text
    with pytest.raises(InvalidArgument):
        imports.check_csr_subject({key: value})
    with pytest.raises(AgentError):
        validate_subject({key: value})


# --- the terminal sanitiser -------------------------------------------------------------------

@BOUNDED
@given(st.text(max_size=80), st.booleans())
def test_terminal_safe_output_never_holds_a_control_character(text: str, multiline: bool) -> None:
    shown = terminal_safe(text, multiline=multiline)
    assert not any(unicodedata.category(ch) in REFUSED and not (multiline and ch == "\n") for ch in shown)
    assert terminal_safe(shown, multiline=multiline) == shown  # escaping twice changes nothing more
    if text.isprintable():
        assert shown == text
    if multiline:
        assert shown.count("\n") == text.replace("\r\n", "\n").count("\n")
