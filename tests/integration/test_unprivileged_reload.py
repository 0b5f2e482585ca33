"""The shipped units, run by a real systemd (issue 12, item 9).

The agent runs as ``clusteracme`` under ``deploy/systemd/acme-agent.service``
byte for byte (every sandboxing option, ``CAP_NET_BIND_SERVICE`` only,
``NoNewPrivileges``): it answers the http-01 challenge on port 80, and its
reload hook reloads a root nginx master through ``systemctl reload
nginx.service``, allowed by the shipped polkit rule
(``deploy/systemd/50-clusteracme-nginx-reload.rules``) and by nothing else:
the new serial is served. The old hook, ``nginx -s reload``, fails with EPERM
under the same restrictions; the rule allows that one unit and verb only,
and without it the reload is refused. The coordinator runs under
``acme-coordinator.service`` too (``Type=notify``, ``PrivateUsers``, no
capability) as a standby replica that serves reads. Under the same agent
unit: ``keys.group = "ssl-cert"`` with the README's drop-in lets a member of
ssl-cert read the live key (without the drop-in the agent refuses to start),
and ``front.mode = "external"`` holds its challenge socket in the unit's
``RuntimeDirectory``.

How, without touching the host: systemd is PID 1 of a PID, mount, UTS, IPC
and cgroup namespace of the test's own (``unshare``), with a cgroup of its
own, a unit path that holds only this test's units (no ``sysinit.target``
of the host: nothing the host would run at boot runs), private ``/run``,
``/tmp``, ``/var/tmp`` and ``/sys/fs/cgroup``, and overlays on ``/etc``,
``/opt`` and ``/var/lib`` whose upper layers are in the test's directory
(the ``clusteracme`` user, the configs, the polkit rule, the agent's state
directory, ``/opt/clusteracme/venv``). dbus-daemon and polkitd are the
host's, started by that systemd. The network is the host's (loopback): the
coordinator, etcd and pebble are the ``LocalCluster``'s. Teardown SIGKILLs
that systemd (everything in its namespace dies with it) and removes its
cgroups.

Needs root, a host whose PID 1 is not systemd (a container or VM such as CI),
unshare/nsenter/setpriv (util-linux), systemd, dbus-daemon, polkitd, nginx,
overlayfs and a system python of this minor version (the venv's packages run
on it: the test's own interpreter may live under /root, which
``ProtectHome=yes`` hides). Otherwise the tests skip, saying which is missing.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusteracme import pki
from clusteracme.localcluster.cluster import LocalCluster, peer_address, served_serial, write_toml
from clusteracme.localcluster.infra import free_port, tcp_check
from tests.integration.conftest import ctl_json, register_account
from tests.unit.test_packaging import build_wheel

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
RULE = "50-clusteracme-nginx-reload.rules"
NAME = "www.unprivileged.example"
USER = "clusteracme"
TEST_DIR = "/run/clusteracme-test"
NGINX = "/usr/sbin/nginx"
SYSTEMCTL = "/usr/bin/systemctl"
HOOK = [SYSTEMCTL, "--no-ask-password", "reload", "nginx.service"]
STUB_TARGETS = ("sysinit.target", "basic.target", "sockets.target", "paths.target", "timers.target",
                "slices.target", "local-fs.target", "shutdown.target", "network.target", "network-online.target",
                "nss-user-lookup.target", "multi-user.target")
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"

NGINX_CONF = """\
user nobody {nogroup};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen {address}:{port} ssl;
        ssl_certificate /var/lib/clusteracme-agent/slots/server/active/fullchain.pem;
        ssl_certificate_key /var/lib/clusteracme-agent/slots/server/active/privkey.pem;
        location / {{ return 200 "nginx ok\\n"; }}
    }}
}}
"""

NGINX_UNIT = f"""\
[Unit]
Description=nginx for the test (root master)

[Service]
Type=exec
ExecStart={NGINX} -p {TEST_DIR}/nginx -c {TEST_DIR}/nginx/nginx.conf -g "daemon off;"
ExecReload={NGINX} -p {TEST_DIR}/nginx -c {TEST_DIR}/nginx/nginx.conf -s reload
"""

# Runs inside the new namespaces, then becomes their PID 1 (argv: work dir, repo,
# site-packages, the pty that stands for /dev/console there).
BOOT = f"""\
set -euo pipefail
W=$1 REPO=$2 SITE=$3 CONSOLE=$4
mount --bind "$CONSOLE" /dev/console
for d in etc opt varlib; do mkdir -p "$W/$d-work"; done
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$W/etc-upper,workdir=$W/etc-work" /etc
mount -t overlay overlay -o "lowerdir=/opt,upperdir=$W/opt-upper,workdir=$W/opt-work" /opt
mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$W/varlib-upper,workdir=$W/varlib-work" /var/lib
mount --bind "$REPO" /opt/clusteracme/src && mount -o remount,bind,ro /opt/clusteracme/src
mount --bind "$SITE" /opt/clusteracme/site && mount -o remount,bind,ro /opt/clusteracme/site
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p {TEST_DIR}/units {TEST_DIR}/nginx
mount --bind "$W/units" {TEST_DIR}/units
mount --bind "$W/nginx" {TEST_DIR}/nginx
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# systemd as PID 1 raises fs.file-max, fs.nr_open and net.unix.max_dgram_qlen at
# start: they are the host's (its network namespace and /proc/sys): read-only here.
mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
exec env -i container=clusteracme-test SYSTEMD_UNIT_PATH={TEST_DIR}/units PATH=/usr/sbin:/usr/bin:/sbin:/bin \\
    /lib/systemd/systemd --system --unit=clusteracme-test.target --log-target=console --log-level=info \\
    --default-standard-output=tty --default-standard-error=tty
"""


def _why_not() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, a private systemd)"
    if Path("/proc/1/comm").read_text().strip() == "systemd":
        return "the host runs systemd as PID 1: a private one would share its cgroups (run in a container or VM)"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is missing"
    for path in ("/lib/systemd/systemd", SYSTEMCTL, "/usr/bin/dbus-daemon", "/usr/lib/polkit-1/polkitd", NGINX):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (deploy/dev-deps.sh installs polkitd and nginx)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "no overlayfs"
    if _cgroup2_root() is None:
        return "no cgroup2 hierarchy mounted"
    if _system_python() is None:
        return f"no system python{PYVER} outside /root and /home"
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    under = [m for m in mounts if re.match(r"/(etc|opt|var/lib)(/|$)", m)]
    if under:
        return f"mounts under /etc, /opt or /var/lib ({under[0]}) would be hidden by the test's overlays"
    return None


def _cgroup2_root() -> Path | None:
    for path in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (path / "cgroup.procs").exists() and (path / "cgroup.controllers").exists():
            return path
    return None


def _system_python() -> str | None:
    for directory in ("/usr/bin", "/usr/local/bin"):
        path = Path(directory) / f"python{PYVER}"
        if path.exists() and not str(path.resolve()).startswith(("/root/", "/home/")):
            return str(path)
    return None


def _free_id() -> int:
    """A uid/gid number no user and no group has on this host."""
    taken = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    return next(i for i in range(64900, 65500) if i not in taken)


class PrivateSystemd:
    """systemd as PID 1 of namespaces of its own; see the module docstring."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.log = work / "systemd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.cgroup: Path | None = None
        self._console: tuple[int, int] | None = None
        self._reader: threading.Thread | None = None

    def boot(self, timeout: float = 60) -> None:
        root = _cgroup2_root()
        assert root is not None
        self.cgroup = root / f"clusteracme-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.cgroup.mkdir()
        (self.work / "boot.sh").write_text(BOOT)
        site = Path(sys.prefix) / "lib" / f"python{PYVER}" / "site-packages"
        # systemd writes its messages and (StandardOutput=tty) the services' output to
        # /dev/console: a pty whose other end this process copies into the log.
        master, slave = os.openpty()
        tty.setraw(slave)
        self._console = (master, slave)
        self._reader = threading.Thread(target=self._copy_console, args=(master,), daemon=True)
        self._reader.start()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["/bin/bash", "-c", 'echo $$ > "$1/cgroup.procs" && exec unshare --pid --fork --mount-proc --mount '
                 '--uts --ipc --cgroup --propagation private --kill-child=SIGKILL /bin/bash "$2" "$3" "$4" "$5" "$6"',
                 "boot", str(self.cgroup), str(self.work / "boot.sh"), str(self.work), str(ROOT), str(site),
                 os.ttyname(slave)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.init_pid:
            assert self.proc.poll() is None, f"the private systemd did not start:\n{self.tail()}"
            assert time.monotonic() < deadline, "unshare started no child"
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            text = children.read_text().split() if children.exists() else []
            self.init_pid = int(text[0]) if text else 0
            time.sleep(0.05)
        while True:
            state = self.run([SYSTEMCTL, "is-system-running"], check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            assert self.proc.poll() is None, f"the private systemd exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"the private systemd is {state!r} after {timeout}s:\n{self.tail()}"
            time.sleep(0.2)

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 60,
            as_user: str | None = None) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the namespaces (root, or ``as_user`` with no
        capability and no new privileges, as the agent's unit runs it)."""
        if as_user is not None:
            argv = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--init-groups", "--no-new-privs",
                    "--inh-caps=-all", "--bounding-set=-all", *argv]
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        result = subprocess.run(["nsenter", "-t", str(self.init_pid), "-m", "-p", "-u", "-i", "--", *argv],
                                capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                                 f"{self.tail()}")
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([SYSTEMCTL, "--no-pager", *args], check=check)

    def wait_active(self, unit: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.systemctl("is-active", unit, check=False).stdout.strip()) != "active":
            assert state != "failed" and time.monotonic() < deadline, \
                f"{unit} is {state}:\n{self.systemctl('status', unit, check=False).stdout}\n{self.tail()}"
            time.sleep(0.2)

    def main_status(self, unit: str) -> dict[str, str]:
        """/proc/<MainPID>/status of a unit, as a dict."""
        pid = self.systemctl("show", "-p", "MainPID", "--value", unit).stdout.strip()
        assert pid not in ("", "0"), f"{unit} has no main process"
        text = self.run(["cat", f"/proc/{pid}/status"]).stdout
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    def _copy_console(self, master: int) -> None:
        with open(self.log, "ab", buffering=0) as log:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave end closed
                    return
                if not data:
                    return
                log.write(data)

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        for pid in (self.init_pid, self.proc.pid if self.proc else 0):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)  # ours; the whole PID namespace dies with its init
                except ProcessLookupError:
                    pass
        if self.proc is not None:
            self.proc.wait(timeout=30)
        if self._console is not None:
            os.close(self._console[1])  # the reader sees EIO once nothing holds the slave
            if self._reader is not None:
                self._reader.join(timeout=5)
            os.close(self._console[0])
        if self.cgroup is not None:
            deadline = time.monotonic() + 30
            while self.cgroup.exists():
                for directory in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()),
                                        key=lambda p: len(p.parts), reverse=True) + [self.cgroup]:
                    try:
                        directory.rmdir()
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)


def _stage(work: Path, cluster: LocalCluster, uid: int, nginx_port: int, coordinator_port: int, wheel: Path) -> None:
    """The units, users, configs, keys and venv the private systemd sees."""
    units = work / "units"
    units.mkdir()
    for unit in ("acme-agent.service", "acme-coordinator.service"):
        shutil.copyfile(UNITS / unit, units / unit)  # byte for byte
    for unit in ("dbus.service", "dbus.socket", "polkit.service"):
        shutil.copyfile(Path("/lib/systemd/system") / unit, units / unit)
    for target in STUB_TARGETS:
        (units / target).write_text(f"[Unit]\nDescription={target} (stub: the host's is not run)\n")
    (units / "clusteracme-test.target").write_text("[Unit]\nDescription=clusteracme test\n")
    (units / "nginx.service").write_text(NGINX_UNIT)
    units.chmod(0o755)

    etc = work / "etc-upper"
    (etc / "polkit-1" / "rules.d").mkdir(parents=True)
    shutil.copyfile(UNITS / RULE, etc / "polkit-1" / "rules.d" / RULE)
    (etc / "passwd").write_text(Path("/etc/passwd").read_text() + f"{USER}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text(Path("/etc/group").read_text() + f"{USER}:x:{uid}:\n")
    for name in ("passwd", "group"):
        (etc / name).chmod(0o644)
    conf = etc / "clusteracme"
    (conf / "pki").mkdir(parents=True)
    os.chown(conf, 0, uid)
    conf.chmod(0o750)

    def secret(src: Path, dst: Path) -> None:
        shutil.copyfile(src, dst)
        os.chown(dst, 0, uid)
        dst.chmod(0o640)

    shutil.copyfile(cluster.pki_dir / "ca.pem", conf / "pki" / "ca.pem")
    (conf / "pki" / "ca.pem").chmod(0o644)
    agent_cert, agent_key = pki.issue(cluster.pki_dir, pki.Identity(pki.Role.AGENT, "peer1"), out_dir=work / "issued",
                                      ips=[peer_address(1)])
    coord_cert, coord_key = pki.issue(cluster.pki_dir, pki.Identity(pki.Role.COORDINATOR, "sd1"),
                                      out_dir=work / "issued", ips=["127.0.0.1"])
    for src in (agent_cert, agent_key, coord_cert, coord_key):
        secret(src, conf / "pki" / src.name)
    shutil.copyfile(cluster.run_dir / "account-key.secret", conf / "account-key.secret")
    os.chown(conf / "account-key.secret", uid, uid)  # the coordinator wants it 0600, its own
    (conf / "account-key.secret").chmod(0o600)
    write_toml(conf / "agent.toml", {
        "peer_id": "peer1",
        "listen": f"{peer_address(1)}:{free_port()}",
        "coordinators": cluster.coordinator_endpoints,
        "state_dir": "/var/lib/clusteracme-agent",
        "tls": {"ca": "/etc/clusteracme/pki/ca.pem", "cert": f"/etc/clusteracme/pki/{agent_cert.name}",
                "key": f"/etc/clusteracme/pki/{agent_key.name}"},
        "front": {"hosts": [peer_address(1)], "port": 80, "mode": "redirect"},
        "challenge": {"host": "127.0.0.1", "port": 0},
        "hooks": [{"kind": "command", "argv": HOOK, "timeout": 30}],
        "verify_endpoints": [f"{peer_address(1)}:{nginx_port}"],
    })
    coordinator = tomllib.loads(cluster.replica(1).config.read_text())
    coordinator.pop("metrics_listen", None)
    coordinator.update({
        "name": "sd1", "listen": f"127.0.0.1:{coordinator_port}", "advertise": f"127.0.0.1:{coordinator_port}",
        "account_key_file": "/etc/clusteracme/account-key.secret",
        "tls": {"ca": "/etc/clusteracme/pki/ca.pem", "cert": f"/etc/clusteracme/pki/{coord_cert.name}",
                "key": f"/etc/clusteracme/pki/{coord_key.name}"},
    })
    write_toml(conf / "coordinator.toml", coordinator)
    for name in ("agent.toml", "coordinator.toml"):
        os.chown(conf / name, 0, uid)
        (conf / name).chmod(0o640)

    # /opt/clusteracme/venv: the system python with the wheel and the test venv's packages.
    venv = work / "opt-upper" / "clusteracme" / "venv"
    (venv / "bin").mkdir(parents=True)
    for mount_point in ("src", "site"):
        (work / "opt-upper" / "clusteracme" / mount_point).mkdir()
    site = venv / "lib" / f"python{PYVER}" / "site-packages"
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {Path(_system_python() or '').parent}\n"
                                     "include-system-site-packages = false\n")
    (venv / "bin" / "python3").symlink_to(_system_python() or "")
    # The package as a node gets it (one top-level clusteracme, coordinator/ and
    # peer_agent/ inside); its dependencies from the test venv's site-packages.
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    (site / "clusteracme-test.pth").write_text("/opt/clusteracme/site\n")
    for script, module in (("acme-agent", "clusteracme.peer_agent.app"), ("acme-coordinator", "clusteracme.coordinator.app")):
        (venv / "bin" / script).write_text(f"#!/opt/clusteracme/venv/bin/python3\nimport sys\n"
                                           f"from {module} import main\nsys.exit(main())\n")
        (venv / "bin" / script).chmod(0o755)
    for directory in (work / "opt-upper", work / "opt-upper" / "clusteracme", venv):
        directory.chmod(0o755)
    (work / "varlib-upper").mkdir()

    nginx = work / "nginx"
    (nginx / "tmp").mkdir(parents=True)
    nogroup = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    (nginx / "nginx.conf").write_text(NGINX_CONF.format(dir=f"{TEST_DIR}/nginx", nogroup=nogroup,
                                                        address=peer_address(1), port=nginx_port))
    for directory in (nginx, nginx / "tmp"):
        directory.chmod(0o755)
    work.chmod(0o755)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, PrivateSystemd, str, int]]:
    why = _why_not()
    if why:
        pytest.skip(why)
    run_dir = tmp_path_factory.mktemp("unprivileged")
    work = run_dir / "systemd"
    work.mkdir()
    cluster = LocalCluster(run_dir, peers=0)
    cluster.front_port = 80  # pebble validates on port 80: the agent binds it with CAP_NET_BIND_SERVICE only
    with cluster:
        register_account(cluster)
        nginx_endpoint = f"{peer_address(1)}:{free_port()}"
        coordinator_port = free_port()
        _stage(work, cluster, _free_id(), int(nginx_endpoint.rsplit(":", 1)[1]), coordinator_port,
               build_wheel(run_dir / "wheel"))
        sd = PrivateSystemd(work)
        try:
            sd.boot()
            sd.systemctl("start", "dbus.socket", "dbus.service")
            yield cluster, sd, nginx_endpoint, coordinator_port
        finally:
            sd.stop()


def _wait_alive(cluster: LocalCluster, sd: PrivateSystemd, peer: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        peers = {p["peer_id"]: p for p in ctl_json(cluster, "peer", "list")["peers"]}
        if peers.get(peer, {}).get("alive"):
            return
        assert time.monotonic() < deadline, f"{peer} did not register: {peers}\n{sd.tail()}"
        time.sleep(0.3)


def test_agent_under_the_shipped_unit_reloads_a_root_nginx_through_the_polkit_rule(
        setup: tuple[LocalCluster, PrivateSystemd, str, int]) -> None:
    cluster, sd, endpoint, _ = setup
    sd.systemctl("start", "acme-agent.service")
    sd.wait_active("acme-agent.service")
    _wait_alive(cluster, sd, "peer1")
    # The sandbox is in force: the agent's user, port 80 only, no new privileges, a seccomp filter.
    status = sd.main_status("acme-agent.service")
    assert status["Uid"].split()[0] == status["Gid"].split()[0] != "0"
    assert int(status["CapEff"], 16) == 1 << 10, status["CapEff"]  # CAP_NET_BIND_SERVICE alone
    assert int(status["CapBnd"], 16) == 1 << 10, status["CapBnd"]
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    state = sd.run(["stat", "-c", "%U %a", "/var/lib/clusteracme-agent"]).stdout.split()
    assert state == [USER, "700"]

    # Issue: pebble validates http-01 on 127.0.0.2:80, the agent's front (bound under the unit).
    cluster.ctl("peer", "enable", "peer1")
    cluster.set_dns(NAME, [1])
    cluster.ctl("csr", "create", "peer1", "--cn", NAME)
    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"], sd.tail()
    first_deploy = cluster.ctl("--json", "deploy", "peer1", check=False).stdout  # no nginx yet: its reload fails
    key = sd.run(["stat", "-c", "%U %a", "/var/lib/clusteracme-agent/slots/server/active/privkey.pem"]).stdout.split()
    assert key == [USER, "600"]  # keys.group unset: the agent's alone
    sd.systemctl("start", "nginx.service")
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + 10
    while not tcp_check(host, int(port))():
        assert time.monotonic() < deadline, f"nginx did not listen:\n{sd.tail()}"
        time.sleep(0.05)
    first = served_serial(endpoint, NAME)
    assert first == ctl_json(cluster, "status", "peer1")["peers"][0]["slots"][0]["active_serial"], first_deploy

    # The old hook fails under the same restrictions: a root master cannot be signalled.
    old = sd.run([NGINX, "-p", f"{TEST_DIR}/nginx", "-c", f"{TEST_DIR}/nginx/nginx.conf", "-s", "reload"],
                 as_user=USER, check=False)
    assert old.returncode != 0 and "Operation not permitted" in old.stdout + old.stderr, old

    # The shipped hook: systemctl reload nginx.service, allowed by the polkit rule.
    assert ctl_json(cluster, "sign", "peer1", "--wait")["succeeded"]
    deployed = ctl_json(cluster, "deploy", "peer1")
    second = deployed["active_serial_hex"]
    assert second != first and deployed["ok"], deployed
    hook = [r for r in deployed["reloads"] if r["target"].startswith("command")]
    assert hook and hook[0]["ok"] and hook[0]["target"] == "command " + " ".join(HOOK), deployed["reloads"]
    deadline = time.monotonic() + 10
    while served_serial(endpoint, NAME) != second:
        assert time.monotonic() < deadline, f"nginx still serves the old certificate:\n{sd.tail()}"
        time.sleep(0.1)
    assert "signal 1 (SIGHUP) received" in (sd.work / "nginx" / "error.log").read_text()

    # The rule allows that one unit and verb, for that user only.
    for argv in (["restart", "nginx.service"], ["stop", "nginx.service"], ["reload", "dbus.service"],
                 ["start", "acme-coordinator.service"]):
        refused = sd.run([SYSTEMCTL, "--no-ask-password", *argv], as_user=USER, check=False)
        assert refused.returncode != 0 and re.search(r"Access denied|authentication required",
                                                     refused.stderr, re.I), (argv, refused)
    assert sd.run([SYSTEMCTL, "--no-ask-password", "reload", "nginx.service"], as_user="nobody",
                  check=False).returncode != 0
    assert sd.systemctl("is-active", "nginx.service").stdout.strip() == "active"
    # Without the rule the agent's user cannot reload it either (polkitd re-reads its rules on change).
    sd.run(["mv", f"/etc/polkit-1/rules.d/{RULE}", f"/etc/polkit-1/{RULE}.off"])
    deadline = time.monotonic() + 15
    while sd.run(HOOK, as_user=USER, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the reload is still allowed without the polkit rule"
        time.sleep(0.5)
    sd.run(["mv", f"/etc/polkit-1/{RULE}.off", f"/etc/polkit-1/rules.d/{RULE}"])
    deadline = time.monotonic() + 15
    while (back := sd.run(HOOK, as_user=USER, check=False)).returncode != 0:
        assert time.monotonic() < deadline, f"the rule put back does not allow the reload: {back.stderr}"
        time.sleep(0.5)


def test_coordinator_under_the_shipped_unit_is_ready_and_serves(
        setup: tuple[LocalCluster, PrivateSystemd, str, int]) -> None:
    cluster, sd, _, port = setup
    sd.systemctl("start", "acme-coordinator.service")  # Type=notify: returns once READY=1 came
    sd.wait_active("acme-coordinator.service")
    status = sd.main_status("acme-coordinator.service")
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    assert "standby" in sd.systemctl("show", "-p", "StatusText", "--value", "acme-coordinator.service").stdout
    env = {**cluster.ctl_env(), "ACMECTL_COORDINATOR": f"127.0.0.1:{port}"}
    out = subprocess.run([sys.executable, "-m", "clusteracme.ctl", "--json", "peer", "list"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + sd.tail()
    # A read served from etcd by this standby: the same peers the leader lists.
    assert {p["peer_id"] for p in json.loads(out.stdout)["peers"]} == \
        {p["peer_id"] for p in ctl_json(cluster, "peer", "list")["peers"]}


def test_keys_group_under_the_shipped_unit_lets_that_group_read_the_live_key(
        setup: tuple[LocalCluster, PrivateSystemd, str, int]) -> None:
    """``keys.group = "ssl-cert"`` with the drop-in the README gives: a
    member of ssl-cert (nobody, here) reads ``active/privkey.pem`` and
    nothing else; without the drop-in the agent refuses to start, saying why."""
    cluster, sd, _, _ = setup
    try:
        grp.getgrnam("ssl-cert")
    except KeyError:
        pytest.skip("no ssl-cert group on this host (Debian's ssl-cert package)")
    state = "/var/lib/clusteracme-agent"
    live = f"{state}/slots/server/active/privkey.pem"
    sd.run(["sh", "-c", 'printf \'\\n[keys]\\ngroup = "ssl-cert"\\n\' >> /etc/clusteracme/agent.toml'])
    before = sd.log.read_text(errors="replace")
    sd.systemctl("restart", "acme-agent.service")
    deadline = time.monotonic() + 30
    while "is not a member of group 'ssl-cert'" not in sd.log.read_text(errors="replace")[len(before):]:
        assert time.monotonic() < deadline, f"the agent did not refuse keys.group without the group:\n{sd.tail()}"
        time.sleep(0.2)
    assert sd.run(["stat", "-L", "-c", "%G %a", live]).stdout.split() == [USER, "600"]  # nothing changed

    dropin = sd.work / "units" / "acme-agent.service.d"
    dropin.mkdir()
    (dropin / "keys-group.conf").write_text("[Service]\nSupplementaryGroups=ssl-cert\nStateDirectoryMode=0711\n")
    sd.systemctl("daemon-reload")
    sd.systemctl("restart", "acme-agent.service")
    sd.wait_active("acme-agent.service")
    deadline = time.monotonic() + 30
    while sd.run(["stat", "-L", "-c", "%G %a", live]).stdout.split() != ["ssl-cert", "640"]:
        assert time.monotonic() < deadline, f"privkey.pem is not ssl-cert's:\n{sd.tail()}"
        time.sleep(0.2)
    assert sd.run(["stat", "-c", "%G %a", f"{state}/slots/server"]).stdout.split() == ["ssl-cert", "750"]
    assert sd.run(["stat", "-c", "%a", state]).stdout.split() == ["711"]
    _wait_alive(cluster, sd, "peer1")

    def read_as_nobody(path: str, *groups: str) -> bool:
        ids = ["--groups", ",".join(groups)] if groups else ["--clear-groups"]
        nogroup = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
        return sd.run(["setpriv", "--reuid=nobody", f"--regid={nogroup}", *ids, "--inh-caps=-all", "cat", path],
                      check=False).returncode == 0

    assert read_as_nobody(live, "ssl-cert")
    key_store = sd.run(["sh", "-c", f"ls {state}/slots/server/keys/*.key"]).stdout.split()
    assert key_store and not read_as_nobody(key_store[0], "ssl-cert")  # the key store stays the agent's
    assert not read_as_nobody(live)


def test_external_mode_socket_lives_in_the_units_runtime_directory(
        setup: tuple[LocalCluster, PrivateSystemd, str, int]) -> None:
    """``front.mode = "external"`` with ``challenge.socket`` in
    ``/run/clusteracme``: the unit's RuntimeDirectory (0750, the agent's) is
    where the agent may hold it under ProtectSystem=strict."""
    cluster, sd, _, _ = setup
    sd.run(["sed", "-i", "-e", 's/^mode = "redirect"$/mode = "external"/',
            "-e", 's#^\\[challenge\\]$#[challenge]\\nsocket = "/run/clusteracme/challenge.sock"#',
            "/etc/clusteracme/agent.toml"])
    sd.systemctl("restart", "acme-agent.service")
    sd.wait_active("acme-agent.service")
    _wait_alive(cluster, sd, "peer1")
    deadline = time.monotonic() + 30
    while sd.run(["test", "-S", "/run/clusteracme/challenge.sock"], check=False).returncode != 0:
        assert time.monotonic() < deadline, f"no challenge socket:\n{sd.tail()}"
        time.sleep(0.2)
    assert sd.run(["stat", "-c", "%U %a", "/run/clusteracme"]).stdout.split() == [USER, "750"]
    ask = ("import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/clusteracme/challenge.sock'); "
           "s.sendall(b'GET /.well-known/acme-challenge/unknown HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n'); "
           "print(s.recv(100).split()[1].decode())")
    answer = sd.run([_system_python() or "python3", "-c", ask], check=False)
    assert answer.stdout.strip() == "404", (answer, sd.tail())  # the agent's challenge server answers there
