#!/bin/bash
# gateway.sh VIP BACKEND_IP... — in the gateway VM: write the balancer's config
# and start `lbcore run` (tun mode) as a transient systemd service. lbcore
# itself creates the TUN device, routes the VIP into it, adds the return-path
# rule and sets the sysctls (forwarding, rp_filter), through pyroute2, as on a
# real gateway; this script only supplies the config and the tun module.
set -euo pipefail
VIP=$1; shift
CONF=/etc/lbcore/lbcore.toml
modprobe tun
mkdir -p /etc/lbcore
bash /tmp/lbconfig.sh "$VIP" "$@" >"$CONF"   # uploaded by the Vagrantfile
cat "$CONF"
lbcore check-config "$CONF"
# re-provisioning replaces the running balancer
systemctl stop lbcore.service 2>/dev/null || true
systemctl reset-failed lbcore.service 2>/dev/null || true
systemd-run --unit=lbcore --description="lbcore balancer (VM lab)" \
  /opt/lbcore/bin/lbcore run -c "$CONF"
# bounded wait until the balancer has routed the VIP (into its TUN device)
for _ in $(seq 120); do
  ip -4 route get "$VIP" 2>/dev/null | grep -q 'dev lbtun0' && break
  systemctl is-active -q lbcore.service || break
  sleep 0.5
done
if ! ip -4 route get "$VIP" | grep -q 'dev lbtun0'; then
  echo "gateway: lbcore did not route $VIP into lbtun0" >&2
  journalctl -u lbcore.service --no-pager | tail -30 >&2
  exit 1
fi
echo "gateway: lbcore runs; $(ip -4 route get "$VIP" | head -1)"
