#!/usr/bin/env bash
# Builds an initramfs (uncompressed newc cpio) for a throwaway QEMU VM that runs
# one guest script as soon as it boots, then powers off.
#
#   benches/vm/build-initramfs.sh OUT.cpio GUEST_SCRIPT [PATH...]
#
# PATH: an executable is copied at its own path with every shared library
# `ldd` lists (a real binary replaces a busybox applet of the same name);
# any other file or a directory is copied as it is (data files such as
# /etc/mke2fs.conf or /usr/lib/syslinux). SRC:/DEST copies one executable to
# another path in the guest (a freshly built binary into /usr/local/bin).
# Environment:
#   VM_MODULES  kernel modules to load at boot, in addition to virtio_pci and
#               virtio_blk (e.g. "9p 9pnet_virtio usb-storage"); their
#               dependencies are added and loaded first
#   VM_KVER     kernel version (default: newest in /boot with modules)
#
# Inside the guest, /init mounts /proc, /sys, /dev, loads the modules, exports
# every guest.NAME=VALUE kernel argument as $NAME, runs GUEST_SCRIPT as
# /guest.sh with busybox sh, prints "VM-GUEST-EXIT <status>" and powers off.
# /lib/vm.sh has vm_dev ID (the /dev/vdX whose virtio serial is ID) and
# vm_usb_dev (the first USB disk, once it has enumerated).
# Needs busybox-static, kmod, cpio.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/vm/lib.sh
. "$HERE/lib.sh"

OUT=${1:?usage: build-initramfs.sh OUT.cpio GUEST_SCRIPT [PATH...]}
GUEST=${2:?usage: build-initramfs.sh OUT.cpio GUEST_SCRIPT [PATH...]}
shift 2
KVER=$(vm_kver)

[[ $(ldd /bin/busybox 2>&1) == *"not a dynamic"* ]] || {
    echo "vm: /bin/busybox is not static; apt-get install -y busybox-static" >&2
    exit 3
}
for t in cpio modprobe; do
    command -v "$t" >/dev/null || { echo "vm: $t missing (apt-get install -y cpio kmod)" >&2; exit 3; }
done

R=$(mktemp -d "${TMPDIR:-/tmp}/vm-initramfs.XXXXXX")
trap 'rm -rf "$R"' EXIT
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,tmp,root,mnt}
cp /bin/busybox "$R/bin/busybox"
busybox --list-full | while read -r applet; do
    [[ -e $R/$applet ]] || ln -s /bin/busybox "$R/$applet"
done

copy_with_libs() { # BIN [DEST]: an executable, with its libraries
    local bin=$1 dest=${2:-$1} lib
    rm -f "$R$dest"
    install -D -m 0755 "$bin" "$R$dest"
    # Static binaries make ldd fail: nothing to add then.
    for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \// { print $3 } /^\t\/lib/ { print $1 }'); do
        # 0755: the dynamic loader among them must be executable.
        [[ -e $R$lib ]] || install -D -m 0755 "$lib" "$R$lib"
    done
}

for p in "$@"; do
    if [[ $p == *:/* ]]; then
        copy_with_libs "$(readlink -f "${p%%:/*}")" "/${p#*:/}"
    elif [[ -d $p ]]; then
        mkdir -p "$R$(dirname "$p")"
        cp -a "$p" "$R$(dirname "$p")/"
    elif [[ -f $p && -x $p ]]; then
        real=$(readlink -f "$p")
        copy_with_libs "$real"
        # Also at the path asked for (a /usr/sbin/mkfs.ext4 -> mke2fs link, or
        # /sbin vs /usr/sbin on a merged-/usr host): PATH must find it there
        # before any busybox applet of the same name.
        if [[ $real != "$p" ]]; then
            mkdir -p "$R$(dirname "$p")"
            rm -f "$R$p"
            ln -s "$real" "$R$p"
        fi
    elif [[ -f $p ]]; then
        install -D -m 0644 "$p" "$R$p"
    else
        echo "vm: $p not found" >&2
        exit 3
    fi
done
# glibc dlopen()s libgcc_s for thread cancellation and unwinding; a
# multithreaded program (livestick) may need it without ldd saying so.
l=/lib/x86_64-linux-gnu/libgcc_s.so.1
if [[ -e $l && ! -e $R$l ]]; then install -D -m 0644 "$l" "$R$l"; fi

# Modules in load order: modprobe --show-depends lists dependencies first.
# virtio_pci and virtio_blk are =m in Debian's kernel; a built-in one prints
# "builtin", which is skipped.
: >"$R/etc/vm-modules"
for mod in virtio_pci virtio_blk ${VM_MODULES:-}; do
    modprobe -S "$KVER" --show-depends "$mod" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' | while read -r ko; do
    install -D -m 0644 "$ko" "$R$ko"
    echo "$ko" >>"$R/etc/vm-modules"
done

printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"
install -m 0755 "$GUEST" "$R/guest.sh"

cat >"$R/lib/vm.sh" <<'VMSH'
# Guest-side helpers (busybox sh). vm_dev ID: the disk whose serial is ID.
vm_dev() {
    for s in /sys/block/vd*/serial; do
        [ "$(cat "$s")" = "$1" ] && { d=${s%/serial}; echo "/dev/${d##*/}"; return 0; }
    done
    echo "vm_dev: no disk with serial $1" >&2
    return 1
}
# vm_usb_dev: the first USB (SCSI) disk, /dev/sdX, waiting up to 30 s for it
# to enumerate (slow under TCG).
vm_usb_dev() {
    i=0
    while [ $i -lt 300 ]; do
        for d in /sys/block/sd*; do
            [ -e "$d" ] && { echo "/dev/${d##*/}"; return 0; }
        done
        sleep 0.1
        i=$((i + 1))
    done
    echo "vm_usb_dev: no USB disk appeared" >&2
    return 1
}
VMSH

cat >"$R/init" <<'INIT'
#!/bin/sh
# PID 1 of the harness VM: set up, run /guest.sh, power off whatever happens.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r ko; do insmod "$ko" || echo "vm: insmod $ko failed"; done </etc/vm-modules
# Give the virtio disks a moment to appear (they probe asynchronously).
i=0
while [ ! -e /sys/block/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
for w in $(cat /proc/cmdline); do
    case $w in guest.*=*) w=${w#guest.}; export "${w%%=*}=${w#*=}" ;; esac
done
echo "VM-GUEST-START"
sh /guest.sh
echo "VM-GUEST-EXIT $?"
sync
poweroff -f
INIT
chmod 0755 "$R/init"

# Uncompressed: under TCG the guest would spend many seconds decompressing.
mkdir -p "$(dirname "$OUT")"
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "vm: built $OUT ($(du -h "$OUT" | cut -f1), kernel $KVER)" >&2
