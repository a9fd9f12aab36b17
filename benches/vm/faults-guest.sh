#!/bin/sh
# Guest side of the fault-injection tests (tests/integration/faults.rs), run
# as /guest.sh by the harness init (busybox sh): runs one livestick command
# against a disk the host makes fail, and exits with livestick's status (which
# run.sh returns).
#
# Parameters (guest.NAME=VALUE kernel arguments):
#   LS_ARGS   livestick's arguments, commas for spaces (the kernel command
#             line splits on spaces); @NAME is the virtio disk whose serial
#             is NAME, @usb the USB stick (waited for: it enumerates slowly)
# Console lines, for the host to read:
#   FAULT-START               just before livestick starts (the host may
#                             time an unplug from it)
#   LS-STDERR <line>          livestick's stderr, as it comes
#   LS-STDOUT <line>          its stdout, at the end
#   FAULT-STATUS <n>          its exit status
# shellcheck source=/dev/null # written by build-initramfs.sh
. /lib/vm.sh
set -u

args=''
for a in $(echo "${LS_ARGS:?}" | tr , ' '); do
    case $a in
        @usb) a=$(vm_usb_dev) || exit 125 ;;
        @*) a=$(vm_dev "${a#@}") || exit 125 ;;
    esac
    args="$args $a"
done
# The kernel's own I/O error lines are wanted on the console (they show
# where the fault hit), but not interleaved at full verbosity.
echo 4 >/proc/sys/kernel/printk
rm -f /tmp/ls.fifo
mkfifo /tmp/ls.fifo
while IFS= read -r line; do echo "LS-STDERR $line"; done </tmp/ls.fifo &
relay=$!
echo "FAULT-START livestick$args"
# shellcheck disable=SC2086 # split on purpose: busybox sh has no arrays
livestick $args >/tmp/ls.out 2>/tmp/ls.fifo
status=$?
wait "$relay"
while IFS= read -r line; do echo "LS-STDOUT $line"; done </tmp/ls.out
echo "FAULT-STATUS $status"
exit "$status"
