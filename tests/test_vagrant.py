"""The VM lab's safety and wiring, checked statically (no VM, no vagrant).

`make vagrant-check` (a prerequisite of `make test`) runs ruby -c, vagrant
validate and shellcheck; these tests check what those tools cannot: that every
address the lab's files use is in the benchmarking range or loopback, that no
libvirt network of the lab forwards anywhere, and that the gateway's generated
config (lbcore.lab's own) passes lbcore's loader and names every backend VM.
"""
from __future__ import annotations

import ipaddress
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
VAGRANT = ROOT / "vagrant"
LAB_NET = ipaddress.ip_network("198.18.0.0/15")
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
IPV4 = re.compile(r"(?<![\d.])(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})(?:/(\d{1,2}))?(?![\d.])")


def _code_files() -> list[pathlib.Path]:
    files = [VAGRANT / "Vagrantfile", *VAGRANT.glob("*.sh"), VAGRANT / "vg",
             *VAGRANT.glob("provision/*")]
    return sorted(f for f in files if f.is_file())


def _code_lines(path: pathlib.Path) -> list[str]:
    """The file's lines without comments (shell, Ruby and Python all use #)."""
    out = []
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        out.append(re.split(r"\s#\s", line, maxsplit=1)[0])
    return out


def test_vagrant_files_present():
    names = {p.relative_to(VAGRANT).as_posix() for p in _code_files()}
    for want in ("Vagrantfile", "build-box.sh", "host-setup.sh", "lab-up.sh", "lab-down.sh",
                 "lab.sh", "check.sh", "provision/netsetup.sh", "provision/gateway.sh",
                 "provision/backend.sh", "provision/client.sh", "provision/install-lbcore.sh"):
        assert want in names


@pytest.mark.parametrize("path", _code_files(), ids=lambda p: p.relative_to(VAGRANT).as_posix())
def test_every_address_is_in_the_lab_range(path: pathlib.Path):
    """Network safety: the VM lab addresses nothing outside 198.18.0.0/15 and
    loopback (a netmask literal is the one other dotted quad allowed)."""
    for n, line in enumerate(_code_lines(path), 1):
        for addr, plen in IPV4.findall(line):
            if addr == "255.255.255.0":
                continue
            if plen:
                net = ipaddress.ip_network(f"{addr}/{plen}", strict=False)
                ok = net.subnet_of(LAB_NET) or net.subnet_of(LOOPBACK)
            else:
                ip = ipaddress.ip_address(addr)
                ok = ip in LAB_NET or ip in LOOPBACK
            assert ok, f"{path.name}:{n}: {addr} is outside 198.18.0.0/15: {line.strip()}"


def test_libvirt_networks_are_isolated():
    """No <forward> (so libvirt REJECTs routed traffic), DNS off, and the
    management network's VMs cannot talk to each other."""
    net = "\n".join(_code_lines(VAGRANT / "provision" / "netsetup.sh"))
    assert "<forward" not in net
    assert "<dns enable='no'/>" in net
    assert "<port isolated='yes'/>" in net
    vf = "\n".join(_code_lines(VAGRANT / "Vagrantfile"))
    assert re.findall(r'libvirt__forward_mode:\s*"(\w+)"', vf) == ["veryisolated"]
    assert re.search(r'management_network_mode\s*=\s*"none"', vf)
    assert "forwarded_port" not in vf
    assert not re.search(r"public_network", vf)


def _vagrantfile_consts() -> dict[str, str]:
    return dict(re.findall(r'^(\w+)\s*=\s*"([\d./]+)"', (VAGRANT / "Vagrantfile").read_text(),
                           re.M))


def _vagrant_backend_ip(i: int) -> str:
    """The Vagrantfile's BACKEND_IP lambda, evaluated for backend i."""
    m = re.search(r'BACKEND_IP\s*=\s*->\(i\)\s*\{\s*"([\d.]+)#\{(\d+) \+ i\}"\s*\}',
                  (VAGRANT / "Vagrantfile").read_text())
    assert m, "BACKEND_IP lambda not found in the Vagrantfile"
    return f"{m.group(1)}{int(m.group(2)) + i}"


def test_vagrantfile_uses_the_namespace_lab_addresses():
    """The gateway's config comes from lbcore.lab.render_config, so the VMs
    must carry exactly the namespace lab's addresses."""
    from lbcore import lab
    consts = _vagrantfile_consts()
    assert consts["FRONT_GW"] == lab.GW_CLIENT_V4
    assert consts["CLIENT"] == lab.CLIENT_V4
    assert consts["BACK_GW"] == lab.GW_BACKEND_V4
    assert consts["VIP"] == lab.VIP_V4
    for i in (1, 2, 3, 8):
        assert _vagrant_backend_ip(i) == lab.backend_v4(i)
    mgmt = ipaddress.ip_network(consts["MGMT_NET"])
    assert mgmt.subnet_of(LAB_NET)
    used = [ipaddress.ip_address(a) for a in (lab.GW_CLIENT_V4, lab.GW_BACKEND_V4, lab.VIP_V4)]
    assert not any(a in mgmt for a in used)


@pytest.mark.parametrize("n", [1, 3])
def test_gateway_config_is_valid_and_lists_every_backend_vm(tmp_path: pathlib.Path, n: int):
    """What provision/gateway.sh writes: lbcore.lab's config for n backends,
    accepted by lbcore's own loader, spreading both VIP services over the VMs."""
    from lbcore.config import load_config
    from lbcore.lab import LabSpec, render_config
    path = tmp_path / "lbcore.toml"
    path.write_text(render_config(LabSpec(backends=n), tmp_path))
    cfg = load_config(path)
    vip = ipaddress.ip_address(_vagrantfile_consts()["VIP"])
    keys = {(v.address, v.port, v.protocol) for v in cfg.vips}
    assert {(vip, 80, "tcp"), (vip, 5300, "udp")} <= keys   # what smoke.py asks
    want = {ipaddress.ip_address(_vagrant_backend_ip(i)) for i in range(1, n + 1)}
    for v in cfg.vips:
        assert {b.address for b in cfg.pools[v.pool].backends} == want
    assert cfg.mode == "tun"


def test_gateway_provisioner_uses_lbcore_code():
    """No second implementation in shell: the gateway runs `lbcore run` on
    lbcore.lab's config, the backends run lbcore.lab.servers."""
    gw = (VAGRANT / "provision" / "gateway.sh").read_text()
    assert "from lbcore.lab import LabSpec, render_config" in gw
    assert "lbcore run -c" in gw
    assert "-m lbcore.lab.servers --name" in (VAGRANT / "provision" / "backend.sh").read_text()
