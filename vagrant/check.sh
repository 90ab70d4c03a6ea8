#!/bin/bash
# check.sh — `make vagrant-check` (run by `make test`): the VM lab's cheap,
# offline checks. No box, no libvirtd, no VM: Ruby syntax, `vagrant validate`
# for 1 and 3 backends (provider options, provisioner paths), shellcheck and
# bash -n on every script, and the client's Python. Installs its Debian
# packages when missing (--no-install-recommends: 11 s on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")"
need=(vagrant vagrant-libvirt ruby shellcheck)
missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "vagrant-check: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi
scripts=(./*.sh ./vg provision/*.sh)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/payload/wheels"        # the file provisioner's source must exist
log=$tmp/log
run() { # quiet on success, everything on failure
  "$@" >"$log" 2>&1 || { echo "vagrant-check: FAILED: $*" >&2; cat "$log" >&2; exit 1; }
}
run ruby -c Vagrantfile
for n in 1 3; do
  LB_PAYLOAD=$tmp/payload LB_BACKENDS=$n VAGRANT_DOTFILE_PATH=$tmp/dot run vagrant validate
  grep -q 'validated successfully' "$log" || { cat "$log" >&2; exit 1; }
done
run shellcheck -S warning -x "${scripts[@]}"
for s in "${scripts[@]}"; do run bash -n "$s"; done
run python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' provision/smoke.py
echo "vagrant-check: ok (ruby -c, vagrant validate x2, shellcheck + bash -n on ${#scripts[@]} scripts)"
