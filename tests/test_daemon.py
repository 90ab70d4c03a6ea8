"""`lbcore run` on its own, in a throwaway namespace: start-up failures undo
everything, SIGTERM during start-up is honoured, a bad config never touches
the network."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    assert not (tmp_path / "s.sock").exists()
    # a clean stop keeps the reply path reserved: the backend's rule, blackholes for its
    # replies and for the VIP (the next start takes them over); `lbcore cleanup` removes them
    assert_reserved(nsname)
    cleanup(nsname, cfg)
    assert leftovers(nsname) == []


def assert_reserved(ns: str) -> None:
    left = leftovers(ns)
    # the port rule, and the port-less one (fragmented replies, pass-through) that an IPv4
    # TCP backend gets unless the kernel's reverse-path filter is strict
    rp_filter = int(netconf.run_in_netns(ns, netconf.sysctl_get, "net/ipv4/conf/all/rp_filter"))
    want = [("198.19.200.11/32", "80:80")] + ([("198.19.200.11/32", None)] if rp_filter != 1
                                               else [])
    assert sorted(((r.src, r.sport) for r in left if isinstance(r, netconf.RuleInfo)),
                  key=str) == sorted(want, key=str)
    assert [(r.dst, r.type) for r in left
            if isinstance(r, netconf.RouteInfo) and r.proto == 0xF4] == [("default", 6)]
    assert [(r.dst, r.type) for r in netconf.routes(ns) if r.proto == 0xF4] == [
        ("198.18.200.1/32", 6)]


def cleanup(ns: str, cfg) -> None:
    p = netconf.popen_in_netns(ns, [sys.executable, "-m", "lbcore", "cleanup", "-c", str(cfg)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert not [r for r in netconf.routes(ns, table=None) if r.proto == 0xF4]


def test_restart_adopts_the_reservation_and_cleanup_on_exit_removes_it(nsname, tmp_path):
    """A start finds the previous run's rules and blackholes and keeps them (no moment without
    them); --cleanup-on-exit leaves nothing."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(sock=tmp_path / "s.sock"))
    for argv in ([], ["--cleanup-on-exit"]):
        p = netconf.popen_in_netns(nsname, [sys.executable, "-m", "lbcore", "run", "-c",
                                            str(cfg), *argv],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while not (tmp_path / "s.sock").exists():
                assert time.monotonic() < deadline and p.poll() is None
                time.sleep(0.02)
            assert_reserved(nsname)
            assert [r for r in netconf.routes(nsname, table=4242) if r.oif == "lbt0"]
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()
        assert p.returncode == 0, out
    assert leftovers(nsname) == []
    assert not [r for r in netconf.routes(nsname, table=None) if r.proto == 0xF4]


def test_bad_config_exits_2_before_touching_the_network(nsname, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(sock=tmp_path / "s.sock").replace("port = 80", "port = 0", 1))
    r = run(nsname, cfg)
    assert r.returncode == 2 and "vip[0].port" in r.stdout
    assert leftovers(nsname) == []


def test_a_reload_refuses_by_name_what_is_fixed_at_start_and_takes_the_rest():
    """Settings the running process cannot change (sizes, devices, the rates given to the
    data plane at start) make a reload fail with their name; the busy-poll window does not
    (the workers read it live)."""
    from lbcore.config import parse_config
    from lbcore.daemon import _unreloadable
    base = CONFIG.format(sock="/run/lbt.sock").replace('metrics_listen = ""\n', "")
    old = parse_config(base)
    for line, key in (("reject_rate = 7", "global.reject_rate"),
                      ("reject_burst = 9", "global.reject_burst"),
                      ("client_table_size = 1024", "global.client_table_size"),
                      ('log_level = "debug"', "global.log_level"),
                      ('metrics_listen = ""', "global.metrics_listen"),
                      ("workers = 2", "global.workers"),
                      ("worker_cpus = [0]", "global.worker_cpus")):
        new = parse_config(base.replace("[global]\n", f"[global]\n{line}\n"))
        problems = _unreloadable(old, new)
        assert len(problems) == 1 and problems[0].startswith(f"{key} changed"), problems
        assert problems[0].endswith("needs a restart")
    for section, key in (("[global.timeouts]\nudp = 5\n", "global.timeouts"),
                         ("[global.fragments]\ntimeout = 5\n", "global.fragments")):
        problems = _unreloadable(old, parse_config(base + "\n" + section))
        assert len(problems) == 1 and problems[0].startswith(f"{key} changed"), problems
    assert _unreloadable(old, parse_config(base.replace("[global]\n",
                                                        "[global]\nbusy_poll_us = 500\n"))) == []


def test_control_cpus_are_the_ones_no_worker_takes():
    from lbcore.daemon import control_cpus
    assert control_cpus({0, 1, 2, 3}, [3, 2]) == {0, 1}
    assert control_cpus({0, 1}, [1]) == {0}
    assert control_cpus({0, 1}, [1, 0]) is None          # no CPU left: share them all
    assert control_cpus({0}, [None]) is None              # one CPU: the workers are not pinned
    assert control_cpus({4, 5, 6}, [6, 5, 4, 6]) is None  # more workers than CPUs


def _allowed(pid: int) -> dict[int, set[int]]:
    """Thread ID -> the CPUs it may run on (its Cpus_allowed_list: "0-2,5"), for every thread
    of ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            for line in text.splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    cpus: set[int] = set()
                    for part in line.split(":", 1)[1].strip().split(","):
                        lo, _, hi = part.partition("-")
                        cpus.update(range(int(lo), int(hi or lo) + 1))
                    out[int(tid)] = cpus
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
@pytest.mark.parametrize("chosen", [False, True], ids=["automatic", "worker_cpus"])
def test_the_worker_has_its_cpu_to_itself(nsname, tmp_path, chosen):
    """One worker on a machine of several CPUs: the worker thread is pinned to the highest
    CPU (automatic) or to the one global.worker_cpus names (here the lowest), and every other
    thread of the process (event loop, executor, health checks) runs on the others, as
    `status` says, threads started later (the executor's) too."""
    from lbcore.control.client import request
    cpus = sorted(os.sched_getaffinity(0))
    mine = cpus[0] if chosen else cpus[-1]
    rest = [c for c in cpus if c != mine]
    sock = tmp_path / "s.sock"
    cfg = tmp_path / "c.toml"
    line = f"workers = 1\nworker_cpus = [{mine}]\n" if chosen else "workers = 1\n"
    cfg.write_text(CONFIG.format(sock=sock).replace("[global]\n", "[global]\n" + line))
    p = netconf.popen_in_netns(nsname, [sys.executable, "-m", "lbcore", "run", "-c", str(cfg)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        st = request(str(sock), {"cmd": "status"})
        assert st["cpus"] == {"workers": [mine], "control": rest}
        allowed = _allowed(p.pid)
        pinned = [t for t, a in allowed.items() if a == {mine}]
        assert len(pinned) == 1, allowed                      # the worker, alone
        others = [a for t, a in allowed.items() if t not in pinned]
        assert others and all(a == set(rest) for a in others), allowed
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        cleanup(nsname, cfg)
    assert p.returncode == 0, out
    assert f"workers on CPU(s) {mine}; the control plane on CPU(s)" in out


def test_run_refuses_worker_cpus_it_may_not_use(nsname, tmp_path):
    """A CPU outside the process's affinity: exit 2 with the key and the CPUs it may use,
    before the network is touched."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(sock=tmp_path / "s.sock").replace(
        "[global]\n", "[global]\nworker_cpus = [4095]\n"))
    r = run(nsname, cfg)
    assert r.returncode == 2, r.stdout
    assert "global.worker_cpus: CPU 4095 is not one this process may run on" in r.stdout
    assert leftovers(nsname) == []
