#!/usr/bin/env bash
# Installs everything bkfs needs on Debian/Ubuntu, then builds it. Safe to run again: it installs
# only what is missing. As root it runs apt-get itself; otherwise it prints the command to run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Runtime: qemu-nbd/qemu-img (sources), libfuse2 (fuse-native's binary links it), fusermount.
# Tests, demo and benchmarks also use nbdkit, libnbd tools, filesystem and partitioning tools.
# Live libvirt backups (and their tests: a TCG domain booting the host's kernel) need libvirt and QEMU.
PKGS=(qemu-utils libfuse2 fuse3 nbdkit libnbd-bin util-linux e2fsprogs xfsprogs gdisk fdisk parted dosfstools mtools
  python3 make g++ libvirt-daemon-system libvirt-clients qemu-system-x86 linux-image-amd64)
# File-level restore (bkfs ls/cp/cat/find/diff): libguestfs and its appliance kernel; cryptsetup for tests.
PKGS+=(libguestfs-tools libguestfs-xfs linux-image-amd64 cryptsetup-bin)
# Remote-hypervisor tests (a second libvirtd + sshd in a network namespace), the instant-recovery
# test guest (an initrd built from busybox), the web console's browser tests (Debian's chromium).
PKGS+=(openssh-server openssh-client iproute2 busybox-static chromium openssl)
# Object storage tests and benchmarks: a real single-node Ceph cluster with a RADOS Gateway (scripts/ceph-s3.sh).
PKGS+=(ceph-mon ceph-osd radosgw ceph-common curl)
PKGS+=(${BKFS_EXTRA_PACKAGES:-})

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: bkfs needs these Debian packages; run:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# Node dependencies (better-sqlite3 and zstd-napi compile from source here: about 2 minutes once).
stamp=node_modules/.bkfs-installed
if [ ! -f "$stamp" ] || [ package-lock.json -nt "$stamp" ]; then
  npm ci --no-audit --no-fund
  touch "$stamp"
fi
npm run --silent build
