#!/bin/bash
# payload.sh — what the VMs install lbcore from, since they have no network:
# a wheel of this checkout (with its compiled _core) plus wheels of its Python
# dependencies, downloaded here from the package index. The host and the box
# are both Debian 12 x86_64 with CPython 3.11, so a cp311 wheel built here
# loads there (install-lbcore.sh imports lbcore._core to prove it).
# Usage: payload.sh [PYTHON]   (a Python 3.11 with Cython, setuptools, wheel, pip)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(dirname "$HERE")
PY=${1:-$ROOT/.venv/bin/python}
OUT=${LB_PAYLOAD:-$HERE/.payload}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "payload.sh: the box has CPython 3.11; build the wheel with a 3.11 ($PY)" >&2; exit 1; }
rm -rf "$OUT"; mkdir -p "$OUT/wheels"
t0=$(date +%s)
(cd "$ROOT" && "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/wheels" . \
   >"$OUT/build.log" 2>&1) || { tail -30 "$OUT/build.log"; exit 1; }
whl=$(find "$OUT/wheels" -name 'lbcore-*.whl' | head -1)
[ -n "$whl" ] || { echo "payload.sh: no lbcore wheel built" >&2; exit 1; }
"$PY" -m pip download -q --disable-pip-version-check -d "$OUT/wheels" "$whl" \
  >"$OUT/download.log" 2>&1 || { tail -30 "$OUT/download.log"; exit 1; }
echo "payload: $(find "$OUT/wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1), $(( $(date +%s) - t0 ))s"
