#!/bin/sh
# Users and roles of a MetaStack etcd, then auth on; prints "changed" when it
# changed anything. Idempotent. Usage: ETCDCTL=wrapper etcd-rbac.sh PREFIX
#   root      (certificate CN=root)      role root
#   ms-admin  (certificate, management)  role root: the CLI's admin file
#   ms-agent  (certificate, compute)     role ms-agent: readwrite PREFIX/ only
#   ms-web    (certificate, management)  role ms-web: PREFIX/ and PREFIX-auth/
set -eu
prefix=$1
ctl=${ETCDCTL:?}
changed=""
users=$($ctl user list 2>/dev/null || true)
roles=$($ctl role list 2>/dev/null || true)
has() { printf '%s\n' "$1" | grep -qx "$2"; }
for u in root ms-admin ms-agent ms-web; do
  if ! has "$users" "$u"; then $ctl user add "$u" --no-password >/dev/null; changed=1; fi
done
for r in ms-agent ms-web; do
  if ! has "$roles" "$r"; then $ctl role add "$r" >/dev/null; changed=1; fi
done
grant() {  # role key: grant readwrite on the prefix key/ once
  if ! $ctl role get "$1" | grep -q "\[$2, "; then
    $ctl role grant-permission "$1" --prefix=true readwrite "$2" >/dev/null; changed=1
  fi
}
grant ms-agent "$prefix/"
grant ms-web "$prefix/"
grant ms-web "$prefix-auth/"
for ur in root:root ms-admin:root ms-agent:ms-agent ms-web:ms-web; do
  u=${ur%%:*}; r=${ur#*:}
  if ! $ctl user get "$u" | grep -q "^Roles:.* $r\( \|$\)"; then $ctl user grant-role "$u" "$r" >/dev/null; changed=1; fi
done
# etcd 3.4 has no `auth status`: a login attempt tells whether auth is on.
if $ctl --user metastack-probe:x user list 2>&1 | grep -q "authentication is not enabled"; then
  $ctl auth enable >/dev/null; changed=1
fi
[ -n "$changed" ] && echo changed || echo unchanged
