#!/usr/bin/env bash
# Builds the base root filesystem of the cgroup v2 node kind (hack/cluster,
# NODE=v2): Debian bookworm (debootstrap minbase) with systemd as PID 1, runc,
# the CNI plugins, fio, busybox and iptables from Debian's packages, and
# Debian's 6.1 cloud kernel unpacked into it (dpkg-deb -x: /boot/vmlinuz-REL
# and /lib/modules/REL; never installed on the host).
#
# Usage:
#   hack/v2node/rootfs.sh OUTDIR
#
# Writes OUTDIR/rootfs (the tree), OUTDIR/kernel-release, and OUTDIR/done last;
# with OUTDIR/done present it returns at once. hack/cluster keys OUTDIR by
# this script's contents and adds the Kubernetes and containerd binaries, the
# configuration and the guest agent on top (vmimage.go). Needs root,
# debootstrap and apt (the Debian mirror is the host's own apt source).
set -euo pipefail

PACKAGES=systemd,systemd-sysv,dbus,udev,runc,containernetworking-plugins,iproute2,busybox-static,fio,kmod,iptables,util-linux,mount,e2fsprogs,procps

log() { printf '[v2node-rootfs] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2; }
mkdir -p "$1"
OUTDIR="$(cd "$1" && pwd)"
if [[ -e "${OUTDIR}/done" ]]; then
  log "base root filesystem already in ${OUTDIR}"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot)"
command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install --no-install-recommends debootstrap"

# The host's Debian mirror (deb822 .sources or a one-line sources.list).
mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e "$f" ]] || continue
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f"
  done
  if [[ -e /etc/apt/sources.list ]]; then
    awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list
  fi
}
MIRROR="$(mirror | head -n1 || true)"
[[ -n "${MIRROR}" ]] || die "no Debian mirror in the host's apt sources"

# The newest linux-image-6.1.0-N-cloud-amd64 apt offers (as hack/vm-kernel.sh picks it).
pick_kernel() {
  local name
  for name in $(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V -r); do
    if [[ "$(apt-cache policy "${name}")" == *"Candidate: "[0-9]* ]]; then echo "${name}"; return; fi
  done
}
KPKG="${KDG_VM_KERNEL_PKG:-$(pick_kernel)}"
if [[ -z "${KPKG}" ]]; then apt-get update -qq >/dev/null; KPKG="$(pick_kernel)"; fi
[[ -n "${KPKG}" ]] || die "apt offers no linux-image-6.1.0-*-cloud-amd64"
RELEASE="${KPKG#linux-image-}"

# A finished debootstrap in WORK is kept when a later step fails (it takes
# minutes): a rerun starts from it.
WORK="${OUTDIR}/.work"
ROOT="${WORK}/rootfs"
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:${PATH}"
if [[ ! -e "${WORK}/debootstrap.done" ]]; then
  rm -rf "${WORK}"
  mkdir -p "${WORK}"
  log "debootstrap --variant=minbase bookworm (+ ${PACKAGES}) from the host's mirror"
  debootstrap --variant=minbase --include="${PACKAGES}" bookworm "${ROOT}" "${MIRROR}" >"${WORK}/debootstrap.log" 2>&1 ||
    { tail -n 30 "${WORK}/debootstrap.log" >&2; die "debootstrap failed"; }
  touch "${WORK}/debootstrap.done"
fi
rm -f "${WORK}"/*.deb

log "kernel ${KPKG}, unpacked into the root filesystem"
(cd "${WORK}" && apt-get download -qq "${KPKG}" >/dev/null 2> >(grep -v unsandboxed >&2)) || die "apt-get download ${KPKG} failed"
# Unpacked beside the tree and copied in: extracting over it would replace
# the usr-merged /lib symlink with a directory.
rm -rf "${WORK}/kernel"
dpkg-deb -x "${WORK}"/"${KPKG}"_*.deb "${WORK}/kernel"
cp -a "${WORK}/kernel/boot/." "${ROOT}/boot/"
mkdir -p "${ROOT}/lib/modules"
cp -a "${WORK}/kernel/lib/modules/." "${ROOT}/lib/modules/"
# Compressed modules are unpacked so that the initrd's busybox insmod loads them.
find "${ROOT}/lib/modules/${RELEASE}" -name '*.ko.xz' -exec xz -d {} +
chroot "${ROOT}" /sbin/depmod "${RELEASE}"

log "configuring"
echo v2node >"${ROOT}/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 v2node\n' >"${ROOT}/etc/hosts"
: >"${ROOT}/etc/resolv.conf"
printf '/dev/vda / ext4 rw,noatime 0 1\n' >"${ROOT}/etc/fstab"
mkdir -p "${ROOT}/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n' >"${ROOT}/etc/systemd/journald.conf.d/volatile.conf"
# Nothing on the serial console but the kernel; no timers, no network waits.
for u in getty@tty1.service serial-getty@ttyS0.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer fstrim.timer systemd-networkd-wait-online.service; do
  ln -sf /dev/null "${ROOT}/etc/systemd/system/${u}"
done
passwd -R "${ROOT}" -d root >/dev/null
rm -rf "${ROOT}/var/cache/apt/archives/"*.deb "${ROOT}/var/lib/apt/lists/"*

echo "${RELEASE}" >"${WORK}/kernel-release"
rm -rf "${OUTDIR}/rootfs"
mv "${ROOT}" "${OUTDIR}/rootfs"
mv "${WORK}/kernel-release" "${OUTDIR}/kernel-release"
rm -rf "${WORK}"
date -u +%FT%TZ >"${OUTDIR}/done"
log "base root filesystem (kernel ${RELEASE}) ready in ${OUTDIR}"
