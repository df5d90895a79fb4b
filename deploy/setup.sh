#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for MetaStack development:
# Debian packages (etcd, libvirt, QEMU, Ceph, rsyslog, and what
# deploy/build-guest.sh builds the tiny test guest from; chromium and its
# driver for the web console's browser tests; debootstrap, systemd-nspawn,
# iproute2 and the SSH client for the install testbed, deploy/hostbed.py) and a venv in .venv
# that sees Debian's rados/rbd bindings next to the pip packages, at the
# exact versions of constraints.txt; and .venv-deploy with the deploy tools
# (ansible-core, ansible-lint; also pinned in constraints.txt).
# Usage: bash deploy/setup.sh            (run as root, or with sudo available)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

PKGS=(
  etcd-server etcd-client
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  qemu-system-x86 qemu-block-extra qemu-utils
  ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd
  rsyslog rsyslog-relp openssl systemd
  debootstrap systemd-container iproute2 openssh-client
  busybox-static cpio linux-image-cloud-amd64 mtools dosfstools syslinux syslinux-common fdisk
  python3-venv python3-dev python3-wheel gcc pkg-config
  chromium chromium-driver
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null
  # policy-rc.d keeps packaged daemons (etcd, libvirtd, rsyslog) from being
  # started by their postinst scripts: tests and the demo start their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  aptlog=$(mktemp)
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >"$aptlog" 2>&1; then
    tail -40 "$aptlog" >&2; echo "setup: apt-get install failed (full log: $aptlog)" >&2; exit 1
  fi
  rm -f "$aptlog"
fi

# The venv must be built by Debian's python (the ABI of python3-rados/rbd).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import rados, rbd' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.metastack-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade "pip<25" >/dev/null 2>&1 || true
  .venv/bin/pip install -q -c constraints.txt -e '.[test]' 2>&1 | grep -v "^WARNING: Location\|DEPRECATION: Legacy editable" || true
  .venv/bin/python -c 'import etcd3, click, libvirt, pytest, hypothesis, aiohttp, selenium' || { echo "setup: pip install failed" >&2; exit 1; }
  touch "$stamp"
fi
.venv/bin/python -c 'import etcd3, libvirt, click, rados, rbd, aiohttp, selenium' \
  || { echo "setup: the venv cannot import its dependencies" >&2; exit 1; }

# Deploy tools in their own venv (no system site packages: ansible-lint brings
# many packages of its own), so the runtime venv stays what production runs.
dstamp=.venv-deploy/.metastack-installed
if [ ! -f "$dstamp" ] || [ constraints.txt -nt "$dstamp" ] || ! .venv-deploy/bin/ansible-playbook --version >/dev/null 2>&1; then
  [ -x .venv-deploy/bin/python ] || /usr/bin/python3 -m venv .venv-deploy
  .venv-deploy/bin/pip install -q --upgrade "pip<25" >/dev/null 2>&1 || true
  .venv-deploy/bin/pip install -q -c constraints.txt ansible-core ansible-lint wheel 2>&1 | grep -v "^WARNING: Location" || true
  .venv-deploy/bin/ansible-playbook --version >/dev/null && .venv-deploy/bin/ansible-lint --version >/dev/null \
    || { echo "setup: installing ansible-core/ansible-lint failed" >&2; exit 1; }
  touch "$dstamp"
fi
echo "setup: ready (.venv, .venv-deploy)"
