#!/bin/busybox sh
# /init of the rig's own L2 initramfs: load the drivers the Debian cloud kernel keeps as modules
# (virtio-mmio disks, KVM), find the root disk by its label (microvm's disk order is not fixed)
# and switch to it. Everything here is part of the rig image's cache key.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do
    insmod "/modules/$m" || echo "husk-rig: insmod $m failed" >&2
done
root=""
for _ in $(seq 1 500); do
    root=$(findfs LABEL=husk-rig-root 2>/dev/null) && break
    usleep 10000
done
if [ -z "$root" ]; then
    echo "husk-rig: root disk (label husk-rig-root) not found" >&2
    ls /dev >&2
    echo b > /proc/sysrq-trigger
fi
mkdir -p /newroot
mount -t ext4 "$root" /newroot || { echo "husk-rig: cannot mount $root" >&2; echo b > /proc/sysrq-trigger; }
umount /sys /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /husk-rig/init
