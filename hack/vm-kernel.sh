#!/usr/bin/env bash
# Fetches what the cgroup v2 VM test (applier/cgroup/vm_test.go) boots: a
# Debian 6.1 cloud kernel and its virtio block modules, plus qemu and cpio.
#
# Usage:
#   hack/vm-kernel.sh OUTDIR      e.g. .cache/vm; the test reads it from KDG_VM_DIR
#
# Installs qemu-system-x86 and cpio with apt when they are missing (as root).
# Never installs a linux-image-* package, which would pull in systemd/udev:
# the newest linux-image-6.1.0-N-cloud-amd64 that apt offers is downloaded
# with `apt-get download` and only these files are extracted:
#
#   OUTDIR/vmlinuz                the kernel
#   OUTDIR/modules/NAME.ko        virtio_ring virtio virtio_pci_modern_dev
#                                 virtio_pci_legacy_dev virtio_pci virtio_blk
#                                 (decompressed if the package ships .ko.xz/.zst)
#   OUTDIR/modules/order          those names, in the order to load them
#   OUTDIR/kernel-release         e.g. 6.1.0-56-cloud-amd64 (written last)
#
# Idempotent: with OUTDIR complete it only checks that qemu is installed.
# Set KDG_VM_KERNEL_PKG to pin another package.
set -euo pipefail

MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

log() { printf '[vm-kernel] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $# -eq 1 && -n "$1" && "$1" != -* ]] || { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2; }
mkdir -p "$1"
OUTDIR="$(cd "$1" && pwd)"

APT_UPDATED=
apt_update() {
  if [[ -z "${APT_UPDATED}" ]]; then
    log "apt-get update"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    APT_UPDATED=1
  fi
}

# --- host tools ---------------------------------------------------------------
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v cpio >/dev/null || missing+=(cpio)
if ((${#missing[@]} > 0)); then
  [[ $(id -u) -eq 0 ]] || die "${missing[*]} missing and not root: apt-get install --no-install-recommends ${missing[*]}"
  apt_update
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed"
fi
log "$(qemu-system-x86_64 --version | head -n1)"

complete() {
  [[ -s "${OUTDIR}/kernel-release" && -s "${OUTDIR}/vmlinuz" && -s "${OUTDIR}/modules/order" ]] || return 1
  local m
  for m in "${MODULES[@]}"; do [[ -s "${OUTDIR}/modules/${m}.ko" ]] || return 1; done
}
if complete; then
  log "kernel $(cat "${OUTDIR}/kernel-release") already in ${OUTDIR}"
  exit 0
fi

# --- kernel package -------------------------------------------------------------
# The newest linux-image-6.1.0-N-cloud-amd64 (highest ABI number N) that has a
# candidate version; the "-unsigned" and "-dbg" flavours do not match.
pick_package() {
  local name policy
  for name in $(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | awk '{print $1}' | sort -V -r); do
    policy="$(apt-cache policy "${name}")"
    if [[ "${policy}" == *"Candidate: "[0-9]* ]]; then
      echo "${name}"
      return
    fi
  done
}
PKG="${KDG_VM_KERNEL_PKG:-$(pick_package)}"
if [[ -z "${PKG}" ]]; then
  apt_update
  PKG="$(pick_package)"
fi
[[ -n "${PKG}" ]] || die "apt offers no linux-image-6.1.0-*-cloud-amd64 package (is bookworm in sources.list?)"
RELEASE="${PKG#linux-image-}"
log "kernel package ${PKG} $(apt-cache policy "${PKG}" | sed -n 's/^ *Candidate: //p')"

WORK="$(mktemp -d "${OUTDIR}/.work.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
log "downloading ${PKG}"
# (apt warns that it downloads "unsandboxed as root" into a private dir: harmless.)
download() { (cd "${WORK}" && apt-get download -qq "${PKG}" >/dev/null 2> >(grep -v 'unsandboxed' >&2)); }
if ! download; then
  [[ -z "${APT_UPDATED}" ]] || die "apt-get download ${PKG} failed"
  apt_update # stale package lists
  download || die "apt-get download ${PKG} failed"
fi
DEB="$(ls "${WORK}"/*.deb)"

log "extracting vmlinuz and ${#MODULES[@]} virtio modules"
dpkg-deb --fsys-tarfile "${DEB}" >"${WORK}/fs.tar"
mapfile -t members < <(tar -tf "${WORK}/fs.tar")
wanted=()
for member in "${members[@]}"; do
  case "${member}" in
  ./boot/vmlinuz-*) wanted+=("${member}") ;;
  */kernel/drivers/virtio/*.ko* | */kernel/drivers/block/virtio_blk.ko*) wanted+=("${member}") ;;
  esac
done
tar -xf "${WORK}/fs.tar" -C "${WORK}" "${wanted[@]}"

mkdir -p "${WORK}/out/modules"
cp "${WORK}/boot/vmlinuz-${RELEASE}" "${WORK}/out/vmlinuz" || die "no /boot/vmlinuz-${RELEASE} in ${PKG}"
for m in "${MODULES[@]}"; do
  src="$(find "${WORK}/lib" -name "${m}.ko*" | head -n1)"
  [[ -n "${src}" ]] || die "${PKG} has no ${m}.ko*: is it built in? (grep CONFIG_VIRTIO ${WORK}/boot/config-*)"
  case "${src}" in
  *.ko) cp "${src}" "${WORK}/out/modules/${m}.ko" ;;
  *.ko.xz) xz -dc "${src}" >"${WORK}/out/modules/${m}.ko" ;;
  *.ko.zst) zstd -qdc "${src}" >"${WORK}/out/modules/${m}.ko" ;;
  *.ko.gz) gzip -dc "${src}" >"${WORK}/out/modules/${m}.ko" ;;
  *) die "unknown module format ${src}" ;;
  esac
  log "  ${src#"${WORK}"} -> modules/${m}.ko"
done
printf '%s\n' "${MODULES[@]}" >"${WORK}/out/modules/order"

rm -rf "${OUTDIR}/vmlinuz" "${OUTDIR}/modules" "${OUTDIR}/kernel-release"
mv "${WORK}/out/vmlinuz" "${OUTDIR}/vmlinuz"
mv "${WORK}/out/modules" "${OUTDIR}/modules"
echo "${RELEASE}" >"${OUTDIR}/kernel-release"
log "kernel ${RELEASE} ready in ${OUTDIR}"
