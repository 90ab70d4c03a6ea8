# lib.sh — sourced by the VM lab's host scripts: where libvirtd and vagrant run.
#
# The lab keeps libvirtd, and with it every bridge, tap, dnsmasq and firewall
# rule of the lab, in a network namespace of its own (LB_VM_NETNS, default
# lbv-host), and runs vagrant there too (./vg) so that it can ssh to the VMs.
# The host's root namespace never gets a lab address or route. LB_VM_NETNS=
# (empty) uses a libvirtd in the root namespace instead (e.g. a systemd one);
# then the management network's host address 198.19.255.1 is in the root
# namespace while the lab is up, and lab-down.sh removes it.
# shellcheck shell=bash

LB_VM_NETNS=${LB_VM_NETNS-lbv-host}
export LIBVIRT_DEFAULT_URI=qemu:///system
# shellcheck disable=SC2034  # used by the scripts that source this file
LAB_NETWORKS=(lbv-mgmt lbv-front lbv-back)

# in_lab_ns CMD...: run CMD where the lab's libvirtd and bridges live
in_lab_ns() {
  if [ -n "$LB_VM_NETNS" ]; then ip netns exec "$LB_VM_NETNS" "$@"; else "$@"; fi
}

# netns_inode PID: the inode of PID's network namespace (empty if PID is gone)
netns_inode() { stat -L -c %i "/proc/$1/ns/net" 2>/dev/null || true; }

# lab_daemon_pid NAME: the pid of daemon NAME (libvirtd, virtlogd) if it runs in
# the lab's namespace, i.e. if this lab started it; empty otherwise
lab_daemon_pid() {
  [ -n "$LB_VM_NETNS" ] && [ -e "/run/netns/$LB_VM_NETNS" ] || return 0
  local want pid
  want=$(stat -L -c %i "/run/netns/$LB_VM_NETNS")
  for pid in $(pgrep -x "$1"); do
    [ "$(netns_inode "$pid")" = "$want" ] && echo "$pid"
  done
  return 0
}
