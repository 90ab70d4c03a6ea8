#!/bin/bash
# netsetup.sh — host side, run by the Vagrantfile's `before :up` trigger (so in
# the lab's network namespace when vagrant runs through ./vg): create the lab's
# libvirt networks if missing. All isolated: no <forward> element (libvirt adds
# REJECT rules for routed traffic), DNS off, the DHCP offer names no router.
set -euo pipefail
exec 9>/run/lbv-netsetup.lock; flock -w 120 9   # the trigger runs once per VM, in parallel
define() { # name bridge [host-ip]
  local info
  if info=$(virsh -q net-info "$1" 2>/dev/null); then   # (not a pipe into grep -q: pipefail)
    [[ $info =~ Active:\ *yes ]] || virsh -q net-start "$1"
    return
  fi
  local ipxml="" isolate=""
  if [ -n "${3:-}" ]; then
    ipxml="<ip address='$3' netmask='255.255.255.0'><dhcp><range start='${3%.*}.100' end='${3%.*}.200'/></dhcp></ip>"
    isolate="<port isolated='yes'/>"   # VMs reach the host here, never each other
  fi
  virsh -q net-define /dev/stdin <<XML
<network><name>$1</name><bridge name='$2' stp='off' delay='0'/>$isolate<dns enable='no'/>$ipxml</network>
XML
  virsh -q net-start "$1"
}
define lbv-mgmt  lbvmgmt0  198.19.255.1   # host <-> VMs, vagrant ssh only
define lbv-front lbvfront0                # client <-> gateway, no host address
define lbv-back  lbvback0                 # gateway <-> backends, no host address
