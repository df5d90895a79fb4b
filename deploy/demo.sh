#!/usr/bin/env bash
# Local demo cluster: a private etcd, a central rsyslog, three agents on
# simulated libvirt hosts (test:/// driver), flavours and two VMs.
#   bash deploy/demo.sh        set up (idempotent) and start; prints how to use it
#   bash deploy/demo.sh down   stop everything it started (by pid files)
# State lives in .demo/ in the checkout.
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
  for n in 1 2 3; do stop_pid "$demo/agent$n.pid" "agent node$n"; done
  stop_pid "$demo/etcd.pid" etcd
  stop_pid "$demo/rsyslog.pid" rsyslogd
}

if [ "${1:-up}" = "down" ]; then down; exit 0; fi
if [ "${1:-up}" != "up" ]; then echo "usage: bash deploy/demo.sh [up|down]" >&2; exit 2; fi

t0=$(date +%s.%N)
bash deploy/setup.sh
mkdir -p "$demo"
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
if [ ! -f "$demo/ports" ]; then
  echo "CLIENT=$(free_port) PEER=$(free_port) SYSLOG=$(free_port)" > "$demo/ports"
fi
# shellcheck disable=SC1091
. "$demo/ports"
export CLIENT PEER SYSLOG

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
  cat > "$demo/node$n.xml" <<XML
<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>4</active><total>4</total>
       <nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>
  <memory>8388608</memory>
</node>
XML
  cat > "$demo/node$n.ini" <<INI
[etcd]
endpoints = 127.0.0.1:$CLIENT
prefix = /metastack
[node]
name = node$n
state_dir = $demo/state-node$n
[libvirt]
uri = test://$demo/node$n.xml
domain_type = test
[agent]
lease_ttl = 5
[logging]
syslog = udp://127.0.0.1:$SYSLOG
INI
  if ! alive "$demo/agent$n.pid"; then
    "$PY" "$here/metastack.py" -c "$demo/node$n.ini" >> "$demo/node$n.log" 2>&1 &
    echo $! > "$demo/agent$n.pid"
  fi
done

ctl() { "$here/.venv/bin/metastackctl" -c "$demo/node1.ini" "$@"; }
for _ in $(seq 1 100); do
  [ "$(ctl hosts -o json 2>/dev/null | grep -c '"node"')" = 3 ] && break; sleep 0.1
done
ctl flavour list -o json | grep -q '"small"' || ctl flavour create small --vcpus 1 --ram-mb 512
ctl flavour list -o json | grep -q '"medium"' || ctl flavour create medium --vcpus 2 --ram-mb 2048
ctl flavour list -o json | grep -q '"large"' || ctl flavour create large --vcpus 4 --ram-mb 4096
ctl show web1 >/dev/null 2>&1 || ctl create web1 --flavour small
ctl show db1 >/dev/null 2>&1 || ctl create db1 --flavour medium
for _ in $(seq 1 100); do
  [ "$(ctl list -o json | grep -c '"state": "running"')" -ge 2 ] && break; sleep 0.1
done
t1=$(date +%s.%N)

echo
ctl list
echo
ctl hosts
echo
printf "demo: up in %.1f s (etcd 127.0.0.1:%s, central syslog %s)\n" "$("$PY" -c "print($t1 - $t0)")" "$CLIENT" "$demo/syslog.log"
cat <<USAGE
Try:
  .venv/bin/metastackctl -c .demo/node1.ini create web2 --flavour small
  .venv/bin/metastackctl -c .demo/node1.ini list            (-o json for JSON)
  .venv/bin/metastackctl -c .demo/node1.ini stop web1
  .venv/bin/metastackctl -c .demo/node1.ini destroy web2 --yes
  ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:$CLIENT get --prefix /metastack/
  tail -f .demo/syslog.log
Stop everything:  bash deploy/demo.sh down
USAGE
