"""clusteracme.coordinator.names: which names may be ordered and the form they leave in."""

from __future__ import annotations

import pytest
from clusteracme.coordinator.errors import InvalidNames
from clusteracme.coordinator.names import MAX_NAMES, NameProblem, normalize_names

from clusteracme.errors import InvalidArgument


@pytest.mark.parametrize(
    ("common_name", "sans", "expected"),
    [
        ("a.example.com", [], ["a.example.com"]),
        ("a.example.com", ["b.example.com"], ["a.example.com", "b.example.com"]),
        ("WWW.Example.COM", [], ["www.example.com"]),
        ("a.example.com.", [], ["a.example.com"]),
        ("Bücher.example", [], ["xn--bcher-kva.example"]),
        ("xn--bcher-kva.example", ["bücher.example"], ["xn--bcher-kva.example"]),
        ("bücher。example", [], ["xn--bcher-kva.example"]),  # ideographic full stop
        ("a.example.com", ["A.example.com", "a.example.com."], ["a.example.com"]),
        ("b.example.com", ["a.example.com", "b.example.com"], ["b.example.com", "a.example.com"]),
        ("a-b--c.example", [], ["a-b--c.example"]),  # '--' outside positions 3-4
        ("1a.example", [], ["1a.example"]),
        ("example.xn--p1ai", [], ["example.xn--p1ai"]),
        (f"{'a' * 63}.example", [], [f"{'a' * 63}.example"]),
    ],
)
def test_valid_names_are_normalized(
    common_name: str, sans: list[str], expected: list[str]
) -> None:
    assert normalize_names(common_name, sans) == expected


_LONG_NAME = ".".join(["a" * 63] * 4)  # 255 octets


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("*.example.com", "wildcards need DNS-01; HTTP-01 cannot validate them"),
        ("a.*.example.com", "wildcards need DNS-01"),
        ("192.0.2.1", "an IP address"),
        ("2001:db8::1", "an IP address"),
        ("[2001:db8::1]", "an IP address"),
        ("192.0.2.1.", "an IP address"),
        ("1.2.3", "the last label is all digits"),
        ("a.example.com..", "trailing dots"),
        ("a..example", "empty label"),
        (".example.com", "empty label"),
        (".", "empty label"),
        ("localhost", "a single label"),
        ("localhost.", "a single label"),
        (f"{'a' * 64}.example", "is 64 octets long; at most 63"),
        (_LONG_NAME, "255 octets long; at most 253"),
        ("a b.example", "whitespace or a control character"),
        (" a.example", "whitespace or a control character"),
        ("a\tb.example", "whitespace or a control character"),
        ("a\x00.example", "whitespace or a control character"),
        ("_acme.example", "underscore"),
        ("a!.example", "only letters, digits and hyphens"),
        ("a.example.com:443", "only letters, digits and hyphens"),
        ("-a.example", "starts or ends with a hyphen"),
        ("a-.example", "starts or ends with a hyphen"),
        ("ab--c.example", "reserved for IDNA A-labels"),
        ("xn--abc.example", "not a valid internationalized name: Codepoint"),
        ("xn--a.example", "not a valid internationalized name"),
        ("☃.example", "not a valid internationalized name: Codepoint U+2603"),
        ("\u200d.example", "not a valid internationalized name"),
        (f"{'ü' * 60}.example", "not a valid internationalized name: Label too long"),
    ],
)
def test_bad_name_is_refused_with_its_reason(name: str, reason: str) -> None:
    with pytest.raises(InvalidNames) as caught:
        normalize_names("ok.example.com", [name])
    assert [p.name for p in caught.value.problems] == [name]
    assert reason in caught.value.problems[0].reason


def test_every_bad_name_is_reported_once_in_order() -> None:
    with pytest.raises(InvalidNames) as caught:
        normalize_names(
            "*.example.com",
            ["good.example.com", "a..example", "192.0.2.1", "a..example", "localhost"],
        )
    problems = caught.value.problems
    assert [p.name for p in problems] == ["*.example.com", "a..example", "192.0.2.1", "localhost"]
    assert str(problems[1]) == "a..example: empty label"
    # The message acmectl prints lists them all.
    assert str(caught.value) == "; ".join(str(p) for p in problems)
    assert caught.value.message == str(caught.value)


def test_invalid_names_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        normalize_names("localhost", [])


@pytest.mark.parametrize(
    ("common_name", "sans", "message"),
    [
        ("", ["a.example.com"], "the common name is empty"),
        ("a.example.com", [""], "an alternative name is empty"),
    ],
)
def test_empty_names_are_refused(common_name: str, sans: list[str], message: str) -> None:
    with pytest.raises(InvalidNames) as caught:
        normalize_names(common_name, sans)
    assert caught.value.problems == [NameProblem("", message)]
    assert str(caught.value) == message


def test_name_count_is_bounded_after_deduplication() -> None:
    sans = [f"n{i}.example.com" for i in range(MAX_NAMES - 1)]
    # Duplicates do not count against the limit.
    assert len(normalize_names("cn.example.com", sans + ["CN.example.com"])) == MAX_NAMES
    with pytest.raises(InvalidNames) as caught:
        normalize_names("cn.example.com", sans + ["one-more.example.com"])
    assert [str(p) for p in caught.value.problems] == [
        f"{MAX_NAMES + 1} names; a CA accepts at most {MAX_NAMES} per certificate"
    ]


def test_a_string_as_sans_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        normalize_names("a.example.com", "b.example.com")  # type: ignore[arg-type]
