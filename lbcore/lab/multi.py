"""The lab with several gateways (``lbcore lab up --gateways N``, N >= 2): active-active behind
a router that spreads flows by ECMP over what the gateways announce over BGP.

The topology (names and addresses are a contract, as in the one-gateway lab)::

    lbc-client          lbc-rtr                          lbc-gwI (I = 1..N)
    lbc-cl-rtr <-veth-> lbc-rtr-cl 198.18.0.1/24         lbc-gwI-rtr 198.18.1.(10+I)/24
    198.18.0.2/24       lbc-rtr-br 198.18.1.1/24 <-veth-> (port lbc-rtr-gwI)
    default via         BIRD 2: BGP + BFD from every      lbcore run (+ its own BIRD)
      198.18.0.1          gateway, merge paths, L4 hash   keepalived (VRRP on the rack)
                                                          lbc-gwI-rk 198.19.0.(1+I)/24
    lbc-rack: bridge lbc-br0, ports lbc-rk-gwI and lbc-rk-beJ (a switch: no address)
    lbc-beJ: lbc-beJ-gw 198.19.0.(10+J)/24, default via 198.19.0.1 (the VRRP address)

IPv6 (``--ipv6``) mirrors it: 2001:db8::/64 client side, 2001:db8:2::/64 between router and
gateways (router ::1, gateway ::(10+I)), 2001:db8:1::/64 on the rack (VRRP ::1, gateway
::(1+I), backend ::(10+J)).

The router (AS 65000) runs BIRD with BFD and ``merge paths``; the kernel hashes flows on the
5-tuple (fib_multipath_hash_policy 1) over the gateways that announce a VIP. Each gateway
(AS 65001) runs ``lbcore run`` with a ``[bgp]`` section: lbcore starts its own BIRD, which the
lab records by PID once the balancer is ready. The backends' replies go to the VRRP address;
keepalived on every gateway tracks the balancer's anchor device, so the master is always a
gateway whose balancer runs, and any running balancer translates any reply (the Maglev table
is the same everywhere). The router is the only way in from the client; the root namespace
gets nothing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from .. import netconf
from ..bgp import bird
from . import (
    BALANCER_READY_TIMEOUT,
    BRIDGE,
    CLIENT_NS,
    CLIENT_V4,
    CLIENT_V6,
    GW_CLIENT_V4,
    GW_CLIENT_V6,
    V4_PREFIX,
    V6_PREFIX,
    LabError,
    LabSpec,
    LabState,
    Proc,
    _balancer_ready,
    _locked,
    _save,
    _spawn,
    _stop,
    backend_if,
    backend_ns,
    load_state,
    log_tail,
    paths,
    proc_alive,
    starttime,
)

MAX_GATEWAYS = 4
RTR_NS = "lbc-rtr"
RACK_NS = "lbc-rack"
CLIENT_IF = "lbc-cl-rtr"
RTR_CLIENT_IF = "lbc-rtr-cl"
RTR_BRIDGE = "lbc-rtr-br"
RTR_V4, RTR_V6 = "198.18.1.1", "2001:db8:2::1"
RACK_VIP_V4, RACK_VIP_V6 = "198.19.0.1", "2001:db8:1::1"   # VRRP: the backends' gateway
RTR_AS, GW_AS = 65000, 65001
VRRP_ID = 42                 # virtual router id (v4); v6 uses VRRP_ID + 1
VRRP_ADVERT = 0.1            # s: a backup takes over ~3.5 adverts after the master goes
ANCHOR = "lbcore-bgp"
WITHDRAW_GRACE = 2.0
SYNC_PORT = 7700
# The lab's flow-sync key: only the lab's own gateways, on the lab's rack, ever see it.
SYNC_KEY = "lbcore-lab-sync-key-not-a-secret"


def gateway_ns(i: int) -> str:
    """Namespace of gateway ``i`` (1-based)."""
    return f"lbc-gw{i}"


def gw_uplink(i: int) -> str:
    return f"lbc-gw{i}-rtr"


def gw_racklink(i: int) -> str:
    return f"lbc-gw{i}-rk"


def gw_v4(i: int) -> str:
    """Gateway ``i``'s address towards the router (its BGP next hop)."""
    return f"198.18.1.{10 + i}"


def gw_v6(i: int) -> str:
    return f"2001:db8:2::{10 + i}"


def gw_rack_v4(i: int) -> str:
    return f"198.19.0.{1 + i}"


def gw_rack_v6(i: int) -> str:
    return f"2001:db8:1::{1 + i}"


def gw_dir(i: int) -> Path:
    """Gateway ``i``'s files: its config, control socket, log, BIRD's and keepalived's."""
    return paths()["dir"] / f"gw{i}"


def rtr_dir() -> Path:
    return paths()["dir"] / "rtr"


def gateway_socket(i: int) -> Path:
    return gw_dir(i) / "lbcore.sock"


def namespaces(spec: LabSpec) -> list[str]:
    return ([CLIENT_NS, RTR_NS] + [gateway_ns(i) for i in range(1, spec.gateways + 1)]
            + [RACK_NS] + [backend_ns(j) for j in range(1, spec.backends + 1)])


# --------------------------------------------------------------------------- network

def build_network(spec: LabSpec, changes: netconf.NetChanges) -> None:
    nc = netconf
    for ns in namespaces(spec):
        nc.netns_create(ns, changes=changes)
        if spec.ipv6:
            nc.sysctl_set("net.ipv6.conf.default.accept_dad", 0, netns=ns)
            nc.sysctl_set("net.ipv6.conf.all.accept_dad", 0, netns=ns)
    nc.sysctl_set("net.ipv4.ip_local_port_range", "1024 65535", netns=CLIENT_NS)
    nc.sysctl_set("net.ipv4.tcp_tw_reuse", 1, netns=CLIENT_NS)
    for ns in [RTR_NS] + [gateway_ns(i) for i in range(1, spec.gateways + 1)]:
        nc.sysctl_set("net.ipv4.ip_forward", 1, netns=ns)
        nc.sysctl_set("net.ipv6.conf.all.forwarding", 1, netns=ns)
    # ECMP on the 5-tuple, so that the flows of one client spread over the gateways
    nc.sysctl_set("net.ipv4.fib_multipath_hash_policy", 1, netns=RTR_NS)
    nc.sysctl_set("net.ipv6.fib_multipath_hash_policy", 1, netns=RTR_NS)

    # client <-> router
    nc.veth_add(CLIENT_IF, RTR_CLIENT_IF, netns=CLIENT_NS, peer_netns=RTR_NS, changes=changes)
    nc.addr_add(CLIENT_IF, f"{CLIENT_V4}/{V4_PREFIX}", netns=CLIENT_NS)
    nc.addr_add(RTR_CLIENT_IF, f"{GW_CLIENT_V4}/{V4_PREFIX}", netns=RTR_NS)
    nc.route_add("default", gateway=GW_CLIENT_V4, netns=CLIENT_NS)
    if spec.ipv6:
        nc.addr_add(CLIENT_IF, f"{CLIENT_V6}/{V6_PREFIX}", netns=CLIENT_NS)
        nc.addr_add(RTR_CLIENT_IF, f"{GW_CLIENT_V6}/{V6_PREFIX}", netns=RTR_NS)
        nc.route_add("default", gateway=GW_CLIENT_V6, netns=CLIENT_NS)

    # router <-> gateways: one segment (a bridge in the router)
    nc.bridge_add(RTR_BRIDGE, netns=RTR_NS, changes=changes)
    nc.addr_add(RTR_BRIDGE, f"{RTR_V4}/{V4_PREFIX}", netns=RTR_NS)
    if spec.ipv6:
        nc.addr_add(RTR_BRIDGE, f"{RTR_V6}/{V6_PREFIX}", netns=RTR_NS)
    # the rack: a switch with no address of its own
    nc.bridge_add(BRIDGE, netns=RACK_NS, changes=changes)
    for i in range(1, spec.gateways + 1):
        ns = gateway_ns(i)
        nc.veth_add(gw_uplink(i), f"lbc-rtr-gw{i}", netns=ns, peer_netns=RTR_NS,
                    changes=changes)
        nc.link_set(f"lbc-rtr-gw{i}", netns=RTR_NS, master=RTR_BRIDGE)
        nc.addr_add(gw_uplink(i), f"{gw_v4(i)}/{V4_PREFIX}", netns=ns)
        nc.route_add("default", gateway=RTR_V4, netns=ns)
        nc.veth_add(gw_racklink(i), f"lbc-rk-gw{i}", netns=ns, peer_netns=RACK_NS,
                    changes=changes)
        nc.link_set(f"lbc-rk-gw{i}", netns=RACK_NS, master=BRIDGE)
        nc.addr_add(gw_racklink(i), f"{gw_rack_v4(i)}/{V4_PREFIX}", netns=ns)
        if spec.ipv6:
            nc.addr_add(gw_uplink(i), f"{gw_v6(i)}/{V6_PREFIX}", netns=ns)
            nc.route_add("default", gateway=RTR_V6, netns=ns)
            nc.addr_add(gw_racklink(i), f"{gw_rack_v6(i)}/{V6_PREFIX}", netns=ns)
    for j in range(1, spec.backends + 1):
        ns = backend_ns(j)
        nc.veth_add(backend_if(j), f"lbc-rk-be{j}", netns=ns, peer_netns=RACK_NS,
                    changes=changes)
        nc.link_set(f"lbc-rk-be{j}", netns=RACK_NS, master=BRIDGE)
        nc.addr_add(backend_if(j), f"198.19.0.{10 + j}/{V4_PREFIX}", netns=ns)
        nc.route_add("default", gateway=RACK_VIP_V4, netns=ns)
        if spec.ipv6:
            nc.addr_add(backend_if(j), f"2001:db8:1::{10 + j}/{V6_PREFIX}", netns=ns)
            nc.route_add("default", gateway=RACK_VIP_V6, netns=ns)


# --------------------------------------------------------------------------- configs

def bgp_section(spec: LabSpec, i: int) -> list[str]:
    """Gateway ``i``'s [bgp] section."""
    neighbors = [f'{{ address = "{RTR_V4}", as = {RTR_AS} }}']
    next_hop = [f'"{gw_v4(i)}"']
    if spec.ipv6:
        neighbors.append(f'{{ address = "{RTR_V6}", as = {RTR_AS} }}')
        next_hop.append(f'"{gw_v6(i)}"')
    return ["[bgp]", f"local_as = {GW_AS}", f'router_id = "{gw_v4(i)}"',
            f"neighbors = [{', '.join(neighbors)}]", "bfd = true", "hold_time = 3",
            f"next_hop = [{', '.join(next_hop)}]", f"withdraw_grace = {WITHDRAW_GRACE}",
            f'run_dir = "{gw_dir(i)}"', f'anchor_device = "{ANCHOR}"', ""]


def sync_section(spec: LabSpec, i: int) -> list[str]:
    """Gateway ``i``'s [sync] section: it listens on its rack address, the other gateways
    are its peers. The rack, not the router's link: it is the network all gateways share
    whichever of them the router still reaches."""
    peers = [f'"{gw_rack_v4(j)}:{SYNC_PORT}"' for j in range(1, spec.gateways + 1) if j != i]
    return ["[sync]", f'listen = "{gw_rack_v4(i)}:{SYNC_PORT}"',
            f"peers = [{', '.join(peers)}]", f'key = "{SYNC_KEY}"', "refresh = 1", ""]


def router_bird_config(spec: LabSpec) -> str:
    """The router's BIRD: BGP + BFD from every gateway, ECMP routes into the kernel."""
    p = bird.BirdPaths(rtr_dir())
    out = ["# Generated by `lbcore lab up`: the rack's router.",
           f"router id {RTR_V4};", f'log "{p.log}" all;', 'timeformat protocol "%s";', "",
           "protocol device { scan time 10; }", ""]
    for fam in (4, 6):
        out += [f"protocol kernel k{fam} {{", "  merge paths on;",
                f"  ipv{fam} {{ import none; export all; }};", "}", ""]
    out += ["protocol bfd {",
            '  interface "*" { min rx interval 100 ms; min tx interval 100 ms; '
            "multiplier 3; };", "}", ""]
    for i in range(1, spec.gateways + 1):
        peers = [("", RTR_V4, gw_v4(i), 4)]
        if spec.ipv6:
            peers.append(("v6", RTR_V6, gw_v6(i), 6))
        for suffix, local, peer, fam in peers:
            out += [f"protocol bgp gw{i}{suffix} {{", f"  local {local} as {RTR_AS};",
                    f"  neighbor {peer} as {GW_AS};", "  hold time 3;",
                    "  keepalive time 1;", "  connect retry time 1;",
                    "  error wait time 1, 5;", "  graceful restart off;", "  bfd on;",
                    f"  ipv{fam} {{ import all; export none; }};", "}", ""]
    return "\n".join(out)


def keepalived_config(spec: LabSpec, i: int) -> str:
    """Gateway ``i``'s keepalived: the backends' default gateway as a VRRP address, held only
    by a gateway whose balancer runs (track_interface on the balancer's anchor device, which
    dies with the process). nopreempt: a gateway that comes back does not take the address
    from a working one.

    The master repeats its gratuitous ARP every second. When a master goes, two backups of
    equal priority may both take over for a moment and both announce the address, and the
    backends keep the MAC they heard last, which may be the loser's. Its running balancer
    still translates what reaches it, which hides the stale entry until that balancer
    stops: then every reply is dropped until the entry times out. The refresh corrects it
    within a second.
    (``vrrp_min_garp`` must not be used with it: it turns the refresh's repeat count to 0.)"""
    out = ["global_defs {", f"  router_id lbc-gw{i}", "  vrrp_version 3",
           "  dynamic_interfaces", "  vrrp_garp_master_repeat 3",
           "  vrrp_garp_master_delay 0",
           "  vrrp_garp_master_refresh 1", "  vrrp_garp_master_refresh_repeat 1",
           "}", ""]
    fams = [("4", RACK_VIP_V4, 32, VRRP_ID)]
    if spec.ipv6:
        fams.append(("6", RACK_VIP_V6, 128, VRRP_ID + 1))
    for suffix, vip, plen, vrid in fams:
        out += [f"vrrp_instance rack{suffix} {{", "  state BACKUP", "  nopreempt",
                f"  interface {gw_racklink(i)}", f"  virtual_router_id {vrid}",
                "  priority 100", f"  advert_int {VRRP_ADVERT}",
                f"  track_interface {{\n    {ANCHOR}\n  }}",
                f"  virtual_ipaddress {{\n    {vip}/{plen} dev {gw_racklink(i)}\n  }}", "}", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- processes

def start_router(state: LabState) -> None:
    d = rtr_dir()
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    p = bird.BirdPaths(d)
    p.config.write_text(router_bird_config(state.spec))
    _spawn(state, "bird-rtr", RTR_NS, ["bird", "-f", "-c", str(p.config), "-s", str(p.socket),
                                       "-P", str(p.pidfile)], d / "bird.stdout")
    deadline = time.monotonic() + 10
    while True:
        try:
            bird.command(p.socket, "show status", timeout=1.0)
            return
        except (OSError, bird.BirdError) as e:
            if time.monotonic() > deadline:
                raise LabError(f"the router's BIRD did not answer: {e}; its log:\n"
                               f"{log_tail(d / 'bird.stdout')}") from None
            time.sleep(0.05)


def start_gateway(state: LabState, i: int) -> None:
    """Start gateway ``i``'s balancer, wait until it is ready, record its BIRD; then its
    keepalived (once, it survives balancer restarts)."""
    from . import render_config
    d = gw_dir(i)
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    cfg, log = d / "lbcore.toml", d / "balancer.log"
    cfg.write_text(render_config(state.spec, gateway=i))
    argv = [sys.executable, "-m", "lbcore", "run", "-c", str(cfg)]
    offset = log.stat().st_size if log.exists() else 0
    child = _spawn(state, f"balancer-gw{i}", gateway_ns(i), argv, log)
    deadline = time.monotonic() + BALANCER_READY_TIMEOUT
    while not _balancer_ready(log, offset):
        rc = child.poll()
        if rc is not None:
            raise LabError(f"gateway {i}'s balancer exited (status {rc}) before it was ready; "
                           f"the end of its log {log}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise LabError(f"gateway {i}'s balancer was not ready after "
                           f"{BALANCER_READY_TIMEOUT:.0f} s; its log:\n{log_tail(log)}")
        time.sleep(0.05)
    _record_bird(state, i)
    role = f"keepalived-gw{i}"
    if not any(p.role == role and proc_alive(p) for p in state.processes):
        state.processes[:] = [p for p in state.processes if p.role != role]
        kconf = d / "keepalived.conf"
        kconf.write_text(keepalived_config(state.spec, i))
        _spawn(state, role, gateway_ns(i),
               ["keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
                "--use-file", str(kconf), "--pid", str(d / "keepalived.pid"),
                "--vrrp_pid", str(d / "keepalived-vrrp.pid")], d / "keepalived.log")


def _record_bird(state: LabState, i: int) -> None:
    """Record the BIRD that gateway i's balancer started (it forks away from lbcore), so that
    `lab down` stops it by PID even after the balancer crashed."""
    role = f"bird-gw{i}"
    state.processes[:] = [p for p in state.processes if p.role != role or proc_alive(p)]
    pid = bird.running_pid(bird.BirdPaths(gw_dir(i)))
    if pid is None or any(p.pid == pid for p in state.processes):
        _save(state)
        return
    st = starttime(pid)
    state.processes.append(Proc(role=role, netns=gateway_ns(i), pid=pid,
                                starttime=st if st is not None else -1,
                                argv=["bird", "-c", str(bird.BirdPaths(gw_dir(i)).config)],
                                log=str(bird.BirdPaths(gw_dir(i)).log)))
    _save(state)


def up(state: LabState) -> None:
    """Start what runs in the lab beyond the backends' servers: router, gateways."""
    start_router(state)
    if state.spec.balancer:
        for i in range(1, state.spec.gateways + 1):
            start_gateway(state, i)


def stop_stray_birds() -> list[str]:
    """BIRDs of gateways that no state entry names (a balancer restarted outside the lab's
    view): found by their pid files and checked by their command line (their config path)."""
    done = []
    for i in range(1, MAX_GATEWAYS + 1):
        p = bird.BirdPaths(gw_dir(i))
        pid = bird.running_pid(p)
        if pid is None:
            continue
        st = starttime(pid)
        done.append(_stop(Proc(role=f"bird-gw{i}", netns=gateway_ns(i), pid=pid,
                               starttime=st if st is not None else -1, argv=[], log="")))
    return done


# --------------------------------------------------------------------------- operations

def _gateway_proc(state: LabState, i: int) -> Proc | None:
    return next((p for p in reversed(state.processes) if p.role == f"balancer-gw{i}"), None)


def kill_balancer(i: int, sig: int = signal.SIGKILL, timeout: float = 30.0) -> float:
    """Send gateway ``i``'s balancer ``sig`` and wait until it is gone; returns the
    time.monotonic() at which the signal was sent."""
    with _locked():
        state = load_state()
        if state is None:
            raise LabError("no lab is up")
        p = _gateway_proc(state, i)
        if p is None or not proc_alive(p):
            raise LabError(f"gateway {i}'s balancer is not running")
        t = time.monotonic()
        os.kill(p.pid, sig)
        deadline = time.monotonic() + timeout
        while proc_alive(p) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)
            time.sleep(0.01)
        _stop(p)
        state.processes.remove(p)
        _save(state)
        return t


def kill_box(i: int) -> float:
    """A box failure: SIGKILL every process in gateway ``i``'s namespace, set its links down.
    Returns the time.monotonic() of the first kill."""
    with _locked():
        state = load_state()
        if state is None:
            raise LabError("no lab is up")
        ns = gateway_ns(i)
        t = time.monotonic()
        for _ in range(3):     # a process may fork while its siblings die
            pids = netconf.netns_pids([ns]).get(ns, [])
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for li in netconf.links(ns):
            if li.name != "lo" and li.kind == "veth":
                netconf.link_set(li.name, netns=ns, state="down")
        for p in [p for p in state.processes if p.netns == ns]:
            _stop(p)
            state.processes.remove(p)
        _save(state)
        return t


def start_balancer(i: int) -> Proc:
    """Start gateway ``i``'s balancer again (after kill_balancer or a drain + stop)."""
    with _locked():
        state = load_state()
        if state is None:
            raise LabError("no lab is up")
        start_gateway(state, i)
        _save(state)
        p = _gateway_proc(state, i)
        assert p is not None
        return p


def router_nexthops(vip: str) -> list[str]:
    """The gateways the router sends ``vip`` to now (its ECMP next hops)."""
    plen = 128 if ":" in vip else 32
    return netconf.route_nexthops(f"{vip}/{plen}", netns=RTR_NS)


def gateway_lines(state: LabState) -> list[str]:
    """`lab status`: per gateway its namespace, balancer PID, BGP state and announcements."""
    lines = ["gateways:"]
    for i in range(1, state.spec.gateways + 1):
        p = _gateway_proc(state, i)
        pid = f"pid {p.pid} {'alive' if proc_alive(p) else 'DEAD'}" if p else "no balancer"
        sock = bird.BirdPaths(gw_dir(i)).socket
        try:
            rows = {r.name: r for r in bird.protocols(sock)}
            sessions = ", ".join(f"{r.info.split()[0] if r.info else r.state}"
                                 for n, r in sorted(rows.items()) if n.startswith("n"))
            announced = []
            for n in rows:
                if n.startswith("n"):
                    announced += bird.exported(sock, n)
            bgp = f"BGP {sessions or '-'}; announces {', '.join(announced) or 'nothing'}"
        except (OSError, bird.BirdError):
            bgp = "BGP speaker not running; announces nothing"
        lines.append(f"  gw{i}  {gateway_ns(i):<8} balancer {pid:<18} {bgp}")
    try:
        rows = bird.protocols(bird.BirdPaths(rtr_dir()).socket)
        lines.append("router lbc-rtr: " + ", ".join(
            f"{r.name} {r.info.split()[0] if r.info else r.state}" for r in rows
            if r.proto == "BGP"))
    except (OSError, bird.BirdError):
        lines.append("router lbc-rtr: BIRD not running")
    return lines


def check_tools() -> None:
    """bird and keepalived must be installed (Debian: bird2, keepalived)."""
    import shutil
    missing = [t for t in ("bird", "keepalived") if shutil.which(t) is None]
    if missing:
        raise LabError(f"--gateways needs {' and '.join(missing)} (Debian packages bird2, "
                       "keepalived)")

