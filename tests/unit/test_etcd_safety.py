"""Safe defaults for etcd (issue 12 item 5): plaintext to an endpoint that is
not loopback, or a password without TLS, is refused before any connection
unless ``etcd.insecure = true``, which is then warned at every start. The
real daemon's exit code and sentence: tests/integration/test_etcd_refusals.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from clusteracme.coordinator import app
from clusteracme.coordinator.settings import CoordinatorSettings, EtcdSettings
from clusteracme.coordinator.store.etcd import EtcdStore

from clusteracme import errors
from clusteracme.config import build


def settings(**etcd: object) -> CoordinatorSettings:
    return CoordinatorSettings(etcd=EtcdSettings(**etcd))  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", ["127.0.0.1:2379", "127.8.9.10:2379", "[::1]:2379", "localhost:2379",
                                      "LOCALHOST.:2379", "[::ffff:127.0.0.1]:2379"])
def test_loopback_plaintext_stays_allowed(endpoint: str) -> None:
    assert EtcdSettings(endpoints=(endpoint,)).insecurity() == []
    assert isinstance(app.etcd_store(settings(endpoints=(endpoint,))), EtcdStore)


@pytest.mark.parametrize("endpoint", ["10.255.255.1:2379", "[2001:db8::1]:2379", "etcd.example:2379",
                                      "localhost.evil.example:2379", "0.0.0.0:2379", "garbage"])
def test_plaintext_to_anything_else_is_refused(endpoint: str) -> None:
    s = settings(endpoints=("127.0.0.1:2379", endpoint))
    with pytest.raises(errors.InvalidArgument) as refused:
        app.etcd_store(s)
    message = refused.value.message
    assert message.startswith(f"refusing to use etcd insecurely: plaintext (no etcd.ca) to {endpoint}, not a "
                              "loopback address")
    assert "etcd.insecure = true" in message and "etcd.ca" in message and "\n" not in message
    assert "127.0.0.1:2379" not in message  # only the offending endpoint is named


def test_tls_makes_any_endpoint_acceptable(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    s = settings(endpoints=("10.0.0.21:2379", "etcd.example:2379"), ca=ca, user="clusteracme",
                 password_file=password)
    assert s.etcd.insecurity() == []
    assert isinstance(app.etcd_store(s), EtcdStore)


@pytest.mark.parametrize("auth", [{"user": "clusteracme"}, {"password_file": "PASSWORD"},
                                  {"user": "clusteracme", "password_file": "PASSWORD"}])
def test_a_password_without_tls_is_refused_even_on_loopback(tmp_path: Path, auth: dict[str, str]) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    given = {k: (password if v == "PASSWORD" else v) for k, v in auth.items()}
    with pytest.raises(errors.InvalidArgument,
                       match=r"^refusing to use etcd insecurely: a password \(etcd.user/password_file\) sent without "
                             r"TLS \(no etcd.ca\); give etcd.ca"):
        app.etcd_store(settings(endpoints=("127.0.0.1:2379",), **given))


def test_both_problems_are_named_in_one_line(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret")
    with pytest.raises(errors.InvalidArgument) as refused:
        app.etcd_store(settings(endpoints=("10.0.0.21:2379",), user="u", password_file=password))
    assert "plaintext (no etcd.ca) to 10.0.0.21:2379" in refused.value.message
    assert "; and a password (etcd.user/password_file) sent without TLS" in refused.value.message


def test_insecure_accepts_and_warns_naming_what(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret")
    caplog.set_level(logging.INFO)
    store = app.etcd_store(settings(endpoints=("10.0.0.21:2379",), user="u", password_file=password,
                                    insecure=True))
    assert isinstance(store, EtcdStore)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert text.startswith("etcd.insecure = true: plaintext (no etcd.ca) to 10.0.0.21:2379")
    assert "a password (etcd.user/password_file) sent without TLS" in text
    # Every start warns again (nothing remembers it).
    caplog.clear()
    app.etcd_store(settings(endpoints=("10.0.0.21:2379",), insecure=True))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_insecure_with_nothing_insecure_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    app.etcd_store(settings(endpoints=("127.0.0.1:2379",), insecure=True))
    assert caplog.records == []


def test_the_setting_comes_from_toml() -> None:
    s = build(CoordinatorSettings, {"etcd": {"endpoints": ["10.0.0.21:2379"], "insecure": True}})
    assert s.etcd.insecure is True
    with pytest.raises(errors.InvalidArgument, match="etcd.insecure must be bool"):
        build(CoordinatorSettings, {"etcd": {"insecure": "yes"}})
    assert EtcdSettings().insecure is False and EtcdSettings().insecurity() == []  # the default: 127.0.0.1


def test_the_shipped_example_config_passes() -> None:
    """deploy/config/coordinator.toml (remote members over TLS) is not refused."""
    from clusteracme.config import load_toml

    root = Path(__file__).resolve().parents[2]
    s = build(CoordinatorSettings, load_toml(root / "deploy/config/coordinator.toml"))
    assert s.etcd.ca is not None and s.etcd.insecurity() == []
