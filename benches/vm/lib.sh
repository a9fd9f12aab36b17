# shellcheck shell=bash
# Shared helpers for the VM harness (sourced by build-initramfs.sh, run.sh and
# the benchmarks that drive them; not executed).
#
#   . benches/vm/lib.sh
#   vm_kver                      # the Debian kernel version the VM boots
#   vm_disk ID FILE [OPTS]       # append a virtio disk to the VM_ARGS array
#   vm_stick ID FILE [WBPS RBPS] # the same, throttled like a USB stick
#   vm_faulty_disk ID FILE RULES [OPTS] # a virtio disk whose writes fail
#                                #   where QEMU blkdebug's RULES file says
#   vm_usb_stick ID FILE [OPTS]  # a usb-storage stick that the QMP command
#                                #   device_del ID unplugs at once
#
# Guest scripts find a disk by its ID, which becomes the virtio serial:
# vm_dev ID in /lib/vm.sh inside the guest prints /dev/vdX.

# The newest kernel with both an image in /boot and its modules: the VM boots
# Debian's generic kernel (linux-image-amd64), not the host's, which may be a
# thin one without the drivers. VM_KVER overrides.
vm_kver() {
    if [[ -n ${VM_KVER:-} ]]; then
        echo "$VM_KVER"
        return
    fi
    local m k found=
    for m in /lib/modules/*; do
        k=${m##*/}
        [[ -r /boot/vmlinuz-$k && -f $m/modules.dep ]] && found=$k
    done
    if [[ -z $found ]]; then
        echo "vm: no kernel with modules in /boot; apt-get install -y linux-image-amd64" >&2
        return 3
    fi
    echo "$found"
}

# vm_disk ID FILE [DRIVE_OPTS]: a raw virtio-blk disk whose serial is ID.
# cache=none + aio=threads: guest writes reach the file with O_DIRECT, so the
# host page cache does not absorb them (the point of measuring in a VM).
# OPTS may name another cache= mode (a read-only source disk the host may
# cache, say).
vm_disk() {
    local id=$1 file=$2 opts=${3:-} cache=cache=none,aio=threads
    [[ ,$opts, == *,cache=* ]] && cache=
    VM_ARGS+=(-drive "file=$file,format=raw,if=none,id=$id${cache:+,$cache}${opts:+,$opts}"
        -device "virtio-blk-pci,drive=$id,serial=$id")
}

# vm_stick ID FILE [WRITE_BPS READ_BPS]: a disk throttled like a USB stick
# (default 30 MB/s write, 100 MB/s read). The throttling.* options on a drive
# put it in a throttle group of its own, so several sticks do not share one
# budget, as several real sticks on separate ports would not.
vm_stick() {
    local id=$1 file=$2 w=${3:-30000000} r=${4:-100000000}
    vm_disk "$id" "$file" "throttling.bps-write=$w,throttling.bps-read=$r"
}

# vm_faulty_disk ID FILE RULES [DRIVE_OPTS]: a virtio disk behind QEMU's
# blkdebug driver, which fails requests as the rules file RULES says
# (docs/reliability.md). blkdebug counts no requests: a rule fires on an
# event in a state, optionally for one sector. The raw format driver raises
# write_aio for every guest write, so "event = write_aio" with "sector = N"
# fails every write that touches sector N (with errno 5, EIO, by default).
vm_faulty_disk() {
    local id=$1 file=$2 rules=$3
    vm_disk "$id" "blkdebug:$rules:$file" "${4:-}"
}

# vm_usb_stick ID FILE [DRIVE_OPTS]: a raw image as a usb-storage device on
# its own xHCI controller, device id ID, so that the QMP command
# {"execute": "device_del", "arguments": {"id": "ID"}} pulls it out as a
# user would (usb-storage goes at once, with no guest handshake). The guest
# needs VM_MODULES="xhci_pci usb_storage sd_mod" and finds it with
# vm_usb_dev.
vm_usb_stick() {
    local id=$1 file=$2 opts=${3:-}
    VM_ARGS+=(-drive "file=$file,format=raw,if=none,id=$id-drive,cache=none,aio=threads${opts:+,$opts}"
        -device "qemu-xhci,id=$id-xhci"
        -device "usb-storage,bus=$id-xhci.0,drive=$id-drive,id=$id,removable=on")
}
