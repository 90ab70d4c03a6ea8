#!/bin/bash
# backend.sh NAME GATEWAY CLIENT — in a backend VM: the lab's small servers
# (lbcore.lab.servers: HTTP :80 and UDP :5300 answering NAME, the same code the
# namespace lab runs), and a route back to the client's subnet through the
# gateway, so that replies pass the balancer and get the VIP as source.
set -euo pipefail
NAME=$1 GW=$2 CLIENT=$3
ip route replace "${CLIENT%.*}.0/24" via "$GW"
systemctl stop lbcore-labservers.service 2>/dev/null || true
systemctl reset-failed lbcore-labservers.service 2>/dev/null || true
systemd-run --unit=lbcore-labservers --description="lbcore lab servers ($NAME)" \
  /opt/lbcore/bin/python -m lbcore.lab.servers --name "$NAME"
for _ in $(seq 120); do   # bounded wait until the HTTP server listens
  ss -Hltn 'sport = :80' | grep -q . && break
  systemctl is-active -q lbcore-labservers.service || break
  sleep 0.5
done
ss -Hltn 'sport = :80' | grep -q . \
  || { journalctl -u lbcore-labservers.service --no-pager | tail -30 >&2; exit 1; }
echo "$NAME: lab servers listen: $(ss -Hlntu '( sport = :80 or sport = :5300 )' | awk '{print $1, $5}' | xargs)"
