#!/bin/bash
# client.sh GATEWAY VIP — in the client VM: route the VIP through the gateway
# (only the VIP: the VMs have no default route anywhere).
set -euo pipefail
GW=$1 VIP=$2
ip route replace "$VIP/32" via "$GW"
echo "client: $(ip -4 route get "$VIP" | head -1)"
