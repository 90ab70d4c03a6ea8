#!/bin/bash
# lab.sh — `make vagrant-lab`: the whole VM lab once, end to end. Brings the
# VMs up (lab-up.sh), sends a few requests from the client VM through the
# gateway's VIP and prints which backend answered each, shows that the host's
# root namespace has no lab address, and destroys everything (lab-down.sh),
# also on failure or Ctrl-C. Under QEMU TCG this is a functional smoke run,
# never a benchmark. Env: LB_BACKENDS (default 3), LB_HTTP / LB_UDP (requests,
# default 12 / 6), and those of lab-up.sh.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=lib.sh
. ./lib.sh
VIP=198.18.100.1
T0=$(date +%s)
down() {
  local rc=$?
  trap - EXIT INT TERM
  echo; echo "== tearing the lab down"
  bash ./lab-down.sh
  echo "== vagrant-lab: $([ "$rc" = 0 ] && echo PASSED || echo "FAILED (exit $rc)") in $(( $(date +%s) - T0 ))s"
  exit "$rc"
}
trap down EXIT
trap 'exit 130' INT TERM
# vagrant ssh, without vagrant's warning about the gateway's .1 addresses (the
# namespace lab's addresses; no router exists on those segments)
vssh() { ./vg ssh "$@" 2>&1 | sed '/static IP ending in ".1"/,/try changing this IP/d'; }

echo "== bringing the lab up: gateway, ${LB_BACKENDS:-3} backends, client"
LB_BACKENDS=${LB_BACKENDS:-3} bash ./lab-up.sh

echo; echo "== the gateway: lbcore run (tun)"
vssh gateway -c "sudo journalctl -u lbcore.service -o cat | grep 'ready:' | tail -1; \
  ip -4 route get $VIP | head -1; ip rule | grep -v -E 'lookup (local|main|default)'; \
  echo ip_forward=\$(cat /proc/sys/net/ipv4/ip_forward)" || true   # informational

echo; echo "== requests from the client VM (198.18.0.2) through the VIP $VIP"
vssh client -c "python3 /tmp/smoke.py --vip $VIP --http ${LB_HTTP:-12} --udp ${LB_UDP:-6}"

echo; echo "== the balancer's own view (lbcore status on the gateway)"
vssh gateway -c "sudo lbcore status" || echo "(lbcore status failed)"

echo; echo "== network safety: the host's root namespace has no lab address or route"
if ip -4 addr show | grep -E 'inet 198\.1[89]\.'; then echo "lab address in the root namespace" >&2; exit 1; fi
if ip -4 route show table all | grep -E '198\.1[89]\.'; then echo "lab route in the root namespace" >&2; exit 1; fi
echo "root namespace: no 198.18.0.0/15 address or route"
if [ -n "$LB_VM_NETNS" ]; then
  echo "namespace $LB_VM_NETNS: $(ip -n "$LB_VM_NETNS" -4 -br addr | awk '$3 {print $1, $3}' | xargs)"
fi
