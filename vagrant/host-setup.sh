#!/bin/bash
# host-setup.sh — host prerequisites of the VM lab on Debian 12, also without
# systemd as PID 1: the packages (only the missing ones), then virtlogd and
# libvirtd started by hand inside the lab's own network namespace (lib.sh).
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=lib.sh
. ./lib.sh
[ "$(id -u)" = 0 ] || { echo "host-setup.sh: needs root (libvirtd, network namespaces)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
need=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
      qemu-system-x86 qemu-utils dnsmasq-base iptables debootstrap extlinux syslinux-common fdisk
      iproute2)
missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "host-setup: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi
# never start libvirt's NAT'ed 'default' network (192.168.122.0/24)
rm -f /etc/libvirt/qemu/networks/autostart/default.xml
# Without udev /dev/kvm stays root-only 0600. libvirt then probes QEMU with KVM,
# finds the device inaccessible to the qemu user, calls its capability cache
# stale and probes again, 4 s on every API call: `vagrant up` crawls. Give it
# the mode Debian's udev rule gives it (the lab itself runs TCG here anyway).
if [ -c /dev/kvm ] && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
rm -f /etc/libvirt/qemu/networks/autostart/default.xml

if [ -n "$LB_VM_NETNS" ]; then
  [ -e "/run/netns/$LB_VM_NETNS" ] || ip netns add "$LB_VM_NETNS"
  ip -n "$LB_VM_NETNS" link set lo up
  # a libvirtd elsewhere (root namespace, systemd) would make bridges outside the namespace
  for d in libvirtd virtlogd; do
    others=$(comm -23 <(pgrep -x "$d" | sort) <(lab_daemon_pid "$d" | sort))
    if [ -n "$others" ]; then
      echo "host-setup: $d already runs outside namespace $LB_VM_NETNS (pid $others)." >&2
      echo "  Stop it, or use it with LB_VM_NETNS= (the management network's host" >&2
      echo "  address is then in the root namespace until lab-down.sh)." >&2
      exit 1
    fi
  done
  [ -n "$(lab_daemon_pid virtlogd)" ] || in_lab_ns virtlogd -d
  [ -n "$(lab_daemon_pid libvirtd)" ] || in_lab_ns libvirtd -d
else
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
fi
for _ in $(seq 100); do virsh version >/dev/null 2>&1 && break; sleep 0.2; done
virsh version >/dev/null
echo "host-setup: libvirtd ready${LB_VM_NETNS:+ in network namespace $LB_VM_NETNS}"
