#!/bin/bash
# PID 1 of the rig's L2 VM (on the cached root image): set up a minimal system, load kvm_amd, mount
# the per-run work disk (label husk-rig-work), run its /cmd (or a shell), record the exit code on the
# work disk and on the console, then reset (QEMU runs with -no-reboot, so it exits).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=${TERM:-linux}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o ptmxmode=0666,newinstance devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
hostname husk-rig
ip link set lo up
ulimit -n 65536 2>/dev/null || true

finish() {
    sync
    umount /work 2>/dev/null
    echo "HUSK-RIG-EXIT=$1"
    echo b > /proc/sysrq-trigger
    sleep 10
}

# kvm_amd's options come from L2's kernel command line (`kvm_amd.nested=0`, ...: see
# `RigConfig` in xtask/src/rig.rs), which modprobe reads.
if ! modprobe kvm_amd; then
    echo "husk-rig: modprobe kvm_amd failed: no SVM in this L2 CPU?" >&2
fi
[ -e /dev/kvm ] || echo "husk-rig: /dev/kvm missing in L2" >&2

work=""
for _ in $(seq 1 500); do
    work=$(blkid -L husk-rig-work 2>/dev/null) && break
    sleep 0.01
done
if [ -z "$work" ]; then
    echo "husk-rig: work disk (label husk-rig-work) not found" >&2
    finish 125
fi
mkdir -p /work
mount -t ext4 "$work" /work || finish 125
mkdir -p /work/out
export HUSK_RIG=1 HUSK_RIG_OUT=/work/out
[ -f /work/env ] && . /work/env
cd /work
echo "husk-rig: L2 up after $(cut -d' ' -f1 /proc/uptime) s"
if [ -f /work/cmd ]; then
    bash /work/cmd
    rc=$?
else
    setsid -c -w bash -l <>/dev/ttyS0 >&0 2>&1
    rc=$?
fi
echo "$rc" > /work/out/exit-code
finish "$rc"
