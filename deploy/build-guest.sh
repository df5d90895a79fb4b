#!/usr/bin/env bash
# Build a tiny bootable MetaStack test guest from Debian packages only.
#
# Usage:  bash deploy/build-guest.sh OUTDIR        (as root, or with sudo)
#
# Outputs in OUTDIR:
#   vmlinuz     the Debian cloud kernel (newest /boot/vmlinuz-*-cloud-amd64)
#   initrd.img  gzip'd newc cpio: busybox-static, /init, virtio_pci+virtio_blk
#               modules (and their deps, from modules.dep, decompressed)
#   disk.raw    32 MiB raw disk, bootable by SeaBIOS (see layout below)
#   cmdline     one line, the kernel command line for direct kernel boot
# If all four exist and are newer than this script, it exits 0 at once (no
# apt, no network). Otherwise it rebuilds all four (a fresh disk.raw, so the
# boot counter restarts at 0). Concurrent runs on one OUTDIR are serialised
# with flock(OUTDIR/.build.lock).
#
# Boot modes (the same disk.raw works with both; attach it as virtio-blk,
# the guest looks for /dev/vda only):
#   direct: qemu -kernel vmlinuz -initrd initrd.img -append "$(cat cmdline)"
#                -drive file=disk.raw,format=raw,if=virtio
#   disk:   qemu -drive file=disk.raw,format=raw,if=virtio   (SeaBIOS boots it)
#
# disk.raw layout (512-byte sectors):
#   sector 0                   MBR: syslinux mbr.bin + one partition table entry
#   sectors 2048..63487        partition 1 (1 MiB .. 31 MiB), FAT, active,
#                              syslinux (ldlinux.sys/.c32), syslinux.cfg,
#                              vmlinuz, initrd.img
#   sectors 63488..65535       reserved, in no partition/filesystem (last MiB)
# Boot counter: byte offset 32505856 (= 31 MiB = sector 63488), one 512-byte
#   sector holding ASCII "METASTACK-BOOTS NNNNNNN\n" (7 zero-padded decimal
#   digits) then NUL padding. Anything else there (e.g. all zeros, as built)
#   counts as 0. Read it from the host with:
#     dd if=disk.raw bs=512 skip=63488 count=1 2>/dev/null | head -c 23
#
# Guest behaviour (/init, busybox sh, pid 1): mount proc/sys/devtmpfs, insmod
# the virtio modules, wait up to 10 s for /dev/vda, read the counter, add 1,
# write it back (dd conv=notrunc,fsync + blockdev --flushbufs + sync), then
# print exactly one line on the console (ttyS0):
#     METASTACK-GUEST-UP boot=N
# (with " counter-write-failed" appended if the write failed, e.g. read-only
# disk) and idle forever. Without a disk it prints
#     METASTACK-GUEST-ERROR no /dev/vda
# and idles. The counter is durable on the disk before the UP line appears.
#
# Installs (only if missing, one `apt-get update -qq` first):
#   linux-image-cloud-amd64 busybox-static cpio mtools dosfstools syslinux
#   syslinux-common fdisk (for sfdisk), and xz-utils / zstd only if the
#   kernel's modules are compressed that way.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash $0 OUTDIR" >&2; exit 2
fi
script=$(readlink -f "${BASH_SOURCE[0]}")
out=$1
FILES=(vmlinuz initrd.img disk.raw cmdline)

up_to_date() {
  local f
  for f in "${FILES[@]}"; do
    [ -s "$out/$f" ] && [ "$out/$f" -nt "$script" ] || return 1
  done
}
up_to_date && exit 0

CMDLINE="console=ttyS0 panic=-1 quiet"
DISK_MIB=32
PART_START=2048          # sectors: partition 1 starts at 1 MiB
PART_SECTORS=61440       # 30 MiB: partition 1 ends just below 31 MiB
COUNTER_SECTOR=63488     # 31 MiB = byte 32505856, the last MiB of the disk
WANT_MODULES=(virtio_pci virtio_blk)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
apt_updated=""
ensure_pkgs() {
  local p missing=()
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [ "${#missing[@]}" -eq 0 ] && return 0
  echo "build-guest: installing Debian packages: ${missing[*]}" >&2
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq >/dev/null; apt_updated=1; fi
  local log; log=$(mktemp)
  if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
      "${missing[@]}" >"$log" 2>&1; then
    tail -40 "$log" >&2; echo "build-guest: apt-get install failed (log: $log)" >&2; exit 1
  fi
  rm -f "$log"
}

# A cloud kernel that is already there is fine; else install the meta-package.
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || ensure_pkgs linux-image-cloud-amd64
ensure_pkgs busybox-static cpio mtools dosfstools syslinux syslinux-common fdisk

mkdir -p "$out"
exec 9>"$out/.build.lock"
flock 9
up_to_date && exit 0     # another run built it while we waited

# Newest cloud kernel that has its modules installed.
kver=""
for k in $(ls /boot/vmlinuz-*-cloud-amd64 | sed 's|^/boot/vmlinuz-||' | sort -rV); do
  if [ -f "/lib/modules/$k/modules.dep" ]; then kver=$k; break; fi
done
[ -n "$kver" ] || { echo "build-guest: no /boot/vmlinuz-*-cloud-amd64 with /lib/modules" >&2; exit 1; }
moddir=/lib/modules/$kver

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# ---- modules: WANT_MODULES and their deps, in load order -------------------
# modules.dep lines are "path: dep1 dep2 ..."; loading the deps in reverse
# list order, then the module, is what modprobe does.
declare -A seen=()
order=()
modpath() {   # module name -> path relative to $moddir (accepts - or _)
  local n=${1//-/_} p
  while IFS= read -r p; do
    local b=${p##*/}; b=${b%%.ko*}
    if [ "${b//-/_}" = "$n" ]; then echo "$p"; return 0; fi
  done < <(cut -d: -f1 "$moddir/modules.dep")
  return 1
}
add_module() {
  local rel deps i
  rel=$(modpath "$1") || { echo "build-guest: module $1 not found in $kver (built in?)" >&2; return 0; }
  [ -n "${seen[$rel]:-}" ] && return 0
  read -r -a deps <<<"$(grep -m1 "^$rel:" "$moddir/modules.dep" | cut -d: -f2-)"
  for ((i=${#deps[@]}-1; i>=0; i--)); do
    local d=${deps[$i]}
    [ -n "${seen[$d]:-}" ] && continue
    seen[$d]=1; order+=("$d")
  done
  seen[$rel]=1; order+=("$rel")
}
for m in "${WANT_MODULES[@]}"; do add_module "$m"; done
for rel in "${order[@]}"; do
  case $rel in
    *.ko.xz) ensure_pkgs xz-utils ;;
    *.ko.zst) ensure_pkgs zstd ;;
  esac
done

# ---- initramfs -----------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,dev,proc,sys,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do
  [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
done
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
: >"$root/etc/modules.order"
for rel in "${order[@]}"; do
  b=${rel##*/}; b=${b%%.ko*}.ko
  case $rel in
    *.ko.xz)  xz -dc "$moddir/$rel" >"$root/lib/modules/$b" ;;
    *.ko.zst) zstd -qdc "$moddir/$rel" >"$root/lib/modules/$b" ;;
    *.ko.gz)  gzip -dc "$moddir/$rel" >"$root/lib/modules/$b" ;;
    *)        cp "$moddir/$rel" "$root/lib/modules/$b" ;;
  esac
  echo "$b" >>"$root/etc/modules.order"
done

cat >"$root/init" <<EOF
#!/bin/sh
# MetaStack test guest init (built by deploy/build-guest.sh, kernel $kver).
export PATH=/bin
COUNTER_SECTOR=$COUNTER_SECTOR
EOF
cat >>"$root/init" <<'EOF'
MAGIC="METASTACK-BOOTS "
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/modules.order); do
  insmod "/lib/modules/$m" || echo "metastack-init: insmod $m failed"
done
dev=/dev/vda
i=0
while [ ! -b "$dev" ] && [ "$i" -lt 100 ]; do usleep 100000; i=$((i + 1)); done
if [ ! -b "$dev" ]; then
  echo "METASTACK-GUEST-ERROR no $dev"
else
  rec=$(dd if="$dev" bs=512 skip="$COUNTER_SECTOR" count=1 2>/dev/null | head -c 23 | tr -d '\000')
  n=0
  case "$rec" in
    "$MAGIC"[0-9][0-9][0-9][0-9][0-9][0-9][0-9])
      n=$(echo "${rec#"$MAGIC"}" | sed 's/^0*//'); n=${n:-0} ;;
  esac
  n=$((n + 1))
  note=""
  if printf '%s%07d\n' "$MAGIC" "$n" \
      | dd of="$dev" bs=512 seek="$COUNTER_SECTOR" count=1 conv=sync,notrunc,fsync 2>/dev/null; then
    blockdev --flushbufs "$dev" 2>/dev/null
    sync
  else
    note=" counter-write-failed"
  fi
  echo "METASTACK-GUEST-UP boot=$n$note"
fi
while true; do sleep 3600; done
EOF
chmod 755 "$root/init"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) \
  | gzip -9n >"$tmp/initrd.img"

cp "/boot/vmlinuz-$kver" "$tmp/vmlinuz"
echo "$CMDLINE" >"$tmp/cmdline"

# ---- disk ----------------------------------------------------------------
disk=$tmp/disk.raw
off=$((PART_START * 512))
truncate -s "${DISK_MIB}M" "$disk"
printf 'label: dos\nlabel-id: 0x4d535447\nstart=%d, size=%d, type=c, bootable\n' \
  "$PART_START" "$PART_SECTORS" \
  | sfdisk --quiet --no-reread --no-tell-kernel "$disk" >/dev/null
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
# (mkfs.fat warns "block count mismatch": the image is larger than the FAT
# on purpose; only its output on failure matters.)
if ! o=$(mkfs.fat --offset "$PART_START" -h "$PART_START" -n METASTACK -i 4d535447 \
    "$disk" $((PART_SECTORS / 2)) 2>&1); then
  echo "$o" >&2; echo "build-guest: mkfs.fat failed" >&2; exit 1
fi
syslinux --install --offset "$off" "$disk"
cat >"$tmp/syslinux.cfg" <<EOF
DEFAULT metastack
PROMPT 0
TIMEOUT 0
LABEL metastack
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND $CMDLINE
EOF
export MTOOLS_SKIP_CHECK=1
mcopy -o -i "$disk@@$off" "$tmp/syslinux.cfg" "$tmp/vmlinuz" "$tmp/initrd.img" ::/
# The counter sector must not be covered by the partition: check it.
end=$(sfdisk --dump "$disk" | awk -F'[=,]' '/start=/{print $2 + $4}' | tr -d ' ')
[ "$end" -le "$COUNTER_SECTOR" ] || { echo "build-guest: partition overlaps the counter" >&2; exit 1; }

# Publish: cmdline last, so a complete set is what up_to_date sees.
for f in vmlinuz initrd.img disk.raw cmdline; do mv -f "$tmp/$f" "$out/$f"; done
echo "build-guest: built $out (kernel $kver, modules: ${order[*]##*/})" >&2
