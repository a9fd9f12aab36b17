# shellcheck shell=bash
# Shared helpers for the VM harness (sourced by build-initramfs.sh, run.sh and
# the benchmarks that drive them; not executed).
#
#   . benches/vm/lib.sh
#   vm_kver                      # the Debian kernel version the VM boots
#   vm_disk ID FILE [OPTS]       # append a virtio disk to the VM_ARGS array
#   vm_stick ID FILE [WBPS RBPS] # the same, throttled like a USB stick
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
