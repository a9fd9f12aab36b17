#!/usr/bin/env bash
# Installs the Debian packages livestick's tests and fixtures need, when any is
# missing. Safe to run repeatedly; does nothing when all are present.
set -euo pipefail

packages=(
  # what livestick itself runs: SYSLINUX installer (mtools-based), mke2fs,
  # unsquashfs/mksquashfs for inspection and overlay merge, sqfs2tar/tar2sqfs for
  # merging OverlayFS into a flat squashfs without root
  syslinux syslinux-common mtools e2fsprogs squashfs-tools squashfs-tools-ng
  # independent inspection tools the tests use (xz, zstd, gzip, bzip2 make the
  # compressed sources; gcc below also builds the zstd and liblzma C libraries)
  fdisk dosfstools xorriso isomd5sum cryptsetup-bin util-linux zstd xz-utils gzip bzip2
  # the fixture ISOs and the boot tests
  isolinux grub-efi-amd64-bin grub-pc-bin linux-image-amd64 dracut dracut-live
  busybox-static qemu-system-x86 ovmf erofs-utils fakeroot cpio
  dmsetup kmod openssl grub-common mount bc groff-base
  # dracut-ng (fixtures/vendor) for the current-Fedora boot fixture
  libkmod-dev pkg-config make gcc
  # the Secure Boot fixture: Debian's Microsoft-signed shim and signed GRUB
  shim-signed grub-efi-amd64-signed
  # stale-signature tests of disk::wipe: real btrfs and xfs superblocks
  btrfs-progs xfsprogs
  # signed CHECKSUM tests: their own OpenPGP keys and clearsigned files
  gnupg
  # raw disk images: block maps made by bmaptool for tests/integration/raw_image.rs
  bmap-tools
  # restore --fs exfat runs mkfs.exfat; its test checks the result with fsck.exfat
  exfatprogs
  # benches/stick.sh: GNU time (CPU and peak RSS of each case in its VM)
  time
  # tests/integration/opened_once.rs counts the opens of a target with strace -f
  strace
  # the help-example test runs every `| jq FILTER` example; packaging/build.sh
  # builds the RPM with rpmbuild (Debian's rpm) and checks the .deb's man page
  jq rpm man-db
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing Debian packages: ${missing[*]}" >&2
    echo "run as root, or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
