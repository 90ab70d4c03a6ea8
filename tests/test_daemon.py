"""`lbcore run` on its own, in a throwaway namespace: start-up failures undo
everything, SIGTERM during start-up is honoured, a bad config never touches
the network."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from lbcore import netconf

pytestmark = pytest.mark.netns

CONFIG = """
[global]
tun_name = "lbt0"
control_socket = "{sock}"
metrics_listen = ""

[[vip]]
address = "198.18.200.1"
port = 80
protocol = "tcp"
pool = "p"

[pool.p]
backends = [{{ address = "198.19.200.11", port = 80 }}]
"""


def run(ns: str, cfg_path, timeout: float = 60) -> subprocess.CompletedProcess:
    p = netconf.popen_in_netns(ns, [sys.executable, "-m", "lbcore", "run", "-c", str(cfg_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def leftovers(ns: str) -> list:
    return ([r for r in netconf.rules(ns) if r.priority == 4242]
            + [r for r in netconf.routes(ns, table=4242)]
            + [x for x in netconf.links(ns) if x.name == "lbt0"])


def test_failure_half_way_undoes_the_gateway(nsname, tmp_path):
    """The control socket cannot be created (its directory is a file): the
    TUN, routes, rules and sysctls made before are all undone, exit 1."""
    (tmp_path / "notadir").write_text("")
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(sock=tmp_path / "notadir" / "s.sock"))
    forwarding = netconf.sysctl_get("net.ipv4.ip_forward", netns=nsname)
    r = run(nsname, cfg)
    assert r.returncode == 1, r.stdout
    assert "lbcore failed" in r.stdout
    assert leftovers(nsname) == []
    assert netconf.sysctl_get("net.ipv4.ip_forward", netns=nsname) == forwarding


def test_sigterm_right_after_start_is_a_clean_stop(nsname, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(sock=tmp_path / "s.sock"))
    p = netconf.popen_in_netns(nsname, [sys.executable, "-m", "lbcore", "run", "-c", str(cfg)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not [x for x in netconf.links(nsname) if x.name == "lbt0"]:
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)        # during start-up or just after
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out
    assert "stopped cleanly" in out
    assert leftovers(nsname) == []
    assert not (tmp_path / "s.sock").exists()


def test_bad_config_exits_2_before_touching_the_network(nsname, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(sock=tmp_path / "s.sock").replace("port = 80", "port = 0", 1))
    r = run(nsname, cfg)
    assert r.returncode == 2 and "vip[0].port" in r.stdout
    assert leftovers(nsname) == []
