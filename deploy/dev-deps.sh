#!/usr/bin/env bash
# Installs the system packages `make demo` and `make test` need, when missing:
# etcd (Debian: etcd-server), pebble + pebble-challtestsrv (Debian: pebble),
# nginx (a real web server the deploy tests reload), iproute2 (`ip netns`: the
# dual-stack local cluster runs in a network namespace), the venv module
# for python3, and systemd + polkitd + dbus-daemon (the shipped units are
# checked with systemd-analyze, and run by a private systemd, the nginx
# reload going through the shipped polkit rule: tests/unit/test_units.py,
# tests/integration/test_unprivileged_reload.py). Uses apt-get; runs it
# through sudo when not root. Idempotent: does nothing when everything is
# present.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
{ command -v pebble >/dev/null 2>&1 && command -v pebble-challtestsrv >/dev/null 2>&1; } || need+=(pebble)
{ command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]]; } || need+=(nginx-light)
{ command -v ip >/dev/null 2>&1 || [[ -x /usr/sbin/ip ]] || [[ -x /sbin/ip ]]; } || need+=(iproute2)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
{ command -v systemd-analyze >/dev/null 2>&1 && [[ -x /lib/systemd/systemd ]]; } || need+=(systemd)
[[ -x /usr/lib/polkit-1/polkitd ]] || need+=(polkitd)
# Headless Chromium and its WebDriver, from Debian: tests/integration/test_web.py
# drives the status page in a real browser through Selenium with these paths
# (a browser downloaded by selenium-manager or Playwright cannot work offline).
[[ -x /usr/bin/chromium ]] || need+=(chromium)
[[ -x /usr/bin/chromedriver ]] || need+=(chromium-driver)
{ command -v dbus-daemon >/dev/null 2>&1 || [[ -x /usr/bin/dbus-daemon ]]; } || need+=(dbus-daemon)
# promtool (Debian ships it in the prometheus package): the shipped alert rules
# are checked and unit-tested with `promtool check rules` / `promtool test
# rules` (tests/unit/test_alerts.py). The server itself is not used.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# bash and zsh: tests/unit/test_ctl_completion.py loads `acmectl completion bash|zsh`
# in both shells (bash is always there; zsh is not on a minimal Debian).
command -v zsh >/dev/null 2>&1 || need+=(zsh)

if ((${#need[@]} == 0)); then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing: ${need[*]} -- install them with your package manager (this script knows apt-get only)" >&2
  exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { echo "missing: ${need[*]}; run as root or install sudo" >&2; exit 1; }
  sudo=(sudo)
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# Keep the packages' own services (etcd on :2379, nginx on :80, prometheus on
# :9090) from being started by the install: the tests run their own instances
# on free ports (and need no Prometheus server, only promtool).
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
  "${sudo[@]}" chmod 755 "$policy"
  trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian's etcd-server package enables a system etcd on 127.0.0.1:2379; the
# launcher runs its own on free ports, so the system one is not needed. It
# does not start inside containers without an init system.
