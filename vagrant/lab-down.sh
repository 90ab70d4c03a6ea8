#!/bin/bash
# lab-down.sh — remove everything the VM lab made, idempotent, also after a
# failed or interrupted run: VMs and their disks, the lab's libvirt networks,
# the libvirtd/virtlogd this lab started (by pid) and its network namespace.
# Keeps the box (vagrant's box store and the libvirt volume made from it), so
# the next run does not build it again; `./lab-down.sh --box` drops that too.
set -uo pipefail
cd "$(dirname "$0")" || exit 1
# shellcheck source=lib.sh
. ./lib.sh
BOX=${LB_BOX:-lbcore/debian12-local}

if virsh version >/dev/null 2>&1; then
  # vagrant first (it also forgets the machines), with a count >= any used
  LB_BACKENDS=8 timeout 600 ./vg destroy -f >/dev/null 2>&1 || true
  # then whatever vagrant lost track of: domains named lbv-* and their disks
  for dom in $(virsh list --all --name | grep '^lbv-'); do
    virsh -q destroy "$dom" >/dev/null 2>&1
    virsh -q undefine "$dom" --remove-all-storage >/dev/null 2>&1 \
      || virsh -q undefine "$dom" >/dev/null 2>&1
    echo "lab-down: removed domain $dom"
  done
  for vol in $(virsh -q vol-list default 2>/dev/null | awk '$1 ~ /^lbv-/ {print $1}'); do
    virsh -q vol-delete --pool default "$vol" >/dev/null 2>&1
  done
  for n in "${LAB_NETWORKS[@]}"; do
    virsh -q net-info "$n" >/dev/null 2>&1 || continue
    virsh -q net-destroy "$n" >/dev/null 2>&1; virsh -q net-undefine "$n" >/dev/null
  done
  if [ "${1:-}" = "--box" ]; then
    vagrant box remove -f --all "$BOX" >/dev/null 2>&1
    for vol in $(virsh -q vol-list default 2>/dev/null | awk '{print $1}' \
                 | grep -F "${BOX//\//-VAGRANTSLASH-}_vagrant_box_image"); do
      virsh -q vol-delete --pool default "$vol" >/dev/null
    done
    rm -rf /var/tmp/lbcore-vagrant
  fi
fi
# the daemons this lab started live in its namespace: stop those, by pid
for d in libvirtd virtlogd; do
  for pid in $(lab_daemon_pid "$d"); do
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  done
done
if [ -n "$LB_VM_NETNS" ] && [ -e "/run/netns/$LB_VM_NETNS" ]; then
  ip netns delete "$LB_VM_NETNS"
fi
rm -f /run/lbv-netsetup.lock
echo "lab-down: done"
