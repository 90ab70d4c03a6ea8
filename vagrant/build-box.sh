#!/bin/bash
# build-box.sh — build the VM lab's Vagrant box (libvirt provider) from Debian
# packages only: debootstrap -> ext4 on a loop device -> extlinux -> qcow2 -> .box.
# Boxes cannot be downloaded on the machines this project builds on, and the
# VMs have no network, so everything the lab needs at run time that is not
# lbcore itself must be in here: python3 + venv (ensurepip, offline), kmod for
# the tun module, iproute2.
# Needs root, debootstrap, extlinux, syslinux-common, fdisk, qemu-utils, vagrant.
# Usage: build-box.sh [OUT.box]     (recipe and gotchas: shared/VAGRANT-NOTES.md)
set -euo pipefail
OUT=$(realpath -m "${1:-lbcore-debian12.box}")
MIRROR=${MIRROR:-$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
: "${MIRROR:?set MIRROR to a Debian mirror URL}"
KEY=$(find /usr/share/rubygems-integration/all/gems/ -path '*/vagrant-*/keys/vagrant.pub' 2>/dev/null | head -1)
: "${KEY:?vagrant insecure public key not found (is the vagrant package installed?)}"
PKGS=linux-image-cloud-amd64,systemd-sysv,udev,openssh-server,sudo,ifupdown,isc-dhcp-client
PKGS+=,iproute2,kmod,procps,iputils-ping,python3,python3-venv
WORK=$(mktemp -d /var/tmp/lbbox.XXXXXX); R=$WORK/rootfs; LOOP=
cleanup() {
  mountpoint -q "$WORK/mnt" 2>/dev/null && umount "$WORK/mnt"
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  rm -rf "$WORK"
}
trap cleanup EXIT

t0=$(date +%s)
debootstrap --variant=minbase --include="$PKGS" bookworm "$R" "$MIRROR" >"$WORK/debootstrap.log" \
  || { tail -20 "$WORK/debootstrap.log"; exit 1; }
echo "debootstrap: $(( $(date +%s) - t0 ))s"

# lbcore's tun mode needs the tun module in the guest kernel
find "$R/lib/modules" -name 'tun.ko*' | grep -q . || { echo "guest kernel has no tun module"; exit 1; }

# vagrant user with the insecure key, passwordless sudo, sshd, DHCP on eth0 (management)
chroot "$R" useradd -m -s /bin/bash -G sudo vagrant
echo 'vagrant:vagrant' | chroot "$R" chpasswd
install -d -m700 -o 1000 -g 1000 "$R/home/vagrant/.ssh"
install -m600 -o 1000 -g 1000 "$KEY" "$R/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' >"$R/etc/sudoers.d/vagrant"; chmod 440 "$R/etc/sudoers.d/vagrant"
echo 'UseDNS no' >"$R/etc/ssh/sshd_config.d/vagrant.conf"
echo localbox >"$R/etc/hostname"; printf '127.0.0.1 localhost\n127.0.1.1 localbox\n' >"$R/etc/hosts"
printf 'auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n' \
  >"$R/etc/network/interfaces"
echo tun >"$R/etc/modules-load.d/tun.conf"
echo '/dev/vda1 / ext4 errors=remount-ro 0 1' >"$R/etc/fstab"
: >"$R/etc/apt/sources.list"; : >"$R/etc/machine-id"          # VMs have no network to a mirror
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer >/dev/null 2>&1
rm -f "$R"/etc/ssh/ssh_host_*; chroot "$R" ssh-keygen -A >/dev/null
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*

# 4 GiB disk, one MBR partition at 1 MiB, ext4, extlinux. A loop device with an
# offset, because this kernel's loop driver makes no partition nodes (losetup -P).
t1=$(date +%s)
truncate -s 4G "$WORK/disk.raw"
echo 'start=2048, type=83, bootable' | sfdisk -q "$WORK/disk.raw"
LOOP=$(losetup -f --show -o $((2048*512)) "$WORK/disk.raw")
mkfs.ext4 -q -L root -E lazy_itable_init=0,lazy_journal_init=0 "$LOOP"
mkdir "$WORK/mnt"; mount "$LOOP" "$WORK/mnt"
cp -a "$R/." "$WORK/mnt/"
mkdir -p "$WORK/mnt/boot/extlinux"; extlinux --install "$WORK/mnt/boot/extlinux" 2>/dev/null
KVER=$(find "$R/boot" -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | head -1)
cat >"$WORK/mnt/boot/extlinux/extlinux.conf" <<CFG
DEFAULT linux
TIMEOUT 0
PROMPT 0
LABEL linux
  LINUX /boot/vmlinuz-$KVER
  INITRD /boot/initrd.img-$KVER
  APPEND root=/dev/vda1 ro console=ttyS0 net.ifnames=0 biosdevname=0
CFG
# without these syncs one build gave a corrupt image (needs_recovery, bad bitmap checksum)
sync; umount "$WORK/mnt"; sync
e2fsck -fn "$LOOP" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log"; echo "filesystem not clean after umount"; exit 1; }
losetup -d "$LOOP"; LOOP=; sync
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$WORK/box.img"
qemu-img compare -q "$WORK/disk.raw" "$WORK/box.img"

# vagrant-libvirt box format v1
echo '{"provider":"libvirt","format":"qcow2","virtual_size":4}' >"$WORK/metadata.json"
cat >"$WORK/Vagrantfile" <<'VF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
  end
end
VF
mkdir -p "$(dirname "$OUT")"
tar -C "$WORK" -cf "$OUT.tmp" metadata.json Vagrantfile box.img
mv "$OUT.tmp" "$OUT"
echo "image+package: $(( $(date +%s) - t1 ))s; box: $OUT ($(du -h "$OUT" | cut -f1))"
