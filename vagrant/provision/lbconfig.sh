#!/bin/bash
# lbconfig.sh VIP BACKEND_IP... — print the gateway VM's lbcore config (TOML):
# the namespace lab's services on VIP (HTTP on TCP 80, UDP 5300), each spread
# over every backend VM. Used by gateway.sh; tests/test_vagrant.py checks its
# output with lbcore's own config loader.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: lbconfig.sh VIP BACKEND_IP..." >&2; exit 2; }
VIP=$1; shift
pool() { # NAME PORT: a pool of every backend on PORT
  local sep="" b
  printf '[pool.%s]\nbackends = [' "$1"
  for b in "${BACKENDS[@]}"; do
    printf '%s\n  {address = "%s", port = %s, weight = 1}' "$sep" "$b" "$2"; sep=,
  done
  printf ',\n]\n'
}
BACKENDS=("$@")
cat <<TOML
# lbcore config of the VM lab's gateway (vagrant/provision/lbconfig.sh)
[global]
mode = "tun"
workers = 1
tun_name = "lbtun0"

[[vip]]
address = "$VIP"
port = 80
protocol = "tcp"
pool = "web"

[[vip]]
address = "$VIP"
port = 5300
protocol = "udp"
pool = "dns"

TOML
pool web 80; echo; pool dns 5300
