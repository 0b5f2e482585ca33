"""deploy/install.sh (issue 13, item 4), run into a temporary root
(``DESTDIR``): the tree it makes (the venv, /etc/clusteracme with its modes,
the agent's state directory, the units, the polkit rule, the README the units
point at), the units checked there by ``systemd-analyze verify --root``, a
second run (and the copy of install.sh inside the installed package) changing
nothing, an edited config kept, another ``--prefix`` followed by the units,
a checkout with a busy working tree, shared directories (``--prefix
/usr/local``) left as they were, an upgrade whose dependencies cannot be had
leaving the venv as it was, the restart of running units left to the
operator, and bad arguments refused before anything is made.

Offline and without root: the venv is made by this interpreter (``python -m
venv`` installs pip from python's bundled copy), the wheel is built here
(``python -m build --no-isolation``), and ``PIP_NO_INDEX``/``PIP_NO_DEPS``
keep pip from looking for the dependencies: the venv then holds clusteracme
alone, which is enough for the units' ``ExecStart=`` to exist
(tests/unit/test_packaging.py imports the entry points). Under ``DESTDIR``
nothing is chowned, so every file is the runner's. The user creation and the
chown of a real install are not run here: they would change this host.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.unit.test_packaging import build_wheel, source_copy

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SH = ROOT / "deploy" / "install.sh"
DEPLOY = ROOT / "deploy"
BASH = shutil.which("bash")
ANALYZE = shutil.which("systemd-analyze")
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
RULE = "etc/polkit-1/rules.d/50-clusteracme-nginx-reload.rules"


def _why_not() -> str | None:
    if BASH is None:
        return "bash is missing"
    probe = subprocess.run([sys.executable, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0:
        return f"{sys.executable} cannot make a venv with pip (Debian: python3-venv)"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
needs_analyze = pytest.mark.skipif(ANALYZE is None or not Path("/lib/systemd/system").is_dir(),
                                   reason="systemd-analyze and /lib/systemd/system (deploy/dev-deps.sh installs "
                                          "systemd) are needed")


def install(destdir: Path, *args: str, script: Path = INSTALL_SH,
            deps: bool = False) -> subprocess.CompletedProcess[str]:
    """install.sh ARGS with this interpreter as --python (ARGS may override
    it), offline; ``deps``: pip looks for the dependencies (and finds none)."""
    env = {**os.environ, "DESTDIR": str(destdir), "PIP_NO_INDEX": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PIP_FIND_LINKS", None)
    if deps:
        env.pop("PIP_NO_DEPS", None)
    else:
        env["PIP_NO_DEPS"] = "1"
    argv = [BASH or "bash", str(script), "--python", sys.executable, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, str | None]]:
    """Every path under ``root`` (but usr/, the verify test's): mode, owner,
    group, mtime and content (a file's hash, a link's target)."""
    out: dict[str, tuple[int, int, int, int, str | None]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0] == "usr":
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            what: str | None = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            what = None
        out[rel] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, what)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def release(wheel: Path, out: Path, version: str = "99.0") -> Path:
    """``wheel`` as another release of clusteracme: ``version``, with one
    module more (``clusteracme/_release.py``), its RECORD rewritten."""
    new_info = f"clusteracme-{version}.dist-info"
    target = out / f"clusteracme-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        old_info = next(n for n in src.namelist() if n.endswith(".dist-info/METADATA")).split("/")[0]
        items = [(info, src.read(info)) for info in src.infolist() if not info.filename.endswith("/RECORD")]
        items.append((zipfile.ZipInfo("clusteracme/_release.py"), f"VERSION = {version!r}\n".encode()))
        for info, data in items:
            name = info.filename.replace(old_info + "/", new_info + "/")
            if name == f"{new_info}/METADATA":
                data = b"".join(f"Version: {version}\n".encode() if line.startswith(b"Version: ") else line
                                for line in data.splitlines(keepends=True))
            copy = zipfile.ZipInfo(name, info.date_time)
            copy.external_attr = info.external_attr or (0o644 << 16)
            dst.writestr(copy, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{name},sha256={digest},{len(data)}")
        records.append(f"{new_info}/RECORD,,")
        dst.writestr(f"{new_info}/RECORD", "\n".join(records) + "\n")
    return target


@contextmanager
def busy_log(path: Path) -> Iterator[None]:
    """A log being written (a daemon's, a test run's) in the working tree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 20_000_000)
    stop = threading.Event()

    def append() -> None:
        with path.open("ab", buffering=0) as f:
            while not stop.wait(0.0005):
                f.write(b"a line\n")

    writer = threading.Thread(target=append, daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()


@dataclass
class Staged:
    root: Path
    stdout: str
    tree: dict[str, tuple[int, int, int, int, str | None]]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def staged(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Staged:
    """Both roles from the wheel, at the default prefix."""
    root = tmp_path_factory.mktemp("root")
    result = install(root, "--role", "both", "--prefix", "/opt/clusteracme", "--wheel", str(wheel))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Staged(root, result.stdout, snapshot(root))


@pytest.fixture(scope="module")
def from_checkout(tmp_path_factory: pytest.TempPathFactory) -> Staged:
    """The agent alone, from a source checkout (no --wheel), at another
    prefix. The checkout is this one's shipped parts in a busy working tree:
    caches, a socket and a fifo, a venv, a log being written."""
    checkout = source_copy(tmp_path_factory.mktemp("checkout") / "clusteracme")
    (checkout / "clusteracme" / "__pycache__").mkdir(exist_ok=True)
    (checkout / "clusteracme" / "__pycache__" / "junk.cpython-311.pyc").write_bytes(b"junk")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / "tests").mkdir()
    os.mkfifo(checkout / "tests" / "fifo")
    os.mkfifo(checkout / "clusteracme" / "fifo")
    root = tmp_path_factory.mktemp("checkout-root")
    with socket.socket(socket.AF_UNIX) as sock, busy_log(checkout / "localcluster" / "coordinator.log"):
        sock.bind(str(checkout / "clusteracme" / "agent.sock"))
        result = install(root, "--role", "agent", "--prefix", "/srv/acme", "--no-user",
                         script=checkout / "deploy" / "install.sh")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Staged(root, result.stdout, snapshot(root))


def test_the_tree_its_modes_and_contents(staged: Staged) -> None:
    root = staged.root
    assert sorted(p.name for p in root.iterdir()) == ["etc", "opt", "var"]
    etc = root / "etc" / "clusteracme"
    assert mode(etc) == 0o750 and mode(etc / "pki") == 0o750 and mode(etc / "etcd") == 0o750
    assert sorted(p.name for p in etc.iterdir()) == ["agent.toml", "agent.toml.example", "coordinator.toml",
                                                     "coordinator.toml.example", "etcd", "pki"]
    for role in ("agent", "coordinator"):
        for name in (f"{role}.toml", f"{role}.toml.example"):
            assert mode(etc / name) == 0o640, name
            assert (etc / name).read_bytes() == (DEPLOY / "config" / f"{role}.toml").read_bytes()
    assert mode(root / "var" / "lib" / "clusteracme-agent") == 0o700
    assert mode(root / RULE) == 0o644
    assert (root / RULE).read_bytes() == (DEPLOY / "systemd" / "50-clusteracme-nginx-reload.rules").read_bytes()
    units = root / "etc" / "systemd" / "system"
    assert sorted(p.name for p in units.iterdir()) == ["acme-agent.service", "acme-coordinator.service"]
    for unit in units.iterdir():
        assert mode(unit) == 0o644
        assert unit.read_bytes() == (DEPLOY / "systemd" / unit.name).read_bytes()  # the default prefix: as shipped
    readme = root / "opt" / "clusteracme" / "share" / "doc" / "clusteracme" / "README.md"
    assert mode(readme) == 0o644 and readme.read_text().startswith("# clusteracme\n")

    venv = root / "opt" / "clusteracme" / "venv"
    for script in ("acme-agent", "acme-coordinator", "acmectl"):
        path = venv / "bin" / script
        assert mode(path) & 0o111, script
        assert path.read_text().splitlines()[0] == "#!/opt/clusteracme/venv/bin/python", script
    for path in [*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]:  # nothing names the staging directory
        if path.is_file() and not path.is_symlink():
            assert str(root).encode() not in path.read_bytes(), path
    site = venv / "lib" / PYVER / "site-packages" / "clusteracme" / "deploy"
    assert (site / "install.sh").is_file() and mode(site / "install.sh") & 0o111
    # Under DESTDIR nothing is given to another owner.
    assert {owner for _, owner, _, _, _ in staged.tree.values()} == {os.geteuid()}
    assert "systemctl enable --now acme-coordinator.service acme-agent.service" in staged.stdout
    assert "no user created" in staged.stdout


@needs_analyze
def test_the_installed_units_pass_systemd_analyze_verify(staged: Staged, tmp_path: Path) -> None:
    """In the staged root with the host's units beside them: the targets
    resolve, every key is known, and ExecStart= (the venv's scripts) exists.
    The same units without the venv are reported: the check can fail."""
    def verify(root: Path) -> subprocess.CompletedProcess[str]:
        shutil.copytree("/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
        try:
            return subprocess.run([ANALYZE or "", "verify", f"--root={root}", "acme-agent.service",
                                   "acme-coordinator.service"], capture_output=True, text=True, timeout=120)
        finally:
            shutil.rmtree(root / "usr")

    result = verify(staged.root)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    shutil.copytree(staged.root / "etc" / "systemd", tmp_path / "etc" / "systemd")
    result = verify(tmp_path)
    assert "/opt/clusteracme/venv/bin/acme-agent is not executable" in result.stderr, result.stderr
    assert "/opt/clusteracme/venv/bin/acme-coordinator is not executable" in result.stderr, result.stderr


def test_a_second_run_changes_nothing(staged: Staged, wheel: Path) -> None:
    again = install(staged.root, "--role", "both", "--prefix", "/opt/clusteracme", "--wheel", str(wheel))
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stdout
    assert snapshot(staged.root) == staged.tree
    # The copy inside the installed package, through `python -m clusteracme.deploy install`.
    venv_python = staged.root / "opt" / "clusteracme" / "venv" / "bin" / "python"
    env = {**os.environ, "DESTDIR": str(staged.root), "PYTHONDONTWRITEBYTECODE": "1"}
    located = subprocess.run([str(venv_python), "-m", "clusteracme.deploy"], env=env, cwd=staged.root,
                             capture_output=True, text=True, timeout=60)
    assert located.stdout.strip() == str(venv_python.parent.parent / "lib" / PYVER / "site-packages" / "clusteracme"
                                         / "deploy")
    copy = subprocess.run([str(venv_python), "-m", "clusteracme.deploy", "install", "--role", "both",
                           "--python", sys.executable], env=env, cwd=staged.root, capture_output=True, text=True,
                          timeout=120)
    assert copy.returncode == 0, copy.stdout + copy.stderr
    assert "from venv" in copy.stdout and "nothing to change" in copy.stdout
    assert snapshot(staged.root) == staged.tree


def test_from_a_checkout_at_another_prefix_for_the_agent_alone(from_checkout: Staged) -> None:
    root = from_checkout.root
    assert "from checkout" in from_checkout.stdout
    assert sorted(p.name for p in (root / "etc" / "clusteracme").iterdir()) == ["agent.toml", "agent.toml.example",
                                                                              "pki"]
    assert [p.name for p in (root / "etc" / "systemd" / "system").iterdir()] == ["acme-agent.service"]
    assert (root / RULE).is_file() and not (root / "opt").exists()
    unit = (root / "etc" / "systemd" / "system" / "acme-agent.service").read_text()
    assert "ExecStart=/srv/acme/venv/bin/acme-agent --config /etc/clusteracme/agent.toml" in unit
    assert "Documentation=file:///srv/acme/share/doc/clusteracme/README.md" in unit
    assert "/opt/clusteracme" not in unit
    assert (root / "srv" / "acme" / "venv" / "bin" / "acme-agent").read_text().startswith("#!/srv/acme/venv/bin/python\n")
    if ANALYZE is not None and Path("/lib/systemd/system").is_dir():
        shutil.copytree("/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system", symlinks=True)
        result = subprocess.run([ANALYZE, "verify", f"--root={root}", "acme-agent.service"],
                                capture_output=True, text=True, timeout=120)
        shutil.rmtree(root / "usr")
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_directories_not_its_own_keep_their_mode_its_own_get_theirs(wheel: Path, tmp_path: Path) -> None:
    """--prefix /usr/local: /usr/local, share/ and share/doc/ exist (Debian's
    are 2775 root:staff) and are left as they are; share/doc/clusteracme/
    and /etc/clusteracme/ are its own, made or put right."""
    root = tmp_path / "root"
    shared = [root / "usr" / "local", root / "usr" / "local" / "share", root / "usr" / "local" / "share" / "doc"]
    for path in shared:
        path.mkdir(parents=True)
        path.chmod(0o2775)
    (root / "etc" / "clusteracme").mkdir(parents=True)
    (root / "etc" / "clusteracme").chmod(0o777)
    result = install(root, "--role", "agent", "--prefix", "/usr/local", "--wheel", str(wheel))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [mode(path) for path in shared] == [0o2775] * 3
    assert mode(root / "usr" / "local" / "share" / "doc" / "clusteracme") & 0o777 == 0o755
    assert mode(root / "etc" / "clusteracme") == 0o750
    made = [line.strip() for line in result.stdout.splitlines() if line.startswith("  /usr/") and line.endswith("/")]
    assert made == ["/usr/local/share/doc/clusteracme/"], made


def test_an_upgrade_whose_dependencies_cannot_be_had_leaves_the_venv_as_it_was(staged: Staged, wheel: Path,
                                                                                tmp_path: Path) -> None:
    """Offline (PIP_NO_INDEX, no PIP_FIND_LINKS), a new release whose
    dependencies the venv lacks: install.sh fails saying so and how to give
    them, and the venv still holds the release it had, unchanged."""
    root = tmp_path / "root"
    shutil.copytree(staged.root, root, symlinks=True)
    before = snapshot(root)
    newer = release(wheel, tmp_path)
    result = install(root, "--role", "both", "--wheel", str(newer), deps=True)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("install.sh: pip could not install clusteracme-99.0-py3-none-any.whl with its "
                           "dependencies") and "was not replaced" in last and "PIP_FIND_LINKS" in last, last
    assert snapshot(root) == before
    site = root / "opt" / "clusteracme" / "venv" / "lib" / PYVER / "site-packages"
    assert not (site / "clusteracme" / "_release.py").exists() and not (site / "clusteracme-99.0.dist-info").exists()
    # The same release with its dependencies left alone (PIP_NO_DEPS, as the other tests) goes in.
    upgraded = install(root, "--role", "both", "--wheel", str(newer))
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert (site / "clusteracme" / "_release.py").is_file() and (site / "clusteracme-99.0.dist-info").is_dir()


def test_an_edited_config_is_kept_and_the_example_follows_the_package(from_checkout: Staged) -> None:
    root = from_checkout.root
    config = root / "etc" / "clusteracme" / "agent.toml"
    example = root / "etc" / "clusteracme" / "agent.toml.example"
    config.write_text('peer_id = "edge-7"\n')
    example.write_text("# an old example\n")
    script = root / "srv" / "acme" / "venv" / "lib" / PYVER / "site-packages" / "clusteracme" / "deploy" / "install.sh"
    result = install(root, "--role", "agent", "--prefix", "/srv/acme", script=script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert config.read_text() == 'peer_id = "edge-7"\n' and mode(config) == 0o640
    assert example.read_bytes() == (DEPLOY / "config" / "agent.toml").read_bytes() and mode(example) == 0o640
    assert result.stdout.count("\n  /") == 1 and "/etc/clusteracme/agent.toml.example" in result.stdout


@pytest.mark.parametrize("args, message", [
    ([], "--role agent|coordinator|both is required"),
    (["--role", "web"], "--role must be agent, coordinator or both"),
    (["--role"], "--role needs a value"),
    (["--role", "agent", "--prefix", "opt/clusteracme"], "--prefix must be an absolute path"),
    (["--role", "agent", "--prefix", "/opt/cluster acme"], "--prefix must be an absolute path"),
    (["--role", "agent", "--prefix", "/opt/../etc"], "--prefix must be an absolute path"),
    (["--role", "agent", "--wheel", "{tmp}/clusteracme-0.2.0-py3-none-any.whl"], "is not a readable file"),
    (["--role", "agent", "--wheel", "{tmp}/junk/clusteracme-0.2.0-py3-none-any.whl"], "is not a wheel"),
    (["--role", "agent", "--wheel", "{tmp}/junk/other-1.0-py3-none-any.whl"], "is not a clusteracme wheel"),
    (["--role", "agent", "--python", "/nonexistent/python3"], "is not a command"),
    (["--role", "agent", "--frobnicate"], "unknown argument '--frobnicate'"),
])
def test_bad_arguments_are_refused_before_anything_is_made(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "junk").mkdir()
    for name in ("clusteracme-0.2.0-py3-none-any.whl", "other-1.0-py3-none-any.whl"):
        (tmp_path / "junk" / name).write_text("not a zip\n")
    root = tmp_path / "root"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = install(root, *argv)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: ") and message in lines[0], result.stderr
    assert not root.exists() and result.stdout == ""


def test_a_relative_destdir_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([BASH or "bash", str(INSTALL_SH), "--role", "agent", "--python", sys.executable],
                            env={**os.environ, "DESTDIR": "stage"}, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "DESTDIR must be an absolute path" in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- a real install (no DESTDIR), in a mount namespace of the test's own ------

OVERLAYS = """\
set -euo pipefail
W=$1 INSTALL=$2 WHEEL=$3 PY=$4
for d in etc opt varlib; do mkdir -p "$W/$d-upper" "$W/$d-work"; done
{ mount -t overlay overlay -o "lowerdir=/etc,upperdir=$W/etc-upper,workdir=$W/etc-work" /etc &&
  mount -t overlay overlay -o "lowerdir=/opt,upperdir=$W/opt-upper,workdir=$W/opt-work" /opt &&
  mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$W/varlib-upper,workdir=$W/varlib-work" /var/lib &&
  mount -t tmpfs -o mode=0755 tmpfs /run; } || exit 97   # /run: no systemd here, nothing to daemon-reload
"""
REAL_INSTALL = OVERLAYS + """\
bash "$INSTALL" --role both --wheel "$WHEEL" --python "$PY" >"$W/first.out"
bash "$INSTALL" --role both --wheel "$WHEEL" --python "$PY" >"$W/second.out"
getent passwd clusteracme >"$W/passwd"
stat -c '%n %a %U:%G' /etc/clusteracme /etc/clusteracme/pki /etc/clusteracme/etcd /etc/clusteracme/agent.toml \\
  /etc/clusteracme/coordinator.toml.example /var/lib/clusteracme-agent /etc/systemd/system/acme-agent.service \\
  /etc/polkit-1/rules.d/50-clusteracme-nginx-reload.rules /opt/clusteracme/venv/bin/acme-agent >"$W/stat"
"""


def _why_no_real_install() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a mount namespace with overlays on /etc, /opt and /var/lib)"
    for tool in ("unshare", "useradd", "groupadd", "getent"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs"
    if Path("/opt/clusteracme").exists():
        return "/opt/clusteracme exists on this host"
    return None


@pytest.mark.skipif(_why_no_real_install() is not None, reason=_why_no_real_install() or "")
def test_a_real_install_creates_the_user_and_gives_it_its_files(wheel: Path, tmp_path: Path) -> None:
    """Without DESTDIR, as root: the system user and group, root:clusteracme
    on /etc/clusteracme, the state directory the user's; then nothing to
    change. The host's /etc, /opt and /var/lib are overlays whose upper
    layers are in tmp_path: the host is not changed."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DESTDIR", None)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", BASH or "bash", "-c", REAL_INSTALL,
                             "real-install", str(tmp_path), str(INSTALL_SH), str(wheel), sys.executable],
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode == 97 or "unshare failed" in result.stderr:
        pytest.skip(f"no private mounts here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, second = (tmp_path / "first.out").read_text(), (tmp_path / "second.out").read_text()
    passwd = (tmp_path / "passwd").read_text().strip().split(":")
    assert passwd[0] == "clusteracme" and passwd[5:] == ["/nonexistent", "/usr/sbin/nologin"], passwd
    assert "created the system user clusteracme" in first and "daemon-reload" not in first
    assert "nothing to change" in second and "created" not in second
    found = dict(line.split(" ", 1) for line in (tmp_path / "stat").read_text().splitlines())
    assert found == {
        "/etc/clusteracme": "750 root:clusteracme",
        "/etc/clusteracme/pki": "750 root:clusteracme",
        "/etc/clusteracme/etcd": "750 root:clusteracme",
        "/etc/clusteracme/agent.toml": "640 root:clusteracme",
        "/etc/clusteracme/coordinator.toml.example": "640 root:clusteracme",
        "/var/lib/clusteracme-agent": "700 clusteracme:clusteracme",
        "/etc/systemd/system/acme-agent.service": "644 root:root",
        "/etc/polkit-1/rules.d/50-clusteracme-nginx-reload.rules": "644 root:root",
        "/opt/clusteracme/venv/bin/acme-agent": "755 root:root",
    }
    assert (tmp_path / "opt-upper" / "clusteracme" / "venv" / "bin" / "acme-agent").read_text().startswith(
        "#!/opt/clusteracme/venv/bin/python\n")


# systemd "runs" (/run/systemd/system exists) and systemctl is a stand-in: it
# logs its arguments and says the units in $W/active are active.
UPGRADES = OVERLAYS + """\
NEWER=$5
mkdir -p /run/systemd/system "$W/bin"
cat >"$W/bin/systemctl" <<EOF
#!/bin/bash
echo "\\$*" >>"$W/systemctl.log"
if [[ \\$1 == is-active ]]; then grep -qxF -- "\\${@: -1}" "$W/active"; fi
EOF
chmod +x "$W/bin/systemctl"
export PATH=$W/bin:$PATH
run() { bash "$INSTALL" --role both --python "$PY" "$@"; }
: >"$W/active"
run --wheel "$WHEEL" >"$W/1.out"                       # a first install: nothing running
echo acme-agent.service >"$W/active"
run --wheel "$WHEEL" >"$W/2.out"                       # nothing changed
run --wheel "$NEWER" >"$W/3.out"                       # a new release under a running agent
echo acme-coordinator.service >>"$W/active"
echo "# edited" >>/etc/systemd/system/acme-coordinator.service
run --wheel "$NEWER" >"$W/4.out"                       # the coordinator's unit put back
"""


@pytest.mark.skipif(_why_no_real_install() is not None, reason=_why_no_real_install() or "")
def test_after_an_upgrade_the_running_units_are_to_be_restarted_by_the_operator(wheel: Path, tmp_path: Path) -> None:
    """A real install under a (stand-in) systemd: when the package or a
    unit changed and the unit is active, the steps begin with its
    ``systemctl restart``; install.sh itself restarts nothing."""
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_NO_DEPS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("DESTDIR", None)
    newer = release(wheel, tmp_path)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", BASH or "bash", "-c", UPGRADES,
                             "upgrades", str(tmp_path), str(INSTALL_SH), str(wheel), sys.executable, str(newer)],
                            env=env, capture_output=True, text=True, timeout=300)
    if result.returncode == 97 or "unshare failed" in result.stderr:
        pytest.skip(f"no private mounts here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = [(tmp_path / f"{n}.out").read_text() for n in (1, 2, 3, 4)]
    assert "(systemctl daemon-reload)" in out[0] and "systemctl restart" not in out[0]
    assert "nothing to change" in out[1] and "systemctl restart" not in out[1]
    assert "clusteracme-99.0-py3-none-any.whl" in out[2]
    assert "  1. restart what still runs the old code or unit (nothing was restarted):\n" \
           "     systemctl restart acme-agent.service\n" in out[2]
    assert "acme-coordinator.service" in out[3] and "(systemctl daemon-reload)" in out[3]
    assert [line.strip() for line in out[3].splitlines() if "systemctl restart" in line] == [
        "systemctl restart acme-coordinator.service"]
    calls = (tmp_path / "systemctl.log").read_text().splitlines()
    assert {call.split()[0] for call in calls} == {"daemon-reload", "is-active"}, calls
