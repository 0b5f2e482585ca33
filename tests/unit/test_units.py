"""The shipped systemd units (deploy/systemd/) are valid and hardened: no
warning from ``systemd-analyze verify``, an exposure of at most 3.0 from
``systemd-analyze security --offline=yes`` (the figures the README gives),
and the options the agent needs and nothing more. Running them for real:
tests/integration/test_unprivileged_reload.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
AGENT, COORDINATOR = "acme-agent.service", "acme-coordinator.service"
RULE = UNITS / "50-clusteracme-nginx-reload.rules"
MAX_EXPOSURE = 3.0
ANALYZE = shutil.which("systemd-analyze")


def directives(unit: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given, in order (systemd keys repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(unit: str, key: str) -> str:
    values = directives(unit)[f"Service.{key}"]
    assert len(values) == 1, f"{unit}: {key} given {len(values)} times"
    return values[0]


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120)


def _offline_supported() -> bool:
    if ANALYZE is None:
        return False
    probe = _analyze("security", "--offline=yes", str(UNITS / AGENT))
    return "Overall exposure level" in probe.stdout  # older ones: "unrecognized option '--offline=yes'"


needs_analyze = pytest.mark.skipif(not _offline_supported(),
                                   reason="systemd-analyze with --offline (systemd 250+) is needed; "
                                          "deploy/dev-deps.sh installs systemd")


def exposure(unit: str) -> float:
    result = _analyze("security", "--offline=yes", str(UNITS / unit))
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", [AGENT, COORDINATOR])
def test_exposure_is_at_most_3_and_the_readme_gives_it(unit: str) -> None:
    figure = exposure(unit)
    assert figure <= MAX_EXPOSURE, f"{unit}: exposure {figure} > {MAX_EXPOSURE}"
    readme = (ROOT / "README.md").read_text()
    assert f"`{unit}` {figure}" in readme, f"README should give {unit}'s exposure as {figure}"


@needs_analyze
def test_verify_finds_nothing(tmp_path: Path) -> None:
    """``systemd-analyze verify`` in a root of its own: the units installed
    where the README says, their ExecStart present, the host's targets."""
    root = tmp_path / "root"
    shutil.copytree("/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    for unit in (AGENT, COORDINATOR):
        shutil.copyfile(UNITS / unit, root / "etc" / "systemd" / "system" / unit)
        program = Path(one(unit, "ExecStart").split()[0])
        path = root / program.relative_to("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    result = _analyze("verify", f"--root={root}", AGENT, COORDINATOR)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@needs_analyze
def test_verify_would_report_a_misspelt_option(tmp_path: Path) -> None:
    """The check above can fail: the same verify flags a typo."""
    (tmp_path / "etc" / "systemd" / "system").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", tmp_path / "usr" / "lib" / "systemd" / "system", symlinks=True)
    text = (UNITS / AGENT).read_text().replace("UMask=0077", "UMaks=0077")
    (tmp_path / "etc" / "systemd" / "system" / AGENT).write_text(text)
    result = _analyze("verify", f"--root={tmp_path}", AGENT)
    assert "Unknown key" in result.stderr and "UMaks" in result.stderr


@pytest.mark.parametrize("unit", [AGENT, COORDINATOR])
def test_both_units_carry_the_required_hardening(unit: str) -> None:
    d = directives(unit)
    assert one(unit, "UMask") == "0077"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "LimitNOFILE") == "65536"
    assert d["Service.SystemCallFilter"][0] == "@system-service"
    assert one(unit, "SystemCallArchitectures") == "native"
    assert set(one(unit, "RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                "ProtectClock", "ProtectHostname", "PrivateDevices", "PrivateTmp", "RestrictNamespaces",
                "RestrictSUIDSGID", "RestrictRealtime", "LockPersonality", "MemoryDenyWriteExecute"):
        assert one(unit, key) == "yes", f"{unit}: {key}"
    assert one(unit, "ProtectSystem") == "strict" and one(unit, "ProtectHome") == "yes"
    assert one(unit, "User") == "clusteracme"


def test_the_agent_keeps_only_what_it_needs() -> None:
    # Port 80 and nothing else; the state directory the only place it writes.
    assert one(AGENT, "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one(AGENT, "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one(AGENT, "StateDirectory") == "clusteracme-agent" and one(AGENT, "StateDirectoryMode") == "0700"
    assert "PrivateUsers" not in directives(AGENT)  # would take CAP_NET_BIND_SERVICE away on the host's network
    assert one(COORDINATOR, "CapabilityBoundingSet") == "" and one(COORDINATOR, "PrivateUsers") == "yes"


def test_the_polkit_rule_allows_reloading_nginx_for_the_agents_user_only() -> None:
    rule = RULE.read_text()
    assert 'action.id == "org.freedesktop.systemd1.manage-units"' in rule
    assert 'action.lookup("unit") == "nginx.service"' in rule
    assert 'action.lookup("verb") == "reload"' in rule
    assert f'subject.user == "{one(AGENT, "User")}"' in rule
    assert rule.count("polkit.Result.YES") == 1 and "Result.AUTH" not in rule
    # The unit's comment shows the hook the rule is for.
    assert '"/usr/bin/systemctl", "--no-ask-password", "reload", "nginx.service"' in (UNITS / AGENT).read_text()
