#!/bin/bash
# lab-up.sh [MACHINE...] — host setup, lbcore's wheels for the VMs, the box
# (built once, then cached), and `vagrant up` (all machines, or those named).
# Env: LB_BACKENDS (default 3), LB_BOX, LB_LIBVIRT_DRIVER, LB_PYTHON (a Python
# 3.11 with Cython to build lbcore's wheel; default ../.venv/bin/python),
# LB_UP_TIMEOUT (seconds for `vagrant up`, default 2400). Tear down: lab-down.sh.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=lib.sh
. ./lib.sh
BOX=${LB_BOX:-lbcore/debian12-local}
BOX_FILE=${LB_BOX_FILE:-/var/tmp/lbcore-vagrant/lbcore-debian12.box}
secs() { echo "$(( $(date +%s) - $1 ))s"; }

t=$(date +%s); bash ./host-setup.sh; echo "lab-up: host setup $(secs "$t")"
t=$(date +%s); bash ./payload.sh "${LB_PYTHON:-../.venv/bin/python}"; echo "lab-up: payload $(secs "$t")"
if ! vagrant box list 2>/dev/null | grep -q "^$BOX "; then
  if [ "$BOX" = lbcore/debian12-local ]; then
    t=$(date +%s)
    [ -f "$BOX_FILE" ] || bash ./build-box.sh "$BOX_FILE"
    vagrant box add -f --name "$BOX" --provider libvirt "$BOX_FILE" >/dev/null
    echo "lab-up: box $BOX ready $(secs "$t")"
  else
    echo "lab-up: box $BOX is not installed; vagrant will try to fetch it" >&2
  fi
fi
t=$(date +%s)
# (the sed drops the box upload's progress meter, one update per percent)
timeout "${LB_UP_TIMEOUT:-2400}" ./vg up --provider=libvirt "$@" 2>&1 \
  | sed -u -e 's/\x1b\[K//g' -e 's/Progress: [0-9]*%//g' -e '/^ *$/d'
echo "lab-up: vagrant up ($(./vg status --machine-readable | grep -c ',state,running') VMs running) $(secs "$t")"
