#!/bin/bash
# gateway.sh BACKENDS VIP — in the gateway VM: the balancer, from lbcore's own
# code only. The config is the namespace lab's (lbcore.lab.render_config: the
# VIP's TCP 80 and UDP 5300 over backends 198.19.0.11..), since the VMs use
# the lab's addresses; `lbcore run` then creates the TUN device, routes the VIP
# into it, adds the reply-path rules and sets the sysctls (forwarding,
# rp_filter) through pyroute2, as on a real gateway. This script only supplies
# the config, the tun module and a service manager.
set -euo pipefail
N=$1 VIP=$2
STATE=/run/lbcore                      # control socket (lbcore status), as the lab's state dir
CONF=/etc/lbcore/lbcore.toml
modprobe tun
mkdir -p /etc/lbcore "$STATE"
/opt/lbcore/bin/python - "$N" "$STATE" >"$CONF" <<'PY'
import sys
from pathlib import Path
from lbcore.lab import LabSpec, render_config
print(render_config(LabSpec(backends=int(sys.argv[1])), Path(sys.argv[2])))
PY
sed -i '1s|.*|# The VM lab gateway: lbcore.lab.render_config via vagrant/provision/gateway.sh|' "$CONF"
lbcore check-config "$CONF"
# re-provisioning replaces the running balancer
systemctl stop lbcore.service 2>/dev/null || true
systemctl reset-failed lbcore.service 2>/dev/null || true
systemd-run --unit=lbcore --description="lbcore balancer (VM lab)" \
  /opt/lbcore/bin/lbcore run -c "$CONF"
# bounded wait for the balancer's "ready" log line (after TUN, routes and rules)
for _ in $(seq 240); do
  journalctl -u lbcore.service --no-pager -o cat | grep -q '\bready:' && break
  systemctl is-active -q lbcore.service || break
  sleep 0.5
done
if ! journalctl -u lbcore.service --no-pager -o cat | grep -q '\bready:'; then
  echo "gateway: lbcore run did not get ready" >&2
  journalctl -u lbcore.service --no-pager | tail -30 >&2
  exit 1
fi
journalctl -u lbcore.service --no-pager -o cat | grep '\bready:' | tail -1
echo "gateway: $(ip -4 route get "$VIP" | head -1)"
