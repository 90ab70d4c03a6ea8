"""`lbcore lab up|down|status`: a whole rack in network namespaces on this machine.

The topology (the names and addresses are a contract that tests, the demo, the benchmarks and
operators' scripts rely on)::

    lbc-client                 lbc-gw                                 lbc-be1 .. lbc-beN
    lbc-cl-gw  <--veth-->  lbc-gw-cl                 lbc-gw-beI <--veth-->  lbc-beI-gw
    198.18.0.2/24          198.18.0.1/24   lbc-br0:  (bridge port)         198.19.0.(10+I)/24
    2001:db8::2/64         2001:db8::1/64  198.19.0.1/24, 2001:db8:1::1/64 2001:db8:1::(10+I)/64
    default via 198.18.0.1 (forwarding on)                                 default via 198.19.0.1

The VIP 198.18.100.1 (2001:db8:100::1 with --ipv6) serves TCP 80 and UDP 5300; the lab assigns it
to no interface: the balancer in lbc-gw routes it into its TUN device (``--mode rawsock``: takes
its frames off lbc-gw-cl and sends them out of lbc-br0 with AF_PACKET, docs/rawsock.md).
Each backend runs ``lbcore.lab.servers`` (HTTP :80, UDP :5300, bulk sink :9000 and source
:9001). Unless ``--no-balancer``, ``lbcore run`` is started in lbc-gw from a config generated
here.

/run/lbcore-lab/state.json holds the plan before anything is made and each process's PID as
soon as it starts, so ``lab down`` can remove the lab after a crash at any point (namespaces are
found by their names even without the file): processes are stopped by their recorded
PID (checked against their recorded start time, so a reused PID is never hit), the namespaces
are deleted (which deletes their veths), the state directory goes. The root namespace gets no
lab address and no route: every link of the lab is created inside a lab namespace.
``lab up`` refuses while any lab namespace or state file exists (it never tears down a lab
someone may be using); ``lab down`` first, which is always safe.

``--gateways N`` (2..4) builds the active-active lab of :mod:`.multi` instead (router, N
gateways with BGP and VRRP, the rack's switch); one gateway keeps the topology above exactly.

All network set-up goes through :mod:`lbcore.netconf` (pyroute2); nothing shells out to ip.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import netconf
from .servers import DIGEST_PORT, HTTP_PORT, SINK_PORT, SOURCE_PORT, UDP_PORT

__all__ = [
    "BRIDGE", "CLIENT_NS", "CLIENT_V4", "CLIENT_V6", "GW_BACKEND_V4", "GW_BACKEND_V6",
    "GW_CLIENT_V4", "GW_CLIENT_V6", "GW_NS", "HTTP_PORT", "SINK_PORT", "SOURCE_PORT", "UDP_PORT",
    "VIP_V4", "VIP_V6", "LabError", "LabSpec", "LabState", "Proc", "backend_ns", "backend_name",
    "backend_v4", "backend_v6", "down", "load_state", "paths", "render_config", "status_text",
    "up", "cmd_up", "cmd_down", "cmd_status",
]

# --------------------------------------------------------------------------- the contract

CLIENT_NS = "lbc-client"
GW_NS = "lbc-gw"
BRIDGE = "lbc-br0"
CLIENT_IF = "lbc-cl-gw"        # in lbc-client
GW_CLIENT_IF = "lbc-gw-cl"     # in lbc-gw, its peer
TUN_NAME = "lbc0"
METRICS_LISTEN = "127.0.0.1:9150"

CLIENT_V4, GW_CLIENT_V4, GW_BACKEND_V4 = "198.18.0.2", "198.18.0.1", "198.19.0.1"
CLIENT_V6, GW_CLIENT_V6, GW_BACKEND_V6 = "2001:db8::2", "2001:db8::1", "2001:db8:1::1"
V4_PREFIX, V6_PREFIX = 24, 64
VIP_V4, VIP_V6 = "198.18.100.1", "2001:db8:100::1"
MAX_BACKENDS = 240             # 198.19.0.(10+i) must stay below .255

STATE_DIR = Path("/run/lbcore-lab")
LOCK_FILE = Path("/run/lbcore-lab.lock")   # serialises up/down of concurrent callers
LEASE_FILE = Path("/run/lbcore-lab.test.lock")  # one user of the lab at a time: see turn()
LEASE_TIMEOUT = 600.0

SERVER_READY_TIMEOUT = 15.0     # s: a backend's servers must listen by then
BALANCER_READY_TIMEOUT = 30.0   # s: the balancer's control socket or "ready" log line
STOP_TIMEOUT = 5.0              # s: SIGTERM, then SIGKILL

_LAB_NS = re.compile(r"^lbc-(client|gw|gw[0-9]+|rtr|rack|be[0-9]+)$")


def backend_ns(i: int) -> str:
    """Namespace of backend ``i`` (1-based)."""
    return f"lbc-be{i}"


def backend_name(i: int) -> str:
    """What backend ``i``'s servers answer: ``be<i>``."""
    return f"be{i}"


def backend_if(i: int) -> str:
    """Backend ``i``'s end of its veth, in its namespace."""
    return f"lbc-be{i}-gw"


def gw_backend_if(i: int) -> str:
    """The gateway's end of backend ``i``'s veth (a port of the bridge)."""
    return f"lbc-gw-be{i}"


def backend_v4(i: int) -> str:
    """Backend ``i``'s IPv4 address: 198.19.0.(10+i)."""
    return f"198.19.0.{10 + i}"


def backend_v6(i: int) -> str:
    """Backend ``i``'s IPv6 address: 2001:db8:1::(10+i), the same digits as its IPv4 octet."""
    return f"2001:db8:1::{10 + i}"


def is_lab_netns(name: str) -> bool:
    """True for the names the lab uses (lbc-client, lbc-gw, lbc-be<N>; with several
    gateways lbc-rtr, lbc-gw<N>, lbc-rack)."""
    return bool(_LAB_NS.match(name))


class LabError(RuntimeError):
    """The lab could not be built (the message says why and what to do)."""


class LabExists(LabError):
    """``up()`` found a lab (namespaces or a state file) already there."""


@dataclass(frozen=True)
class LabSpec:
    """What ``lab up`` builds. ``balancer_argv`` replaces the balancer's command line (for tests
    of the start-up path); by default it is ``python -m lbcore run -c <config>``.
    ``gateways`` >= 2 builds the active-active lab of :mod:`.multi` instead of lbc-gw. ``digest``
    adds the VIP udp/5301 (the backends' digest service); ``global_extra`` and ``vip_extra``
    are config lines appended to ``[global]`` and to every ``[[vip]]`` table."""

    backends: int = 3
    ipv6: bool = False
    mode: str = "tun"
    workers: int = 1
    balancer: bool = True
    balancer_argv: tuple[str, ...] | None = None
    gateways: int = 1
    digest: bool = False
    global_extra: tuple[str, ...] = ()
    vip_extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.gateways <= 4:
            raise ValueError(f"gateways must be 1..4, not {self.gateways}")
        if not 1 <= self.backends <= MAX_BACKENDS:
            raise ValueError(f"backends must be 1..{MAX_BACKENDS}, not {self.backends}")
        if self.mode not in ("tun", "rawsock"):
            raise ValueError(f"mode must be tun or rawsock, not {self.mode!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")

    @property
    def namespaces(self) -> list[str]:
        if self.gateways > 1:
            from .multi import namespaces
            return namespaces(self)
        return [CLIENT_NS, GW_NS] + [backend_ns(i) for i in range(1, self.backends + 1)]


@dataclass
class Proc:
    """A process the lab started: killed only by this PID, if its start time still matches."""

    role: str
    netns: str
    pid: int
    starttime: int
    argv: list[str]
    log: str


@dataclass
class LabState:
    """What state.json holds."""

    spec: LabSpec
    status: str = "building"          # building | up
    processes: list[Proc] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["paths"] = {k: str(v) for k, v in paths().items()}
        d["namespaces"] = self.spec.namespaces
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabState:
        spec = dict(d["spec"])
        for k in ("balancer_argv", "global_extra", "vip_extra"):
            if spec.get(k) is not None:
                spec[k] = tuple(spec[k])
        return cls(spec=LabSpec(**spec), status=d.get("status", "building"),
                   processes=[Proc(**p) for p in d.get("processes", [])],
                   created=d.get("created", 0.0))

    def backend_addresses(self, family: int = socket.AF_INET) -> list[str]:
        """The backends' addresses, be1 first."""
        fn = backend_v6 if family == socket.AF_INET6 else backend_v4
        return [fn(i) for i in range(1, self.spec.backends + 1)]


def paths(state_dir: Path | None = None) -> dict[str, Path]:
    """Where the lab keeps its files (state, balancer config, control socket, logs)."""
    d = state_dir or STATE_DIR
    return {"dir": d, "state": d / "state.json", "config": d / "lbcore.toml",
            "control_socket": d / "lbcore.sock", "balancer_log": d / "balancer.log",
            "flow_file": d / "flows.shm"}


# --------------------------------------------------------------------------- state file

def load_state() -> LabState | None:
    """The recorded lab, or None. A corrupt file is reported as a LabError."""
    p = paths()["state"]
    try:
        return LabState.from_json(json.loads(p.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise LabError(f"{p} is unreadable ({e}); `lbcore lab down` removes it") from e


def _save(state: LabState) -> None:
    p = paths()["state"]
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    os.replace(tmp, p)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise up/down/status of processes running at the same time."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def present_namespaces() -> list[str]:
    """Lab namespaces that exist now (whatever state.json says)."""
    return [n for n in netconf.netns_list("lbc-") if is_lab_netns(n)]


# --------------------------------------------------------------------------- processes

# Popen objects of the processes this Python process started, to reap them (no zombies, and no
# "still running" warnings) when `down()` runs in the same process, as in tests.
_children: dict[int, subprocess.Popen] = {}


def starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live, non-zombie process, else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def proc_alive(p: Proc) -> bool:
    """True if the recorded process is still the one the lab started and has not exited."""
    return starttime(p.pid) == p.starttime


def _reap(pid: int) -> None:
    child = _children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stop(p: Proc, timeout: float = STOP_TIMEOUT) -> str:
    """SIGTERM the recorded process, SIGKILL it after ``timeout``. Returns what happened."""
    if not proc_alive(p):
        _reap(p.pid)
        return f"{p.role} (pid {p.pid}) was not running"
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive(p):
            _reap(p.pid)
            return f"stopped {p.role} (pid {p.pid})"
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while proc_alive(p) and time.monotonic() < deadline:
        time.sleep(0.02)
    _reap(p.pid)
    return f"killed {p.role} (pid {p.pid}) after {timeout:.0f} s"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:80]
    except OSError:
        return "?"


def child_env() -> dict[str, str]:
    """The environment of lab processes: they import this very lbcore (a worktree or an
    install), unbuffered so that their logs are current."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _spawn(state: LabState, role: str, netns: str, argv: list[str], log: Path,
           pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start ``argv`` in ``netns`` as a daemon of the lab (own session, log file) and record it
    in state.json at once."""
    with open(log, "ab") as logf:
        child = netconf.popen_in_netns(
            netns, argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True, env=child_env(), cwd="/", pass_fds=tuple(pass_fds))
    _children[child.pid] = child
    start = starttime(child.pid)
    state.processes.append(Proc(role=role, netns=netns, pid=child.pid,
                                starttime=start if start is not None else -1,
                                argv=list(argv), log=str(log)))
    _save(state)
    return child


def log_tail(path: str | Path, nbytes: int = 4000) -> str:
    """The end of a log file (for error messages)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return "(no log)"


# --------------------------------------------------------------------------- building

def _build_network(spec: LabSpec, changes: netconf.NetChanges) -> None:
    nc = netconf
    for ns in spec.namespaces:
        nc.netns_create(ns, changes=changes)
    # Routers do not need DAD and the lab's addresses are unique: no tentative addresses.
    for ns in spec.namespaces:
        if spec.ipv6:
            nc.sysctl_set("net.ipv6.conf.default.accept_dad", 0, netns=ns)
            nc.sysctl_set("net.ipv6.conf.all.accept_dad", 0, netns=ns)
    # The client opens thousands of connections a second: with the default 28k ports and
    # 60 s of TIME_WAIT a 5 s burst would exhaust them and measure the client, not the lab.
    nc.sysctl_set("net.ipv4.ip_local_port_range", "1024 65535", netns=CLIENT_NS)
    nc.sysctl_set("net.ipv4.tcp_tw_reuse", 1, netns=CLIENT_NS)
    nc.sysctl_set("net.ipv4.ip_forward", 1, netns=GW_NS)
    nc.sysctl_set("net.ipv6.conf.all.forwarding", 1, netns=GW_NS)

    nc.veth_add(CLIENT_IF, GW_CLIENT_IF, netns=CLIENT_NS, peer_netns=GW_NS, changes=changes)
    nc.addr_add(CLIENT_IF, f"{CLIENT_V4}/{V4_PREFIX}", netns=CLIENT_NS)
    nc.addr_add(GW_CLIENT_IF, f"{GW_CLIENT_V4}/{V4_PREFIX}", netns=GW_NS)
    nc.bridge_add(BRIDGE, netns=GW_NS, changes=changes)
    nc.addr_add(BRIDGE, f"{GW_BACKEND_V4}/{V4_PREFIX}", netns=GW_NS)
    if spec.ipv6:
        nc.addr_add(CLIENT_IF, f"{CLIENT_V6}/{V6_PREFIX}", netns=CLIENT_NS)
        nc.addr_add(GW_CLIENT_IF, f"{GW_CLIENT_V6}/{V6_PREFIX}", netns=GW_NS)
        nc.addr_add(BRIDGE, f"{GW_BACKEND_V6}/{V6_PREFIX}", netns=GW_NS)
    nc.route_add("default", gateway=GW_CLIENT_V4, netns=CLIENT_NS)
    if spec.ipv6:
        nc.route_add("default", gateway=GW_CLIENT_V6, netns=CLIENT_NS)

    for i in range(1, spec.backends + 1):
        ns = backend_ns(i)
        nc.veth_add(backend_if(i), gw_backend_if(i), netns=ns, peer_netns=GW_NS,
                    changes=changes)
        nc.link_set(gw_backend_if(i), netns=GW_NS, master=BRIDGE)
        nc.addr_add(backend_if(i), f"{backend_v4(i)}/{V4_PREFIX}", netns=ns)
        nc.route_add("default", gateway=GW_BACKEND_V4, netns=ns)
        if spec.ipv6:
            nc.addr_add(backend_if(i), f"{backend_v6(i)}/{V6_PREFIX}", netns=ns)
            nc.route_add("default", gateway=GW_BACKEND_V6, netns=ns)


def _wait_ready(children: list[tuple[Proc, subprocess.Popen, int]], timeout: float) -> None:
    """Wait until every server wrote "ready" to its pipe; LabError with its log if one dies."""
    deadline = time.monotonic() + timeout
    pending = {fd: (p, c) for p, c, fd in children}
    got: dict[int, bytes] = {fd: b"" for fd in pending}
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                roles = ", ".join(p.role for p, _ in pending.values())
                raise LabError(f"servers not ready after {timeout:.0f} s: {roles}")
            readable, _, _ = select.select(list(pending), [], [], left)
            for fd in readable:
                data = os.read(fd, 64)
                got[fd] += data
                if b"ready" in got[fd]:
                    del pending[fd]
                elif not data:
                    p, child = pending[fd]
                    rc = child.poll()
                    raise LabError(f"{p.role} in {p.netns} exited (status {rc}) before it was "
                                   f"ready; its log {p.log}:\n{log_tail(p.log)}")
    finally:
        for _, _, fd in children:
            with contextlib.suppress(OSError):
                os.close(fd)


def _start_servers(state: LabState, which: Sequence[int] | None = None) -> None:
    spec = state.spec
    started = []
    for i in which or range(1, spec.backends + 1):
        r, w = os.pipe()
        argv = [sys.executable, "-m", "lbcore.lab.servers", "--name", backend_name(i),
                "--ready-fd", str(w)]
        if spec.ipv6:
            argv.append("--ipv6")
        try:
            child = _spawn(state, backend_name(i), backend_ns(i), argv,
                           paths()["dir"] / f"{backend_name(i)}.log", pass_fds=(w,))
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        started.append((state.processes[-1], child, r))
    _wait_ready(started, SERVER_READY_TIMEOUT)


def render_config(spec: LabSpec, state_dir: Path | None = None,
                  gateway: int | None = None,
                  backends: Sequence[tuple[int, int]] | None = None) -> str:
    """The balancer's TOML config for the lab (schema: lbcore.config). ``gateway`` i: the config
    of lbc-gw<i> in the several-gateway lab (own socket, flow file and links, a [bgp] section).
    ``backends``: which backends the pools have, as (backend number, weight); default every
    backend, weight 1."""
    chosen = list(backends) if backends is not None else [
        (i, 1) for i in range(1, spec.backends + 1)]
    p = paths(state_dir)
    client_link, backend_link = GW_CLIENT_IF, BRIDGE
    if gateway is not None:
        from . import multi
        p = {**p, "control_socket": multi.gateway_socket(gateway),
             "flow_file": multi.gw_dir(gateway) / "flows.shm"}
        client_link, backend_link = multi.gw_uplink(gateway), multi.gw_racklink(gateway)
    out = [
        f"# Generated by `lbcore lab up`: the lab's balancer in "
        f"{GW_NS if gateway is None else f'lbc-gw{gateway}'}.",
        "[global]",
        f'mode = "{spec.mode}"',
        f"workers = {spec.workers}",
        f'tun_name = "{TUN_NAME}"',
        f'control_socket = "{p["control_socket"]}"',
        f'metrics_listen = "{METRICS_LISTEN}"',
        f'flow_file = "{p["flow_file"]}"',
        *spec.global_extra,
        "",
    ]
    if spec.mode == "rawsock":
        # the gateway's two links: the client veth, and the bridge whose ports are the backends'
        # veths (an AF_PACKET socket on the bridge sees what the bridge delivers to the host,
        # and what it sends there the bridge forwards to the right port)
        out += ["[rawsock]", f'client_link = "{client_link}"',
                f'backend_link = "{backend_link}"', ""]
    if gateway is not None:
        from . import multi
        out += multi.bgp_section(spec, gateway)
        out += multi.sync_section(spec, gateway)
    families = [("", VIP_V4, backend_v4)]
    if spec.ipv6:
        families.append(("6", VIP_V6, backend_v6))
    services = [(HTTP_PORT, "tcp", "web", 'http"\npath = "/health'),
                (UDP_PORT, "udp", "dns", 'udp"\npayload = "health'),
                (SINK_PORT, "tcp", "sink", "tcp"), (SOURCE_PORT, "tcp", "source", "tcp")]
    if spec.digest:
        services.append((DIGEST_PORT, "udp", "digest", 'udp"\npayload = "health'))
    for suffix, vip, _ in families:
        for port, proto, pool, _check in services:
            out += ["[[vip]]", f'address = "{vip}"', f"port = {port}",
                    f'protocol = "{proto}"', f'pool = "{pool}{suffix}"', *spec.vip_extra, ""]
    for suffix, _, addr in families:
        for port, _proto, pool, check in services:
            name = f"{pool}{suffix}"
            out.append(f"[pool.{name}]")
            out.append("backends = [")
            for i, weight in chosen:
                out.append(f'    {{ address = "{addr(i)}", port = {port}, weight = {weight} }},')
            out += ["]", "", f"[pool.{name}.health]", f'type = "{check}"', "interval = 1",
                    "timeout = 0.5", "rise = 1", "fall = 2", ""]
    return "\n".join(out)


def _balancer_ready(log: Path, offset: int) -> bool:
    """True once the balancer wrote its "ready" line past ``offset`` (the log is appended to
    across restarts, so an earlier run's line must not count)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            for line in f:
                if re.search(rb"\bready\b", line) and not re.search(rb"\bnot ready\b", line):
                    return True
    except FileNotFoundError:
        pass
    return False


def _start_balancer(state: LabState, config: str | None = None) -> None:
    p = paths()
    p["config"].write_text(render_config(state.spec) if config is None else config)
    argv = (list(state.spec.balancer_argv) if state.spec.balancer_argv
            else [sys.executable, "-m", "lbcore", "run", "-c", str(p["config"])])
    offset = p["balancer_log"].stat().st_size if p["balancer_log"].exists() else 0
    child = _spawn(state, "balancer", GW_NS, argv, p["balancer_log"])
    deadline = time.monotonic() + BALANCER_READY_TIMEOUT
    while not _balancer_ready(p["balancer_log"], offset):
        rc = child.poll()
        if rc is not None:
            raise LabError(f"the balancer exited (status {rc}) before it was ready; the end of "
                           f"its log {p['balancer_log']}:\n{log_tail(p['balancer_log'])}")
        if time.monotonic() > deadline:
            raise LabError(f"the balancer was not ready after {BALANCER_READY_TIMEOUT:.0f} s "
                           f"(no 'ready' line in its log); "
                           f"the end of its log:\n{log_tail(p['balancer_log'])}")
        time.sleep(0.05)


def up(spec: LabSpec | None = None, *, out: Callable[[str], object] = print) -> LabState:
    """Build the lab. Refuses (LabError) if a lab or any lab namespace exists: run down() first.

    On any failure half-way everything made so far is removed again (and the error raised).
    """
    spec = spec or LabSpec()
    with _locked():
        existing = present_namespaces()
        if paths()["state"].exists() or existing:
            what = ", ".join(existing) if existing else str(paths()["state"])
            raise LabExists(f"a lab already exists ({what}); `lbcore lab down` removes it")
        paths()["dir"].mkdir(mode=0o755, parents=True, exist_ok=True)
        state = LabState(spec=spec)
        _save(state)  # before anything is made: `down` can always clean up
        try:
            if spec.gateways > 1:
                from . import multi
                multi.check_tools()
            with netconf.NetChanges() as changes:
                if spec.gateways > 1:
                    multi.build_network(spec, changes)
                else:
                    _build_network(spec, changes)
                changes.commit()
            _start_servers(state)
            if spec.gateways > 1:
                multi.up(state)
            elif spec.balancer:
                _start_balancer(state)
            state.status = "up"
            _save(state)
        except BaseException:
            _down_locked(out=lambda _: None)
            raise
    where = GW_NS if spec.gateways == 1 else f"lbc-gw1..{spec.gateways} behind lbc-rtr"
    out(f"lab up: {spec.backends} backends{' with IPv6' if spec.ipv6 else ''}, "
        f"balancer {'in ' + where if spec.balancer else 'not started'}; "
        f"VIP {VIP_V4}{' ' + VIP_V6 if spec.ipv6 else ''} tcp/{HTTP_PORT} udp/{UDP_PORT}")
    return state


def stop_backend(i: int) -> None:
    """Stop backend i's servers (its namespace stays): a backend failure, for health tests."""
    with _locked():
        state = load_state()
        if state is None:
            raise LabError("no lab is up")
        for p in [p for p in state.processes if p.role == backend_name(i)]:
            _stop(p)
            state.processes.remove(p)
        _save(state)


def start_backend(i: int) -> None:
    """Start backend i's servers again (after stop_backend)."""
    with _locked():
        state = load_state()
        if state is None:
            raise LabError("no lab is up")
        if any(p.role == backend_name(i) and proc_alive(p) for p in state.processes):
            return
        _start_servers(state, [i])
        _save(state)


def stop_balancer(sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> bool:
    """Send the lab's balancer ``sig`` (SIGKILL simulates a crash) and wait until it is gone
    and reaped; False if there was none running. The lab stays up without a balancer."""
    with _locked():
        state = load_state()
        procs = [p for p in state.processes if p.role == "balancer"] if state else []
        for p in procs:
            if proc_alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
                child = _children.pop(p.pid, None)
                if child is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=timeout)
                deadline = time.monotonic() + timeout
                while proc_alive(p) and time.monotonic() < deadline:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(p.pid, os.WNOHANG)
                    time.sleep(0.02)
            _stop(p)   # SIGKILL if it ignored sig; reaps
            state.processes.remove(p)
        if state is not None:
            _save(state)
        return bool(procs)


def restart_balancer(*, kill_signal: int = signal.SIGTERM, config: str | None = None) -> Proc:
    """Stop the lab's balancer with ``kill_signal`` and start it again, from the lab's config,
    or from ``config`` (TOML text, e.g. render_config's with another backend set); returns the
    new process. For tests of restart and crash recovery."""
    stop_balancer(kill_signal)
    with _locked():
        state = load_state()
        if state is None or not state.spec.balancer:
            raise LabError("no lab with a balancer is up")
        _start_balancer(state, config)
        _save(state)
        return [p for p in state.processes if p.role == "balancer"][-1]


# --------------------------------------------------------------------------- down / status

def _down_locked(out: Callable[[str], object]) -> list[str]:
    done: list[str] = []
    try:
        state = load_state()
    except LabError as e:
        out(str(e))
        state = None
    if state is not None:
        # The balancers first, so that they undo their own network changes (and stop the
        # BIRDs they started) while the lab stands.
        for p in sorted(state.processes, key=lambda p: not p.role.startswith("balancer")):
            done.append(_stop(p))
    if paths()["dir"].exists():
        from .multi import stop_stray_birds
        done += stop_stray_birds()
    present = present_namespaces()
    for ns, pids in netconf.netns_pids(present).items():
        for pid in pids:  # not ours to kill: say so, as they keep the namespace alive
            out(f"warning: pid {pid} ({_cmdline(pid)}) still runs in {ns}; `lab down` stops "
                "only the processes the lab started")
    for ns in present:
        if netconf.netns_remove(ns):
            done.append(f"removed netns {ns}")
    d = paths()["dir"]
    if d.exists():
        for f in sorted(d.iterdir()):
            if f.is_dir():     # a gateway's or the router's files (several gateways)
                shutil.rmtree(f, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            d.rmdir()
        done.append(f"removed {d}")
    for line in done:
        out(line)
    return done


def down(*, out: Callable[[str], object] = print) -> list[str]:
    """Remove everything the lab made; idempotent, and works after a crash. Returns what it did."""
    with _locked():
        return _down_locked(out)


def status_text() -> tuple[bool, str]:
    """(healthy, report): namespaces, links and addresses, processes, the balancer's files."""
    state = load_state()
    present = present_namespaces()
    p = paths()
    if state is None and not present:
        return False, "no lab (nothing in /run/lbcore-lab, no lbc-* namespace)"
    lines = []
    healthy = state is not None and state.status == "up"
    if state is None:
        lines.append(f"lab: no state file, but namespaces exist: {', '.join(present)} "
                     "(run `lbcore lab down`)")
    else:
        s = state.spec
        bal = f"yes (mode {s.mode}, {s.workers} workers)" if s.balancer else "no"
        lines.append(f"lab: {state.status}, {s.backends} backends, "
                     f"ipv6 {'yes' if s.ipv6 else 'no'}, balancer {bal}; state {p['state']}")
        missing = [n for n in s.namespaces if n not in present]
        if missing:
            healthy = False
            lines.append(f"missing namespaces: {', '.join(missing)}")
    lines.append(f"VIP {VIP_V4}"
                 + (f", {VIP_V6}" if state is not None and state.spec.ipv6 else "")
                 + f": tcp/{HTTP_PORT} (pool web), udp/{UDP_PORT} (pool dns)")
    lines.append("namespaces:")
    for ns in present:
        lines.append(f"  {ns}")
        try:
            addrs: dict[str, list[str]] = {}
            for ifname, a in netconf.addresses(ns):
                if not a.startswith("fe80:"):
                    addrs.setdefault(ifname, []).append(a)
            for li in netconf.links(ns):
                if li.name == "lo":
                    continue
                extra = f" master {li.master}" if li.master else ""
                lines.append(f"    {li.name:<12} {li.kind or '-':<7} "
                             f"{'up' if li.up else 'down':<5}{extra} "
                             f"{' '.join(addrs.get(li.name, []))}".rstrip())
            for r in netconf.routes(ns):
                if r.dst == "default":
                    lines.append(f"    default via {r.gateway}")
        except (OSError, TimeoutError) as e:
            lines.append(f"    (cannot read: {e})")
    if state is not None:
        lines.append("processes:")
        for proc in state.processes:
            alive = proc_alive(proc)
            healthy = healthy and alive
            lines.append(f"  {proc.role:<9} pid {proc.pid:<8} {'alive' if alive else 'DEAD':<6} "
                         f"in {proc.netns:<10} log {proc.log}")
        if state.spec.gateways > 1:
            from .multi import gateway_lines
            lines += gateway_lines(state)
        elif state.spec.balancer:
            sock = p["control_socket"]
            lines += ["balancer:",
                      f"  config          {p['config']}",
                      f"  control socket  {sock} ({'present' if sock.exists() else 'absent'})",
                      f"  log             {p['balancer_log']}",
                      f"  metrics         http://{METRICS_LISTEN}/metrics (in {GW_NS})"]
        else:
            lines.append("balancer: not started (--no-balancer)")
    return healthy, "\n".join(lines)


# --------------------------------------------------------------------------- CLI verbs

# --------------------------------------------------------------------------- turns

@contextlib.contextmanager
def turn(timeout: float = LEASE_TIMEOUT) -> Iterator[None]:
    """Machine-wide turn-taking among the lab's users (tests, the lab benchmark, the demo):
    the lab's names are fixed, so only one of them can have a lab at a time.

    Held for a whole use of the lab (many up/down calls), unlike up/down's own short lock,
    which only makes each call atomic; a user holding its turn can still run `lbcore lab`
    commands in subprocesses."""
    fd = os.open(LEASE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another user of the lab holds {LEASE_FILE}") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def lease(spec: LabSpec | None = None, *, timeout: float = LEASE_TIMEOUT,
          **kwargs: Any) -> Iterator[LabState]:
    """The lab (``spec`` or ``LabSpec(**kwargs)``) for the duration of the ``with``: waits for
    its turn, removes a lab left over by a crash, builds this one and always removes it."""
    spec = spec or LabSpec(**kwargs)
    with turn(timeout):
        down(out=lambda _: None)
        try:
            yield up(spec, out=lambda _: None)
        finally:
            down(out=lambda _: None)


def cmd_up(args: argparse.Namespace) -> int:
    """`lbcore lab up`."""
    try:
        spec = LabSpec(backends=args.backends, ipv6=args.ipv6, mode=args.mode,
                       workers=args.workers, balancer=not args.no_balancer,
                       gateways=getattr(args, "gateways", 1))
        up(spec)
    except (LabError, ValueError) as e:
        print(f"lbcore lab up: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"lbcore lab up: {e} (the lab needs root)", file=sys.stderr)
        return 1
    healthy, text = status_text()
    print(text)
    return 0 if healthy else 1


def cmd_down(args: argparse.Namespace) -> int:
    """`lbcore lab down`."""
    try:
        done = down()
    except PermissionError as e:
        print(f"lbcore lab down: {e} (the lab needs root)", file=sys.stderr)
        return 1
    if not done:
        print("lab down: nothing to remove")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """`lbcore lab status`: 0 if the lab is up and every process alive, else 1."""
    try:
        healthy, text = status_text()
    except LabError as e:
        print(f"lbcore lab status: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0 if healthy else 1
