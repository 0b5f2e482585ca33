#!/usr/bin/env bash
# Sets up a clusteracme node: the system user `clusteracme`, a venv at
# PREFIX/venv holding the package, /etc/clusteracme with the example configs,
# the agent's state directory, the systemd units (ExecStart= in PREFIX/venv),
# the polkit rule for the agent's nginx reload and the README the units'
# Documentation= points at; then it prints what is left to do (keys, configs,
# systemctl enable). Running it again changes nothing unless the package
# changed; an existing config is never touched (the shipped one is kept next
# to it as NAME.example). It starts and restarts nothing: after an upgrade,
# the steps it prints begin with the restart of the units that are running.
#
#   install.sh --role agent|coordinator|both [--prefix DIR] [--wheel FILE]
#              [--python PYTHON] [--no-user]
#
# Where the package comes from: --wheel FILE; else the source checkout this
# script is in (a wheel is built from a copy of its SHIPPED parts, so the
# checkout is left as it was); else, when this is the copy inside an
# installed package, that package, if it is installed in PREFIX/venv
# (`python -m clusteracme.deploy install ...` runs it). The venv's pip reads PIP_* from the environment:
# PIP_INDEX_URL for a mirror, PIP_NO_INDEX=1 with PIP_FIND_LINKS=DIR for a
# node without network. The dependencies are installed before the package
# replaces the one in the venv: when pip cannot have them, the venv's
# package is left as it was.
#
# DESTDIR=DIR stages the whole tree under DIR (packaging, tests): no user, no
# chown (this host's ids mean nothing there), no systemctl, and the venv's
# scripts name PREFIX/venv, not DIR/PREFIX/venv. The staged venv runs on the
# python it was made with: the target needs the same one at the same path.
set -euo pipefail
umask 022
export PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

NAME=clusteracme
DEFAULT_PREFIX=/opt/clusteracme   # what the shipped units name
PREFIX=$DEFAULT_PREFIX
ROLE=
WHEEL=
PYTHON=python3
MAKE_USER=1
# What the wheel is made of, in a source checkout: pyproject's package-dir
# folders, pyproject.toml and its readme (tests/unit/test_packaging.py).
SHIPPED=(clusteracme coordinator peer_agent deploy pyproject.toml README.md)
UNITS=(acme-coordinator.service acme-agent.service)

usage() {
  cat <<EOF
usage: install.sh --role agent|coordinator|both [--prefix DIR] [--wheel FILE] [--python PYTHON] [--no-user]
  --role      which daemon(s) this node runs
  --prefix    where the venv goes (default $DEFAULT_PREFIX; the units follow it)
  --wheel     install this wheel (default: build one from the source checkout around this script)
  --python    the python the venv is made with (default python3; 3.11 or later)
  --no-user   do not create the user $NAME (it exists already, e.g. from LDAP)
  DESTDIR=DIR in the environment stages everything under DIR instead of /
EOF
}
bad() { echo "install.sh: $*" >&2; exit 2; }    # the command line is wrong; nothing was changed
fail() { echo "install.sh: $*" >&2; exit 1; }

while (($#)); do
  arg=$1
  shift
  case $arg in
    --prefix=* | --role=* | --wheel=* | --python=*)
      set -- "${arg%%=*}" "${arg#*=}" "$@"
      continue
      ;;
    --prefix | --role | --wheel | --python)
      (($#)) || bad "$arg needs a value (see --help)"
      case $arg in
        --prefix) PREFIX=$1 ;;
        --role) ROLE=$1 ;;
        --wheel) WHEEL=$1 ;;
        --python) PYTHON=$1 ;;
      esac
      shift
      ;;
    --no-user) MAKE_USER=0 ;;
    -h | --help) usage; exit 0 ;;
    *) bad "unknown argument '$arg' (see --help)" ;;
  esac
done

# --- check everything before changing anything -------------------------------
case $ROLE in
  agent | coordinator | both) ;;
  "") bad "--role agent|coordinator|both is required" ;;
  *) bad "--role must be agent, coordinator or both, not '$ROLE'" ;;
esac
PREFIX=${PREFIX%/}
# It goes into the units' ExecStart= as it is: an absolute path, nothing to quote.
[[ $PREFIX =~ ^(/[A-Za-z0-9_+-][A-Za-z0-9._+-]*)+$ ]] ||
  bad "--prefix must be an absolute path of letters, digits and ._+- (got '$PREFIX')"
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
if [[ -n $DESTDIR ]]; then
  [[ $DESTDIR == /* ]] || bad "DESTDIR must be an absolute path (got '$DESTDIR')"
elif ((EUID != 0)); then
  fail "run as root (or stage the tree into a directory with DESTDIR=DIR)"
fi
PYTHON_BIN=$(command -v -- "$PYTHON") || bad "--python: '$PYTHON' is not a command"
"$PYTHON_BIN" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
  bad "--python: $PYTHON_BIN is not python 3.11 or later"
wheel_id() { # WHEEL: a wheel is known by its RECORD (every file's hash), so one
  # rebuilt from the same sources is the same, whatever its zip timestamps.
  "$PYTHON_BIN" -I -B - "$1" <<'EOF'
import hashlib, sys, zipfile
try:
    with zipfile.ZipFile(sys.argv[1]) as z:
        record = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
        lines = sorted(z.read(record[0]).decode().splitlines()) if len(record) == 1 else None
except (OSError, zipfile.BadZipFile) as exc:
    sys.exit(f"install.sh: --wheel: {sys.argv[1]} is not a wheel ({exc})")
if lines is None:
    sys.exit(f"install.sh: --wheel: {sys.argv[1]} is not a wheel (no single .dist-info/RECORD)")
print(hashlib.sha256("\n".join(lines).encode()).hexdigest())
EOF
}
if [[ -n $WHEEL ]]; then
  [[ -f $WHEEL && -r $WHEEL ]] || bad "--wheel: $WHEEL is not a readable file"
  [[ $(basename -- "$WHEEL") == "$NAME"-*.whl ]] || bad "--wheel: $WHEEL is not a $NAME wheel ($NAME-VERSION-...whl)"
  WHEEL=$(readlink -f -- "$WHEEL")
  WHEEL_ID=$(wheel_id "$WHEEL") || exit 2
fi

HERE=$(cd -- "$(dirname -- "$(readlink -f -- "${BASH_SOURCE[0]}")")" && pwd)
VENV=$PREFIX/venv      # on the node
DVENV=$DESTDIR$VENV    # where this run writes it
if [[ -n $WHEEL ]]; then
  SOURCE="wheel $WHEEL"
elif [[ -f $HERE/../pyproject.toml && -d $HERE/../coordinator ]]; then
  SOURCE="checkout $(cd -- "$HERE/.." && pwd)"
elif [[ $HERE == "$(readlink -m -- "$DVENV")"/* ]]; then
  SOURCE="venv"
else
  bad "this install.sh belongs to a package installed outside $DVENV: give --wheel FILE"
fi
if [[ ! -e $DVENV/bin/python ]]; then
  "$PYTHON_BIN" -c 'import ensurepip, venv' 2>/dev/null ||
    fail "$PYTHON_BIN cannot make a venv with pip (Debian: apt-get install python3-venv)"
fi

changes=0
PACKAGE_CHANGED=0
did() { echo "  $*"; changes=$((changes + 1)); }
TMP=$(mktemp -d)
trap 'rm -rf -- "$TMP"' EXIT

echo "installing clusteracme ($ROLE) into ${DESTDIR:+$DESTDIR}$PREFIX from ${SOURCE%% *}"

# --- the user ----------------------------------------------------------------
if [[ -n $DESTDIR ]]; then
  echo "DESTDIR=$DESTDIR: no user created and no owner set (create the user $NAME on the node)"
elif ((MAKE_USER == 0)); then
  echo "--no-user: the user $NAME is not created"
else
  if ! getent group "$NAME" >/dev/null; then
    groupadd --system "$NAME"
    did "created the system group $NAME"
  fi
  if ! getent passwd "$NAME" >/dev/null; then
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --gid "$NAME" --no-create-home --home-dir /nonexistent --shell "$nologin" \
      --comment "clusteracme daemons" "$NAME"
    did "created the system user $NAME"
  fi
fi
CHOWN=0
if [[ -z $DESTDIR ]]; then
  if getent group "$NAME" >/dev/null && getent passwd "$NAME" >/dev/null; then
    CHOWN=1
  else
    echo "warning: there is no user or group $NAME: files stay root's; create them and run again" >&2
  fi
fi

# --- files: written only when their content differs; modes and owners set ---
own() { # OWNER PATH
  if ((CHOWN)); then chown -h -- "$1" "$2"; fi
}
ensure_dir() { # MODE OWNER PATH: created when missing, with MODE and OWNER;
  # one that exists is left as it is (PREFIX=/usr/local, share/: not ours)
  local path=$DESTDIR$3
  if [[ ! -d $path ]]; then
    mkdir -p -- "$path"
    chmod -- "$1" "$path"
    own "$2" "$path"
    did "$3/"
  fi
}
own_dir() { # MODE OWNER PATH: a directory of clusteracme's own: created when
  # missing; its mode and owner set every time
  ensure_dir "$@"
  chmod -- "$1" "$DESTDIR$3"
  own "$2" "$DESTDIR$3"
}
put() { # MODE OWNER SOURCE PATH
  local path=$DESTDIR$4 tmp
  [[ ! -L $path ]] || fail "$path is a symbolic link; replace it with a file (or remove it) and run again"
  if ! cmp -s -- "$3" "$path"; then
    mkdir -p -- "$(dirname -- "$path")"
    tmp=$(mktemp -- "$path.XXXXXX")
    cat -- "$3" >"$tmp"
    chmod -- "$1" "$tmp"
    own "$2" "$tmp"
    mv -fT -- "$tmp" "$path"
    did "$4"
  fi
  chmod -- "$1" "$path"
  own "$2" "$path"
}

# --- the venv and the package ------------------------------------------------
ensure_dir 0755 root:root "$PREFIX"
if [[ ! -e $DVENV/bin/python ]]; then
  "$PYTHON_BIN" -m venv -- "$DVENV"
  did "$VENV/ (a venv of $("$DVENV/bin/python" -c 'import sys; print(sys.executable.split("/")[-1], sys.version.split()[0])'))"
fi
"$DVENV/bin/python" -c '' 2>/dev/null ||
  fail "$DVENV/bin/python does not run (was the python it was made with removed?): remove $DVENV and run again"

case $SOURCE in
  checkout*)
    # Built from a copy: a build in the checkout leaves build/ and *.egg-info
    # there (root's), and a stale build/lib would ship modules since removed.
    # A copy of the SHIPPED parts alone, their regular files: whatever else a
    # working tree holds (a venv, logs being written, sockets, files coming
    # and going) has no part in the wheel, and tar fails on a file that
    # changes while it reads it. A file gone since it was listed is skipped.
    src=${SOURCE#checkout }
    mkdir "$TMP/src"
    "$PYTHON_BIN" -I -B - "$src" "$TMP/src" "${SHIPPED[@]}" <<'PY' || fail "copying the sources from $src failed"
import os, shutil, sys
src, dest, parts = sys.argv[1], sys.argv[2], sys.argv[3:]
def skipped(name):
    return name.startswith(".") or name == "__pycache__" or name.endswith((".pyc", ".egg-info"))
for part in parts:
    top = os.path.join(src, part)
    if os.path.isfile(top):
        shutil.copy2(top, os.path.join(dest, part))
        continue
    if not os.path.isdir(top):
        sys.exit(f"install.sh: {top} is missing: {src} is not a whole clusteracme checkout")
    for directory, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if not skipped(d)]
        target = os.path.join(dest, os.path.relpath(directory, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            path = os.path.join(directory, name)
            if skipped(name) or not os.path.isfile(path):  # a socket, a fifo: nothing to build from
                continue
            try:
                shutil.copy2(path, os.path.join(target, name))
            except FileNotFoundError:
                pass  # gone since it was listed: an editor's temporary file
PY
    # Offline when --python already has setuptools 77+ (a developer's venv),
    # else pip fetches the build requirements into an isolated environment.
    if "$PYTHON_BIN" -I -B -c 'import importlib.metadata as m, sys
sys.exit(int(m.version("setuptools").split(".")[0]) < 77 or int(m.version("pip").split(".")[0]) < 22)' 2>/dev/null; then
      builder=("$PYTHON_BIN" -m pip wheel --no-build-isolation)
    else
      builder=("$DVENV/bin/python" -m pip wheel)
    fi
    "${builder[@]}" --quiet --no-deps --wheel-dir "$TMP/dist" "$TMP/src" >&2 ||
      fail "building the wheel from $src failed (pip's messages above)"
    built=("$TMP"/dist/"$NAME"-*.whl)
    WHEEL=${built[0]}
    WHEEL_ID=$(wheel_id "$WHEEL") || fail "pip built no usable wheel from $src"
    ;;
esac
if [[ -n $WHEEL ]]; then
  stamp=$DVENV/$NAME-wheel.sha256
  if [[ ! -f $stamp || $(<"$stamp") != "$WHEEL_ID" ]]; then
    # What the package depends on first, with the package when its version
    # differs: pip resolves and fetches everything before it installs
    # anything, and installs a dependency before what needs it. When a
    # dependency cannot be had (offline, a mirror without it) the package in
    # the venv is not replaced: no new code without what it needs.
    "$DVENV/bin/python" -m pip install --quiet "$WHEEL" >&2 ||
      fail "pip could not install $(basename -- "$WHEEL") with its dependencies (its messages above):" \
        "the package in $VENV was not replaced. Without network: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR," \
        "DIR holding what 'pip download -d DIR $(basename -- "$WHEEL")' fetches elsewhere"
    # Then the package itself, even at the same version number (a rebuilt
    # wheel, which pip left alone above); its dependencies are all there.
    "$DVENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$WHEEL" >&2 ||
      fail "pip could not reinstall $(basename -- "$WHEEL") (its messages above)"
    echo "$WHEEL_ID" >"$stamp"
    did "$VENV/: $(basename -- "$WHEEL")"
    PACKAGE_CHANGED=1
  fi
fi
if [[ -n $DESTDIR ]]; then
  # The venv was made at DESTDIR/PREFIX/venv: its scripts' #! lines and
  # activate scripts name that path; on the node it is PREFIX/venv.
  relocated=$("$DVENV/bin/python" -I -B - "$DVENV" "$VENV" <<'EOF'
import sys
from pathlib import Path
staged, final = sys.argv[1], sys.argv[2]
for path in sorted([*Path(staged, "bin").iterdir(), Path(staged, "pyvenv.cfg")]):
    if path.is_symlink() or not path.is_file():
        continue
    data = path.read_bytes()
    if staged.encode() in data:
        path.write_bytes(data.replace(staged.encode(), final.encode()))
        print(path.relative_to(staged))
EOF
  )
  if [[ -n $relocated ]]; then
    did "$VENV/: $(wc -w <<<"$relocated") files made to name $VENV (bin/*, pyvenv.cfg)"
  fi
fi

# The assets of the package now in the venv (the units match its code).
ASSETS=$("$DVENV/bin/python" -I -B -c 'import clusteracme.deploy as d; print(d.ASSETS)') ||
  fail "$DVENV does not hold the clusteracme package (give --wheel FILE)"
[[ -f $ASSETS/systemd/acme-agent.service ]] ||
  fail "$ASSETS has no systemd/acme-agent.service: the package lacks its deploy assets"
ASSETS_ON_NODE=$ASSETS
[[ -z $DESTDIR ]] || ASSETS_ON_NODE=${ASSETS#"$(readlink -m -- "$DESTDIR")"}

"$DVENV/bin/python" -I -B -c 'import importlib.metadata as m; d = m.metadata("clusteracme"); print(d.get_payload() or d["Description"] or "")' \
  >"$TMP/README.md"
ensure_dir 0755 root:root "$PREFIX/share"
ensure_dir 0755 root:root "$PREFIX/share/doc"
own_dir 0755 root:root "$PREFIX/share/doc/$NAME"
put 0644 root:root "$TMP/README.md" "$PREFIX/share/doc/$NAME/README.md"

# --- /etc/clusteracme ----------------------------------------------------------
ETC=/etc/$NAME
own_dir 0750 "root:$NAME" "$ETC"
own_dir 0750 "root:$NAME" "$ETC/pki"
roles=()
[[ $ROLE == coordinator || $ROLE == both ]] && roles+=(coordinator)
[[ $ROLE == agent || $ROLE == both ]] && roles+=(agent)
for role in "${roles[@]}"; do
  put 0640 "root:$NAME" "$ASSETS/config/$role.toml" "$ETC/$role.toml.example"
  if [[ ! -e $DESTDIR$ETC/$role.toml ]]; then
    put 0640 "root:$NAME" "$ASSETS/config/$role.toml" "$ETC/$role.toml"
  fi
done
if [[ $ROLE != agent ]]; then
  own_dir 0750 "root:$NAME" "$ETC/etcd"   # the etcd client pair coordinator.toml names
fi
if [[ $ROLE != coordinator ]]; then
  # The unit's StateDirectory= (systemd makes it too, at the first start,
  # and sees to its owner at every start): made when missing, else left alone.
  ensure_dir 0700 "$NAME:$NAME" "/var/lib/$NAME-agent"
  # The agent's user may reload nginx.service through systemd, nothing else.
  [[ -n $DESTDIR || -x /usr/lib/polkit-1/polkitd ]] ||
    echo "note: polkitd is not installed; the nginx reload rule takes effect once it is"
  put 0644 root:root "$ASSETS/systemd/50-clusteracme-nginx-reload.rules" \
    /etc/polkit-1/rules.d/50-clusteracme-nginx-reload.rules
fi

# --- the units ---------------------------------------------------------------
units=()
changed_units=()
units_before=$changes
for role in "${roles[@]}"; do
  unit=acme-$role.service
  sed "s|$DEFAULT_PREFIX/|$PREFIX/|g" "$ASSETS/systemd/$unit" >"$TMP/$unit"
  before=$changes
  put 0644 root:root "$TMP/$unit" "/etc/systemd/system/$unit"
  units+=("$unit")
  [[ $changes == "$before" ]] || changed_units+=("$unit")
done
if [[ -z $DESTDIR && $changes != "$units_before" && -d /run/systemd/system ]]; then
  systemctl daemon-reload
  echo "  (systemctl daemon-reload)"
fi
# A running daemon keeps the code and the unit it started with. The units
# of this venv (either role's: they share it) that are active and whose
# package or unit file changed above are restarted by the operator, when it
# suits the cluster (one coordinator replica, one peer at a time).
restart=()
if [[ -z $DESTDIR && -d /run/systemd/system ]]; then
  for unit in "${UNITS[@]}"; do
    if { ((PACKAGE_CHANGED)) || [[ " ${changed_units[*]} " == *" $unit "* ]]; } &&
      grep -qsF -- "$VENV/bin/" "/etc/systemd/system/$unit" && systemctl is-active --quiet "$unit"; then
      restart+=("$unit")
    fi
  done
fi

if ((changes == 0)); then
  echo "nothing to change: everything was in place"
fi

# --- what is left ------------------------------------------------------------
step=1
next() { # the first line numbered, the others below it
  printf '  %d. %s\n' "$step" "$1"
  shift
  (($# == 0)) || printf '     %s\n' "$@"
  step=$((step + 1))
}
echo
echo "Next steps${DESTDIR:+ (on the node, once the tree is there)}:"
if ((${#restart[@]})); then
  next "restart what still runs the old code or unit (nothing was restarted):" "systemctl restart ${restart[*]}"
fi
if [[ -n $DESTDIR ]]; then
  next "create the user and give it its files:" \
    "useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin $NAME" \
    "chown root:$NAME $ETC $ETC/*/ $ETC/*.toml*" \
    "chown $NAME:$NAME /var/lib/$NAME-agent   (agent)"
fi
next "copy ca.pem and this host's pair (acmectl pki issue ... --out DIR, on the offline CA machine) into $ETC/pki/:" \
  "chown root:$NAME $ETC/pki/*; chmod 0640 $ETC/pki/*"
if [[ $ROLE != agent ]]; then
  next "the account-key secret (the coordinator wants it 0600, its own):" \
    "$VENV/bin/acmectl pki secret $ETC/account-key.secret" \
    "chown $NAME:$NAME $ETC/account-key.secret" \
    "and the etcd client pair and CA in $ETC/etcd/ (0640 root:$NAME)"
  next "edit $ETC/coordinator.toml: name, listen, [tls], [etcd] (README \"Configuration\")"
fi
if [[ $ROLE != coordinator ]]; then
  next "edit $ETC/agent.toml: peer_id, listen, addresses, coordinators, [tls], [front], hooks" \
    "(front.mode = \"external\" behind nginx: $ASSETS_ON_NODE/nginx-acme-challenge.conf)"
fi
next "${DESTDIR:+systemctl daemon-reload; }systemctl enable --now ${units[*]}"
next "acmectl: $VENV/bin/acmectl; the README: $PREFIX/share/doc/$NAME/README.md"
