#!/bin/bash
# install-lbcore.sh — in a VM: install lbcore from the uploaded wheels into a
# venv (the VMs have no network: --no-index), then import the compiled core to
# prove the wheel built on the host loads on the box's Python.
set -euo pipefail
WHEELS=/tmp/lbcore-payload/wheels
[ -d "$WHEELS" ] || { echo "install-lbcore: $WHEELS missing (run ../payload.sh on the host)" >&2; exit 1; }
[ -x /opt/lbcore/bin/python ] || python3 -m venv /opt/lbcore
/opt/lbcore/bin/pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" \
  --force-reinstall --no-deps "$WHEELS"/lbcore-*.whl
/opt/lbcore/bin/pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" lbcore
ln -sf /opt/lbcore/bin/lbcore /usr/local/bin/lbcore
/opt/lbcore/bin/python -c 'import lbcore, lbcore._core as c; print("lbcore", lbcore.__version__, "core", c.__file__)'
