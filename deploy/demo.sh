#!/usr/bin/env bash
# All-in-one demo cluster on this machine: a private etcd, a central rsyslog,
# a single-node Ceph (memstore), libvirtd (started unless one runs), and three
# agents with distinct node names sharing that libvirtd, booting real QEMU
# guests (KVM if it really works here, TCG otherwise) from RBD clones of a
# tiny guest image built from Debian packages.
#   bash deploy/demo.sh        set up (idempotent) and start; prints how to use it
#   bash deploy/demo.sh down   stop everything it started (by pid files) and
#                              remove its state (Ceph's memstore keeps nothing)
# State lives in .demo/ in the checkout; the guest build in .cache/guest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
demo="$here/.demo"
PY="$here/.venv/bin/python"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM, wait up to 20 s, then SIGKILL
  local f=$1 name=$2 pid
  if alive "$f"; then
    pid=$(cat "$f")
    kill -TERM "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; echo "demo: $name did not stop, killed"; fi
    echo "demo: stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

down() {
  stop_pid "$demo/web.pid" "web console"
  for n in 1 2 3; do stop_pid "$demo/agent$n.pid" "agent node$n"; done  # agents drain: guests stop
  for n in 1 2 3; do stop_pid "$demo/state-node$n/watchdog-node$n.pid" "watchdog of node$n"; done  # drained: disarmed
  if [ -f "$demo/libvirtd/supervisor.pid" ]; then "$PY" deploy/libvirtd.py stop "$demo/libvirtd"; fi
  if [ -d "$demo/ceph" ]; then "$PY" deploy/cephdev.py stop "$demo/ceph"; fi
  stop_pid "$demo/etcd.pid" etcd
  stop_pid "$demo/rsyslog.pid" rsyslogd
  rm -rf "$demo"
  echo "demo: down, state removed"
}

if [ "${1:-up}" = "down" ]; then
  if [ -d "$demo" ]; then down; else echo "demo: nothing to stop"; fi
  exit 0
fi
if [ "${1:-up}" != "up" ]; then echo "usage: bash deploy/demo.sh [up|down]" >&2; exit 2; fi

t0=$(date +%s.%N)
bash deploy/setup.sh
mkdir -p "$demo"
chmod 755 "$demo"  # QEMU (user libvirt-qemu) reads kernels and writes consoles below it
bash deploy/build-guest.sh "$here/.cache/guest" >/dev/null
"$PY" deploy/cephdev.py start "$demo/ceph" --pool metastack >/dev/null
"$PY" deploy/libvirtd.py start "$demo/libvirtd" >/dev/null
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if [ ! -f "$demo/ports" ]; then
  echo "CLIENT=$(free_port) PEER=$(free_port) SYSLOG=$(free_port) WEB=$(free_port)" > "$demo/ports"
fi
# shellcheck disable=SC1091
. "$demo/ports"
WEB=${WEB:-8080}
export CLIENT PEER SYSLOG WEB

if ! alive "$demo/rsyslog.pid"; then
  cat > "$demo/rsyslog.conf" <<CONF
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="$SYSLOG")
\$WorkDirectory $demo
*.* $demo/syslog.log
CONF
  /usr/sbin/rsyslogd -f "$demo/rsyslog.conf" -i "$demo/rsyslog.pid"
  for _ in $(seq 1 50); do alive "$demo/rsyslog.pid" && break; sleep 0.1; done
fi

if ! alive "$demo/etcd.pid"; then
  etcd --name demo --data-dir "$demo/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$CLIENT" --advertise-client-urls "http://127.0.0.1:$CLIENT" \
    --listen-peer-urls "http://127.0.0.1:$PEER" --initial-advertise-peer-urls "http://127.0.0.1:$PEER" \
    --initial-cluster "demo=http://127.0.0.1:$PEER" --log-level warn > "$demo/etcd.log" 2>&1 &
  echo $! > "$demo/etcd.pid"
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$CLIENT" endpoint health >/dev/null 2>&1 && break; sleep 0.1
  done
fi

for n in 1 2 3; do
  cat > "$demo/node$n.ini" <<INI
[etcd]
endpoints = 127.0.0.1:$CLIENT
prefix = /metastack
[node]
name = node$n
state_dir = $demo/state-node$n
vcpus = 2
ram_mb = 1024
[libvirt]
uri = qemu:///system
domain_type = auto
shutdown_timeout = 3
[ceph]
conf = $demo/ceph/ceph.conf
client = admin
keyring = $demo/ceph/ceph.client.admin.keyring
pool = metastack
[agent]
lease_ttl = 5
# The demo's "down" stops the guests with the agents (a real node keeps
# them running across an agent restart: on_stop = keep, the default).
on_stop = drain
[logging]
syslog = udp://127.0.0.1:$SYSLOG
INI
  if ! alive "$demo/agent$n.pid"; then
    "$PY" "$here/metastack.py" -c "$demo/node$n.ini" >> "$demo/node$n.log" 2>&1 &
    echo $! > "$demo/agent$n.pid"
  fi
done

ctl() { "$here/.venv/bin/metastackctl" -c "$demo/node1.ini" "$@"; }
for _ in $(seq 1 300); do  # each agent probes KVM first (up to 10 s)
  [ "$(ctl hosts -o json 2>/dev/null | grep -c '"node"')" = 3 ] && break; sleep 0.1
done
g="$here/.cache/guest"
ctl image list -o json | grep -q '"tiny"' ||
  ctl image import tiny "$g/disk.raw" --kernel "$g/vmlinuz" --initrd "$g/initrd.img" --cmdline "$(cat "$g/cmdline")"
ctl flavour list -o json | grep -q '"tiny"' || ctl flavour create tiny --vcpus 1 --ram-mb 128
ctl flavour list -o json | grep -q '"small"' || ctl flavour create small --vcpus 1 --ram-mb 256
ctl show web1 >/dev/null 2>&1 || ctl create web1 --flavour tiny --image tiny
ctl show db1 >/dev/null 2>&1 || ctl create db1 --flavour small --image tiny
# The web console on this management node, with a demo login.
cat > "$demo/web.ini" <<INI
[etcd]
endpoints = 127.0.0.1:$CLIENT
prefix = /metastack
[web]
listen = 127.0.0.1:$WEB
[ceph]
conf = $demo/ceph/ceph.conf
client = admin
keyring = $demo/ceph/ceph.client.admin.keyring
pool = metastack
INI
ctl user list -o json | grep -q '"demo"' || echo "demo-password" | ctl user add demo --role admin --password-stdin
if ! alive "$demo/web.pid"; then
  "$PY" "$here/metastackweb.py" -c "$demo/web.ini" >> "$demo/web.log" 2>&1 &
  echo $! > "$demo/web.pid"
fi
deadline=$(( $(date +%s) + 120 ))
while :; do
  n=0
  for vm in web1 db1; do ctl console "$vm" 2>/dev/null | grep -q METASTACK-GUEST-UP && n=$((n + 1)); done
  [ "$n" = 2 ] && break
  if [ "$(date +%s)" -ge "$deadline" ]; then echo "demo: WARNING: the guests did not all boot within 120 s" >&2; break; fi
  sleep 0.2
done
t1=$(date +%s.%N)

echo
ctl list
echo
ctl hosts
echo
echo "web1's console:"; ctl console web1 | tail -2
echo
printf "demo: up in %.1f s (etcd 127.0.0.1:%s, central syslog %s)\n" "$("$PY" -c "print($t1 - $t0)")" "$CLIENT" "$demo/syslog.log"
echo "demo: web console at http://127.0.0.1:$WEB/  (log in as demo / demo-password; log: .demo/web.log)"
cat <<USAGE
Try:
  .venv/bin/metastackctl -c .demo/node1.ini create web2 --flavour tiny --image tiny
  .venv/bin/metastackctl -c .demo/node1.ini console web2
  .venv/bin/metastackctl -c .demo/node1.ini list            (-o json for JSON)
  .venv/bin/metastackctl -c .demo/node1.ini stop web1
  .venv/bin/metastackctl -c .demo/node1.ini destroy web2 --yes
  ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:$CLIENT get --prefix /metastack/
  tail -f .demo/syslog.log
  virsh -c qemu:///system list --all          (domains are named VM.NODE)
  rbd -c .demo/ceph/ceph.conf --keyring .demo/ceph/ceph.client.admin.keyring ls metastack
Stop everything:  bash deploy/demo.sh down
USAGE
