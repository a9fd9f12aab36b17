#!/usr/bin/env bash
# Builds the harness initramfs (build-initramfs.sh) with livestick and every
# program it runs as a child, so that any livestick command can run in the
# VM: write (from strace -f -e execve: unsquashfs, mke2fs and debugfs for a
# new ext4, dumpe2fs, the mtools-based syslinux, which runs
# mattrib/mcopy/mmove through sh, the decompressors it may run on the ISO's
# initrd), overlay merge (unsquashfs, mksquashfs, e2fsck) and home resize
# (e2fsck, resize2fs); plus GNU dd (busybox dd has no
# iflag=skip_bytes,count_bytes) and GNU time (peak RSS of a command and its
# children). Used by benches/stick.sh and tests/integration/faults.rs.
#
#   benches/vm/livestick-initramfs.sh OUT.cpio GUEST_SCRIPT LIVESTICK [PATH...]
#
# LIVESTICK: the binary to install as /usr/local/bin/livestick; PATH: more
# files, as build-initramfs.sh takes them. VM_MODULES and VM_KVER pass
# through to build-initramfs.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:?usage: livestick-initramfs.sh OUT.cpio GUEST_SCRIPT LIVESTICK [PATH...]}
GUEST=${2:?usage: livestick-initramfs.sh OUT.cpio GUEST_SCRIPT LIVESTICK [PATH...]}
LS=${3:?usage: livestick-initramfs.sh OUT.cpio GUEST_SCRIPT LIVESTICK [PATH...]}
shift 3

files=("$LS:/usr/local/bin/livestick" /usr/sbin/mke2fs /usr/sbin/mkfs.ext4 /usr/sbin/e2fsck
    /usr/sbin/resize2fs /usr/sbin/debugfs /usr/sbin/dumpe2fs /etc/mke2fs.conf /usr/bin/unsquashfs
    /usr/bin/syslinux /usr/lib/syslinux /bin/dd /usr/bin/time)
# mtools converts file names through iconv (code page 850): glibc loads
# these at run time, so ldd does not list them.
gconv=/usr/lib/x86_64-linux-gnu/gconv
files+=("$gconv/gconv-modules" "$gconv/gconv-modules.cache" "$gconv/gconv-modules.d"
    "$gconv/IBM850.so" "$gconv/IBM437.so")
for t in mtools mattrib mcopy mmove mdir mdel mmd mformat mksquashfs zstd xz gzip; do
    p=$(command -v "$t") && files+=("$p")
done
exec "$HERE/build-initramfs.sh" "$OUT" "$GUEST" "${files[@]}" "$@"
