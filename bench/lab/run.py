"""`make bench-lab`: lbcore beside kernel forwarding, nftables DNAT and HAProxy, in the lab.

``python -m bench.lab.run [--quick] [--reps N] [--seconds S] [--systems ...] [--workloads ...]``
(root: it builds the namespace lab of :mod:`lbcore.lab`). What it does, in order:

1. installs what it drives if missing (apt: nftables, haproxy, iperf3, wrk, nginx, gcc) and
   builds the UDP sender (bench/lab/udpflood.c) into build/bench-lab/;
2. for each repetition, for each group of systems (rotated each repetition), brings a lab up:
   without a balancer for the kernel/nftables/HAProxy group, with lbcore (its own config: the
   lab's plus a bulk port and the nginx port, see peers.py) for each lbcore variant; pins the
   lab's servers to CPU 0, starts iperf3 in backend 1, nginx (the HTTP cells' server) and
   counters in every backend; then for every system of the group
   sets it up in lbc-gw, runs every workload cell (each bounded in time), tears it down;
   finally takes the lab down again;
3. writes bench/results/lab-<date>.json (machine facts, settings, every sample, the summary),
   the markdown table and two PNG charts beside it (:mod:`bench.lab.report`).

The lab is always taken down at the end, also on failure or Ctrl-C, and every process the bench
started is stopped by its PID. Each round holds the lab lock that test sessions take, so they
take turns; a lab that someone brought up by hand is never touched: the bench stops instead.

Pinning: load generators, the backends' servers and this driver on CPU 0; the forwarder on
CPU 1 (HAProxy and lbcore by taskset; lbcore's workers pin themselves to the highest CPU). Kernel
forwarding and nftables run in softirq context wherever the packet is; with veth that is mostly
the sender's CPU, which the CPU table shows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import parse, peers, report
from .stats import interleave

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
BUILD = ROOT / "build" / "bench-lab"

GEN_CPU = 0          # generators, backend servers, this driver
FWD_CPU = 1          # the forwarder under test

APT_TOOLS = {"nft": "nftables", "haproxy": "haproxy", "iperf3": "iperf3", "wrk": "wrk",
             "nginx": "nginx", "gcc": "gcc", "taskset": "util-linux"}
# Debian's packages start their service when installed; the bench wants the binary only (its
# nginx runs in the backends' namespaces, never in the root namespace). invoke-rc.d asks this
# script first, and exit 101 means "do not start"; it is put in place only when there is none.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")

ALL_WORKLOADS = ("udp", "bulk1", "bulk4", "conn", "keepalive", "latency")
QUICK_WORKLOADS = ("udp", "bulk4", "conn", "latency")
# Other names accepted by --workloads (what the rows are called in prose).
WORKLOAD_ALIASES = {"http_new": "conn", "http_keepalive": "keepalive", "udp64": "udp",
                    "bulk": "bulk4"}
NGINX_READY_TIMEOUT = 10.0   # s: every backend's nginx listens by then
HTTP_WORKLOADS = {"conn", "keepalive", "latency"}   # the cells that talk to nginx

SENDER_DEST = "198.18.201.1"   # the sender-alone run's destination: dropped on entering lbc-gw

WRK_CONNS = 16          # per wrk process; one process per backend (kernel) or 3 to the VIP
WRK_TIMEOUT = "2s"
LAT_CONNS = 10          # latency cell: 10 connections ...
LAT_DELAY_MS = 10       # ... each waiting 10 ms after a response: about 1000 requests/s
SETTLE_S = 1.0          # pause between cells (queues drain, sockets close)
# The lab's names are one per machine: test sessions take turns through lbcore's lab lock (and
# remove any lab they find). The bench holds that lock for each round (one lab, up to down), so
# tests wait for a round instead of pulling the lab away mid-cell.
LOCK_TIMEOUT = 1200.0
FOREIGN_LAB_WAIT = 600.0   # s: how long to wait for a lab built without the lock to go
ROUND_GAP_S = 1.5       # between rounds, outside the lock (lab.turn polls every 0.2 s)


# --------------------------------------------------------------------------- systems

@dataclass(frozen=True)
class System:
    """A forwarder under test. ``group`` names the lab it runs on; systems of one group share
    a lab (one build per repetition)."""

    id: str
    label: str
    group: str
    mode: str | None = None       # lbcore: tun | rawsock
    workers: int = 0
    only: tuple[str, ...] = ()    # the workloads it runs (none: all)
    lbcore_global: tuple[str, ...] = ()   # [global] lines of its own


# lbcore's busy-poll window for the "polling" columns: longer than the latency cell's pauses
# (10 ms), so that its worker never sleeps - the cost is a whole core, which the CPU table shows
POLL_US = 20_000
POLL_GLOBAL = (f"busy_poll_us = {POLL_US}",)

SYSTEMS: dict[str, System] = {s.id: s for s in (
    System("kernel", "kernel forwarding", "peers"),
    System("nftables", "nftables DNAT (jhash)", "peers"),
    System("haproxy", "HAProxy (TCP mode)", "peers"),
    System("lbcore-tun-1w", "lbcore tun, 1 worker", "lbcore-tun-1w", "tun", 1),
    System("lbcore-tun-2w", "lbcore tun, 2 workers", "lbcore-tun-2w", "tun", 2),
    System("lbcore-rawsock-1w", "lbcore rawsock, 1 worker", "lbcore-rawsock-1w", "rawsock", 1),
    System("lbcore-rawsock-2w", "lbcore rawsock, 2 workers", "lbcore-rawsock-2w", "rawsock", 2),
    System("lbcore-tun-1w-poll", f"lbcore tun, 1 worker, busy_poll_us {POLL_US}",
           "lbcore-tun-1w-poll", "tun", 1, ("latency",), POLL_GLOBAL),
    System("lbcore-rawsock-1w-poll", f"lbcore rawsock, 1 worker, busy_poll_us {POLL_US}",
           "lbcore-rawsock-1w-poll", "rawsock", 1, ("latency",), POLL_GLOBAL),
)}
DEFAULT_SYSTEMS = tuple(SYSTEMS)

NOTES = [
    "Topology: `lbcore lab` (lbc-client 198.18.0.2 — lbc-gw — lbc-be1..3 198.19.0.11-13, veth "
    "links, VIP 198.18.100.1). Kernel forwarding talks to the backends' own addresses through "
    "lbc-gw (no balancing: the ceiling); every other system is reached through the VIP.",
    "Pinning: udpflood, iperf3 (client and server), wrk, nginx, the backends' servers and the "
    "driver on "
    "CPU 0; HAProxy and lbcore on CPU 1 (taskset; lbcore's workers pin themselves to the "
    "highest CPU). Kernel/nftables forwarding runs in softirq wherever the packet is, with veth "
    "mostly on the sender's CPU 0; their 'forwarder CPU' is the softirq time of CPU 1.",
    "UDP: bench/lab/udpflood.c (sendmmsg, batches of 64, 64 flows = source ports 20000-20063, "
    "64-byte payload) at full speed for the cell's length; offered = what it sent; delivered = "
    "the packets counted by an nftables counter at each backend's prerouting hook (then dropped "
    "there, so that the backends' Python UDP servers do not eat CPU 0); loss = 1 - "
    "delivered/offered. The sender's ceiling is the same flood to an address that lbc-gw "
    "drops at its first netfilter hook (prerouting, raw priority): sender + client link only.",
    "TCP bulk: iperf3 3.x, -P 1 and -P 4, -O 1 (first second omitted), receiver's figure; "
    "one iperf3 server on backend 1 (its control and data connections must meet one server, so "
    "the bulk VIP port 5201 has a one-backend pool in every system).",
    "HTTP: " + peers.NGINX_SETTINGS + ". New connections: "
    f"wrk -t1 -c{WRK_CONNS} -H 'Connection: close', three wrk processes (to the three backends "
    "for kernel forwarding, to the VIP otherwise); keep-alive: the same without the header. "
    "wrk and nginx share CPU 0: kernel forwarding and nftables add their softirq work to that "
    "CPU 0, user-space forwarders theirs to CPU 1, so these can exceed 1.0x.",
    "UDP CPU per packet: the forwarder's process time (lbcore: every worker; none for kernel "
    "forwarding and nftables) plus the softirq time of both CPUs during the cell (/proc/stat: "
    "where the kernel forwards, and where a user-space forwarder's packets enter and leave), "
    "less the softirq time the sender alone costs per packet sent (its own cell in the same "
    "repetition), per delivered packet. For lbcore, less the time its workers spent busy "
    "polling empty queues (lbcore_worker_busy_poll_seconds, read over the control socket "
    "before and after the cell): time spent on latency, idle otherwise. The sender's own "
    "system calls and other jobs' processes are not in it. What the sender's cell costs in "
    "softirq is a veth receive into lbc-gw and a drop at its first hook; the backends' "
    "counting drop is the same work on the far side, so the two stand in for each other and "
    "what remains is the forwarder's.",
    f"Latency: one wrk, -c{LAT_CONNS} keep-alive connections, each waiting {LAT_DELAY_MS} ms "
    "after a response (a Lua delay()), so about 1000 requests/s; wrk --latency's p50/p99 "
    "(wrk2 is not in Debian). The busy_poll_us columns run lbcore with a busy-poll window "
    f"({POLL_US} µs) longer than the cell's pauses, latency cell only: its worker never "
    "sleeps, so no packet waits for its CPU to wake (see the wakeprobe line), at the price of "
    "a whole core.",
    "nftables: one `jhash ip saddr . <proto> sport mod 3` DNAT map per service in the nat "
    "prerouting hook (as nftlb / kube-proxy's nftables mode), conntrack on, no masquerade.",
    "HAProxy: " + peers.HAPROXY_SETTINGS + "; the VIP is a local address of lbc-gw for it.",
    "lbcore: the lab's generated config (tcp 80 and udp 5300 over 3 backends with health checks) "
    f"plus the bulk port and tcp {peers.NGINX_PORT} over the 3 nginx (tcp health checks); "
    "everything else at its defaults.",
    "Client and gateway: ip_local_port_range 1024-65535 (the generators open ~10^5 "
    "connections per cell).",
]


# --------------------------------------------------------------------------- helpers

def log(msg: str) -> None:
    """Progress on stderr, time-stamped (a run takes a while)."""
    print(f"[bench-lab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _which(tool: str) -> str | None:
    """The tool's path; /usr/sbin too (nginx lives there, and a sudo PATH may lack it)."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _nginx_bin() -> str:
    return _which("nginx") or "nginx"


@contextlib.contextmanager
def no_service_start() -> Iterator[None]:
    """While installing, tell Debian's maintainer scripts not to start services (a packaged
    nginx would otherwise start listening on :80 in the root namespace). Leaves an existing
    policy-rc.d alone; removes only the one it wrote."""
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text("#!/bin/sh\n# bench/lab: installing tools, no service start\nexit 101\n")
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            POLICY_RC_D.unlink()


def ensure_tools(install: bool = True) -> None:
    """Install the Debian packages of missing tools (apt-get update once first)."""
    missing = sorted({pkg for tool, pkg in APT_TOOLS.items() if _which(tool) is None})
    if not missing:
        return
    if not install:
        raise SystemExit(f"bench-lab: missing tools; apt-get install {' '.join(missing)}")
    log(f"installing {' '.join(missing)} (apt)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    with no_service_start():
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env,
                       stdout=subprocess.DEVNULL)


def build_tool(name: str) -> Path:
    """Compile bench/lab/<name>.c (again if the source is newer): udpflood, wakeprobe."""
    src = Path(__file__).with_name(f"{name}.c")
    out = BUILD / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    BUILD.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                    "-pthread", "-o", str(out), str(src)], check=True)
    return out


def wakeprobe(tool: Path) -> dict[str, Any]:
    """The machine's own cost to a forwarder with a core of its own (bench/lab/wakeprobe.c):
    wake-up of a thread on the idle FWD_CPU by GEN_CPU, and the stalls of a thread spinning
    there. {"error": ...} if it failed."""
    try:
        r = subprocess.run([str(tool), "-a", str(GEN_CPU), "-b", str(FWD_CPU), "-n", "300",
                            "-p", "10", "-s", "3"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout).strip()[:200]}
        return json.loads(r.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        return {"error": str(e)}


def _first_line(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else "?"


def machine_facts() -> dict[str, Any]:
    """What the figures depend on: CPUs, memory, kernel, tool versions, lbcore's commit."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    try:
        from lbcore import __version__ as lbv
    except ImportError:
        lbv = "?"
    try:
        import lbcore._core as core
        core_path = str(Path(core.__file__).resolve())
    except ImportError as e:
        core_path = f"not importable: {e}"
    if not core_path.startswith(str(ROOT)):
        log(f"warning: lbcore._core comes from {core_path}, not this tree ({ROOT}): "
            "the figures are of that build (make build)")
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "lbcore_version": lbv,
        "lbcore_commit": commit + ("+dirty" if dirty else ""),
        "lbcore_commit_subject": _first_line(["git", "-C", str(ROOT), "log", "-1",
                                              "--format=%s"]),
        "lbcore_core": core_path,
        "python": platform.python_version(),
        "versions": {
            "haproxy": _first_line(["haproxy", "-v"]).replace("HAProxy version ", "")
            .split(" - ")[0],
            "nftables": _first_line(["nft", "--version"]),
            "iperf3": _first_line(["iperf3", "--version"]),
            "wrk": _first_line(["wrk", "-v"]).split(" Copyright")[0],
            "gcc": _first_line(["gcc", "--version"]),
            "nginx": _first_line([_nginx_bin(), "-v"]).replace("nginx version: ", ""),
        },
    }


def background_busy(seconds: float = 2.0) -> dict[str, float]:
    """Busy % of each CPU while the bench does nothing: what other jobs on the machine take."""
    before = parse.parse_proc_stat(Path("/proc/stat").read_text())
    time.sleep(seconds)
    after = parse.parse_proc_stat(Path("/proc/stat").read_text())
    return {str(c): round(d["busy"], 1) for c, d in parse.cpu_delta_pct(before, after).items()}


def haproxy_maxconn() -> int:
    """HAProxy's maxconn on this machine: as high as our descriptor limit lets it go."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return peers.haproxy_maxconn(hard if hard != resource.RLIM_INFINITY else 1 << 20)


def set_affinity(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (threads started later inherit it)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, {cpu})


def _children(pid: int) -> list[int]:
    """The child PIDs of ``pid`` (every thread's), from /proc."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                out += [int(x) for x in
                        Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def pid_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in clock ticks; None if it is gone."""
    try:
        ut, st = parse.parse_pid_stat(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None
    return ut + st


def _listening(pid: int, port: int) -> bool:
    """True if the process's network namespace has a TCP socket listening on ``port``."""
    want = f":{port:04X}"
    for f in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{f}").read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and cols[1].endswith(want) and cols[3] == "0A":
                    return True
    return False


def _unless_given(lines: Sequence[str], given: Sequence[str]) -> list[str]:
    """The ``KEY = VALUE`` lines of ``lines`` whose key ``given`` does not set (--lbcore-global
    wins over a system's own setting: one key twice would be a TOML error)."""
    keys = {g.split("=", 1)[0].strip() for g in given}
    return [ln for ln in lines if ln.split("=", 1)[0].strip() not in keys]


def lbcore_spin_s() -> float | None:
    """Seconds the lab balancer's workers have spent busy polling (status "busy_poll"), over
    its control socket; None if it does not answer."""
    from lbcore import lab
    from lbcore.control import ControlError, request
    try:
        return float(request(str(lab.paths()["control_socket"]), {"cmd": "status"})
                     ["busy_poll"]["seconds"])
    except (OSError, ControlError, KeyError, TypeError, ValueError):
        return None


class CpuWindow:
    """CPU used between start() and stop(): per CPU from /proc/stat, and the forwarder's
    process time (if it has a process) from /proc/<pid>/stat."""

    def __init__(self, fwd_pid: int | None) -> None:
        self.fwd_pid = fwd_pid
        self.hz = os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.s0 = parse.parse_proc_stat(Path("/proc/stat").read_text())
        self.p0 = pid_ticks(self.fwd_pid) if self.fwd_pid else None

    def stop(self) -> dict[str, Any]:
        s1 = parse.parse_proc_stat(Path("/proc/stat").read_text())
        p1 = pid_ticks(self.fwd_pid) if self.fwd_pid else None
        wall = time.monotonic() - self.t0
        per_cpu = {str(c): {k: round(v, 1) for k, v in d.items()}
                   for c, d in parse.cpu_delta_pct(self.s0, s1).items()}
        busy_s = parse.cpu_seconds(self.s0, s1, self.hz)
        softirq_s = parse.cpu_seconds(self.s0, s1, self.hz, ("softirq",))
        proc_s = (None if not self.fwd_pid or self.p0 is None or p1 is None
                  else (p1 - self.p0) / self.hz)
        if self.fwd_pid and self.p0 is not None and p1 is not None and wall > 0:
            fwd = 100.0 * (p1 - self.p0) / self.hz / wall
            how = "process"
        else:
            fwd = per_cpu.get(str(FWD_CPU), {}).get("softirq")
            how = f"softirq of CPU {FWD_CPU}"
        return {"forwarder_pct": None if fwd is None else round(fwd, 1), "forwarder_how": how,
                "per_cpu": per_cpu, "wall_s": round(wall, 3), "busy_s": round(busy_s, 4),
                "softirq_s": round(softirq_s, 4),
                "forwarder_s": None if proc_s is None else round(proc_s, 4)}


# --------------------------------------------------------------------------- the bench

class CellError(RuntimeError):
    """One cell failed; the run goes on, and the sample records why."""


class LabGone(CellError):
    """Our lab disappeared while we used it (someone ran `lbcore lab down`: the lab's names are
    one per machine). The round is dropped and run again once."""


@dataclass
class Targets:
    """Where a system's clients send: per HTTP generator process, UDP, bulk, latency."""

    http: list[str]
    udp: list[str]
    bulk: str
    latency: str


@dataclass
class Bench:
    """One run: settings, the processes it started, the samples it collected."""

    reps: int
    seconds: float
    workloads: list[str]
    systems: list[str]
    out_stem: Path
    command: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    take_lock: bool = True
    lbcore_global: tuple[str, ...] = ()  # extra [global] lines of lbcore's config
    doc: dict[str, Any] | None = None
    lab_created: float | None = None     # our lab's state.json "created": who owns the lab
    fwd_pid: int | None = None
    iperf_pid: int | None = None
    nginx_dir: Path | None = None        # the round's nginx configs and logs (a temp dir)
    nginx_workers: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, start)

    # -- processes ------------------------------------------------------------------------

    def spawn(self, netns: str, argv: Sequence[str], cpu: int = GEN_CPU,
              **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in ``netns`` pinned to ``cpu``; recorded so that it is always
        stopped (by PID) before the lab goes down."""
        from lbcore import netconf
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        p = netconf.popen_in_netns(netns, ["taskset", "-c", str(cpu), *argv],
                                   stdin=subprocess.DEVNULL, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        """Stop one process we started: ``sig``, then SIGKILL after ``timeout``."""
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        for s in (p.stdout, p.stderr):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p)

    def run(self, netns: str, argv: Sequence[str], timeout: float, cpu: int = GEN_CPU) -> str:
        """Run to completion (bounded by ``timeout``); its output, or CellError."""
        p = self.spawn(netns, argv, cpu)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.stop(p, signal.SIGKILL)
            raise CellError(f"{argv[0]} did not finish in {timeout:.0f} s") from e
        finally:
            if p in self.procs:
                self.stop(p)
        text = out.decode("utf-8", "replace") if out else ""
        if p.returncode != 0:
            raise CellError(f"{shlex.join(argv)} exited {p.returncode}: {text.strip()[-1500:]}")
        return text

    def run_many(self, netns: str, argvs: Sequence[Sequence[str]], timeout: float) -> list[str]:
        """Start several generators at once, wait for all (bounded), return their outputs."""
        ps = [self.spawn(netns, a) for a in argvs]
        outs = []
        deadline = time.monotonic() + timeout
        try:
            for p, a in zip(ps, argvs, strict=True):
                try:
                    out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired as e:
                    raise CellError(f"{a[0]} did not finish in {timeout:.0f} s") from e
                text = out.decode("utf-8", "replace") if out else ""
                if p.returncode != 0:
                    raise CellError(f"{shlex.join(a)} exited {p.returncode}: {text[-1500:]}")
                outs.append(text)
        finally:
            for p in ps:
                self.stop(p, signal.SIGKILL)
        return outs

    # -- the lab --------------------------------------------------------------------------

    @contextlib.contextmanager
    def lab(self, group: str) -> Iterator[Any]:
        """Bring up the lab for ``group`` and prepare it; always take it down again."""
        from lbcore import lab
        spec = self._lab_spec(group)
        try:
            with lab.turn(timeout=LOCK_TIMEOUT) if self.take_lock else contextlib.nullcontext():
                log(f"lab up ({group})")
                state = self._up(lab, spec)
                yield from self._use_lab(lab, group, state)
        finally:
            if self.take_lock:
                time.sleep(ROUND_GAP_S)   # a test session waiting for the lock gets its turn

    def _up(self, lab: Any, spec: Any) -> Any:
        """lab.up(); if someone's lab is up (built without the lock, as `lbcore demo` or a
        hand-made `lbcore lab up` does), wait for it to go rather than touch it."""
        deadline = time.monotonic() + FOREIGN_LAB_WAIT
        said = False
        while True:
            try:
                return lab.up(spec, out=lambda _: None)
            except lab.LabExists:
                if time.monotonic() > deadline:
                    raise
                if not said:
                    log(f"someone else's lab is up; waiting up to {FOREIGN_LAB_WAIT:.0f} s for "
                        "it to go (the bench never takes down a lab it did not build)")
                    said = True
                time.sleep(2.0)

    def _use_lab(self, lab: Any, group: str, state: Any) -> Iterator[Any]:
        self.lab_created = state.created
        try:
            try:
                self._prepare(lab, state)
            except (OSError, CellError, TimeoutError, subprocess.SubprocessError) as e:
                self.check_lab(e)   # LabGone if it vanished under us
                raise lab.LabError(f"preparing the lab for {group}: {e}") from e
            yield state
        finally:
            self.stop_all()
            self.stop_nginx_workers()
            self.fwd_pid = self.iperf_pid = None
            if self.owns_lab():
                lab.down(out=lambda _: None)
                log(f"lab down ({group})")
            else:
                log(f"lab ({group}) was gone already; not touching whatever is there now")
            self.lab_created = None

    def owns_lab(self) -> bool:
        """True if the lab on this machine is the one we brought up (never take down, or
        measure on, someone else's)."""
        from lbcore import lab
        try:
            st = lab.load_state()
        except lab.LabError:
            return False
        return st is not None and self.lab_created is not None and st.created == self.lab_created

    def check_lab(self, after: BaseException | None = None) -> None:
        """LabGone unless our lab is still there, whole (``after``: the error that made us
        look, quoted in the LabGone)."""
        from lbcore import lab
        why = f" (the cell's error: {str(after)[:300]})" if after is not None else ""
        if not self.owns_lab():
            raise LabGone("the lab was removed while the bench used it (someone ran `lbcore lab "
                          "down` or `lbcore demo` without the lab lock?)" + why)
        st = lab.load_state()
        missing = [n for n in st.spec.namespaces if n not in lab.present_namespaces()]
        if missing:
            raise LabGone(f"lab namespaces vanished while the bench ran: {', '.join(missing)}"
                          + why)

    def _lab_spec(self, group: str) -> Any:
        from lbcore import lab
        if group == "peers":
            return lab.LabSpec(balancer=False)
        s = next(s for s in SYSTEMS.values() if s.group == group)
        base = lab.LabSpec(mode=s.mode or "tun", workers=s.workers,
                           global_extra=(*_unless_given(s.lbcore_global, self.lbcore_global),
                                         *self.lbcore_global))
        BUILD.mkdir(parents=True, exist_ok=True)
        cfg = BUILD / f"{group}.toml"
        cfg.write_text(peers.lbcore_bench_config(
            lab.render_config(base), lab.VIP_V4, lab.backend_v4(1),
            [lab.backend_v4(i) for i in range(1, base.backends + 1)]))
        argv = ("taskset", "-c", str(FWD_CPU), sys.executable, "-m", "lbcore", "run",
                "-c", str(cfg))
        return lab.LabSpec(mode=s.mode or "tun", workers=s.workers, balancer_argv=argv)

    def _prepare(self, lab: Any, state: Any) -> None:
        from lbcore import netconf
        for p in state.processes:
            if p.role == "balancer":
                set_affinity(p.pid, FWD_CPU)
                self.fwd_pid = p.pid
            else:
                set_affinity(p.pid, GEN_CPU)
        for ns in (lab.CLIENT_NS, lab.GW_NS):
            netconf.sysctl_set("net.ipv4.ip_local_port_range", "1024\t65535", netns=ns)
        for i in range(1, state.spec.backends + 1):
            self._nft(lab.backend_ns(i), peers.backend_counter())
        ip = self.spawn(lab.backend_ns(1), ["iperf3", "-s", "-p", str(peers.BULK_PORT)],
                        stdout=subprocess.DEVNULL)
        self.iperf_pid = ip.pid
        self._wait(lambda: _listening(ip.pid, peers.BULK_PORT), "iperf3 server", 10, ip)
        if HTTP_WORKLOADS & set(self.workloads):
            self.start_nginx(state)

    # -- nginx: the HTTP cells' backends ---------------------------------------------------

    def start_nginx(self, state: Any) -> None:
        """One nginx per backend namespace, each from its own config in a temporary directory,
        started (and later stopped) by PID like every other process of the bench."""
        from lbcore import lab
        self.nginx_dir = Path(tempfile.mkdtemp(prefix="lbcore-bench-nginx-"))
        masters = []
        for i in range(1, state.spec.backends + 1):
            d = self.nginx_dir / lab.backend_name(i)
            d.mkdir()
            conf = d / "nginx.conf"
            conf.write_text(peers.nginx_config(lab.backend_name(i), str(d)))
            logf = open(d / "stderr.log", "wb")   # noqa: SIM115 (the child holds it)
            try:
                p = self.spawn(lab.backend_ns(i), [_nginx_bin(), "-p", str(d), "-c", str(conf),
                                                   "-e", "stderr"],
                               stdout=logf, stderr=subprocess.STDOUT)
            finally:
                logf.close()
            masters.append((p, d))
        deadline = time.monotonic() + NGINX_READY_TIMEOUT
        for p, d in masters:
            while not (_listening(p.pid, peers.NGINX_PORT) and _children(p.pid)):
                if p.poll() is not None or time.monotonic() > deadline:
                    why = (f"exited ({p.returncode})" if p.returncode is not None
                           else f"not listening after {NGINX_READY_TIMEOUT:.0f} s")
                    tail = (d / "stderr.log").read_text(errors="replace").strip()[-1500:]
                    raise CellError(f"nginx in {d.name} {why}: {tail}")
                time.sleep(0.05)
            # its worker: stopped with the master (SIGTERM), and by PID should the master die
            # without taking it along
            self.nginx_workers += [(w, lab.starttime(w)) for w in _children(p.pid)]

    def stop_nginx_workers(self) -> None:
        """After the masters were stopped: any nginx worker still alive (same PID and start
        time as when it was recorded) is killed; then the temporary directory goes."""
        from lbcore import lab
        for pid, start in self.nginx_workers:
            if start is not None and lab.starttime(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.nginx_workers = []
        if self.nginx_dir is not None:
            shutil.rmtree(self.nginx_dir, ignore_errors=True)
            self.nginx_dir = None

    def _nft(self, netns: str, ruleset: str) -> None:
        from lbcore import netconf
        p = netconf.popen_in_netns(netns, ["nft", "-f", "-"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = p.communicate(ruleset.encode(), timeout=20)
        if p.returncode != 0:
            raise CellError(f"nft -f in {netns} failed: {out.decode(errors='replace')}")

    def _nft_cmd(self, netns: str, *args: str) -> str:
        from lbcore import netconf
        p = netconf.popen_in_netns(netns, ["nft", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
        out, _ = p.communicate(timeout=20)
        if p.returncode != 0:
            raise CellError(f"nft {' '.join(args)} in {netns}: {out.decode(errors='replace')}")
        return out.decode()

    def _wait(self, ok: Callable[[], bool], what: str, timeout: float,
              proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise CellError(f"{what} exited ({proc.returncode}) before it was ready: "
                                f"{out.strip()[-1500:]}")
            if time.monotonic() > deadline:
                raise CellError(f"{what} not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def flood_counts(self, backends: int) -> list[int]:
        """Packets of the UDP flood counted at each backend so far."""
        from lbcore import lab
        out = []
        for i in range(1, backends + 1):
            doc = json.loads(self._nft_cmd(lab.backend_ns(i), "-j", "list", "counter", "inet",
                                           peers.NFT_TABLE, "flood"))
            out.append(next(int(x["counter"]["packets"]) for x in doc["nftables"]
                            if "counter" in x))
        return out

    # -- systems ----------------------------------------------------------------------------

    def targets(self, sid: str, backends: list[str], vip: str) -> Targets:
        port = peers.NGINX_PORT
        if sid == "kernel":
            return Targets(http=[f"http://{b}:{port}/" for b in backends], udp=list(backends),
                           bulk=backends[0], latency=f"http://{backends[0]}:{port}/")
        return Targets(http=[f"http://{vip}:{port}/"] * len(backends), udp=[vip], bulk=vip,
                       latency=f"http://{vip}:{port}/")

    @contextlib.contextmanager
    def system(self, sid: str, state: Any) -> Iterator[None]:
        """Set up a peer system in lbc-gw (lbcore is set up by the lab itself)."""
        from lbcore import lab, netconf
        backends = state.backend_addresses()
        if sid == "nftables":
            self._nft(lab.GW_NS, peers.nftables_dnat(lab.VIP_V4, backends))
            try:
                self._probe_vip()
                yield
            finally:
                self._nft_cmd(lab.GW_NS, "delete", "table", "ip", peers.NFT_TABLE)
        elif sid == "haproxy":
            BUILD.mkdir(parents=True, exist_ok=True)
            cfg = BUILD / "haproxy.cfg"
            cfg.write_text(peers.haproxy_config(lab.VIP_V4, backends, maxconn=haproxy_maxconn(),
                                                pidfile=str(BUILD / "haproxy.pid")))
            netconf.addr_add("lo", f"{lab.VIP_V4}/32", netns=lab.GW_NS)
            hp = None
            try:
                hp = self.spawn(lab.GW_NS, ["haproxy", "-db", "-f", str(cfg)], cpu=FWD_CPU)
                self._wait(lambda: _listening(hp.pid, peers.HTTP_PORT)
                           and _listening(hp.pid, peers.NGINX_PORT)
                           and _listening(hp.pid, peers.BULK_PORT), "haproxy", 10, hp)
                self.fwd_pid = hp.pid
                self._probe_vip()
                yield
            finally:
                self.fwd_pid = None
                if hp is not None:
                    self.stop(hp)
                netconf.addr_del("lo", f"{lab.VIP_V4}/32", netns=lab.GW_NS)
        else:
            if sid != "kernel":
                self._probe_vip()
            yield

    def _probe_vip(self, timeout: float = 15.0) -> None:
        """Wait until an HTTP request to the VIP's nginx port from the client gets an answer
        (health checks of the balancer may need a moment after start)."""
        from lbcore import lab, netconf
        # the port the cells use; the lab's own HTTP servers when no cell needs nginx
        port = peers.NGINX_PORT if self.nginx_dir is not None else peers.HTTP_PORT

        def once() -> bool:
            try:
                with socket.create_connection((lab.VIP_V4, port), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    return s.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

        deadline = time.monotonic() + timeout
        while not netconf.run_in_netns(lab.CLIENT_NS, once):
            if time.monotonic() > deadline:
                raise CellError(f"no HTTP answer from the VIP after {timeout:.0f} s")
            time.sleep(0.2)

    # -- workloads ----------------------------------------------------------------------------

    def cell(self, sid: str, workload: str, rep: int, fn: Callable[[], dict[str, Any]]) -> None:
        """Run one cell with CPU accounting; record a sample (with the error if it failed)."""
        fwd = self.fwd_pid if sid != "kernel" and sid != "nftables" and sid != "sender" else None
        win = CpuWindow(fwd)
        sample: dict[str, Any] = {"system": sid, "workload": workload, "rep": rep,
                                  "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
        try:
            self.check_lab()
            spin0 = lbcore_spin_s() if sid.startswith("lbcore") else None
            win.start()
            metrics = fn()
            sample["cpu"] = win.stop()
            spin1 = lbcore_spin_s() if spin0 is not None else None
            if spin0 is not None and spin1 is not None:
                sample["cpu"]["spin_s"] = round(spin1 - spin0, 4)
            sample["metrics"] = metrics
            log(f"  {sid:<18} {workload:<10} " + ", ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
                + f", fwd cpu {sample['cpu']['forwarder_pct']}%")
        except (CellError, parse.ParseError, OSError, subprocess.SubprocessError) as e:
            self.check_lab(e)   # a cell that failed because the lab went: LabGone instead
            sample["error"] = str(e)
            log(f"  {sid:<18} {workload:<10} FAILED: {e}")
        self.samples.append(sample)
        time.sleep(SETTLE_S)

    def w_udp(self, dests: list[str], backends: int, flood: Path) -> dict[str, Any]:
        from lbcore import lab
        before = self.flood_counts(backends)
        argv = [str(flood), "-d", ",".join(dests), "-p", str(peers.UDP_PORT),
                "-s", str(peers.FLOOD_SPORT0), "-f", str(peers.FLOOD_FLOWS), "-l", "64",
                "-t", f"{self.seconds:g}"]
        res = parse.parse_flood(self.run(lab.CLIENT_NS, argv, self.seconds + 15))
        time.sleep(0.5)   # let the queues (a TUN's holds 10000) drain into the counters
        after = self.flood_counts(backends)
        per = [a - b for a, b in zip(after, before, strict=True)]
        delivered = sum(per)
        sent, el = res["sent"], res["elapsed"]
        return {"offered_pps": sent / el, "delivered_pps": delivered / el,
                "loss_pct": 100.0 * (1 - delivered / sent) if sent else 0.0,
                "sent": sent, "delivered": delivered, "send_errors": res["errors"],
                "delivered_per_backend": per}

    def w_sender(self, flood: Path) -> dict[str, Any]:
        """The sender's own ceiling: the same flood to an address that lbc-gw drops at its
        first hook, so that nothing after the client's link limits it."""
        from lbcore import lab
        self._nft(lab.GW_NS, peers.sender_drop(SENDER_DEST))
        try:
            argv = [str(flood), "-d", SENDER_DEST, "-p", str(peers.UDP_PORT),
                    "-s", str(peers.FLOOD_SPORT0), "-f", str(peers.FLOOD_FLOWS), "-l", "64",
                    "-t", f"{self.seconds:g}"]
            res = parse.parse_flood(self.run(lab.CLIENT_NS, argv, self.seconds + 15))
            doc = json.loads(self._nft_cmd(lab.GW_NS, "-j", "list", "counter", "ip",
                                           peers.SENDER_TABLE, "dropped"))
            arrived = next(int(x["counter"]["packets"]) for x in doc["nftables"]
                           if "counter" in x)
        finally:
            self._nft_cmd(lab.GW_NS, "delete", "table", "ip", peers.SENDER_TABLE)
        return {"offered_pps": res["pps"], "sent": res["sent"], "send_errors": res["errors"],
                "arrived_pps": arrived / res["elapsed"]}

    def w_bulk(self, host: str, streams: int) -> dict[str, Any]:
        from lbcore import lab
        argv = ["iperf3", "-c", host, "-p", str(peers.BULK_PORT), "-t", f"{self.seconds:g}",
                "-O", "1", "-P", str(streams), "-J", "--connect-timeout", "3000"]
        res = parse.parse_iperf3(self.run(lab.CLIENT_NS, argv, self.seconds + 20))
        return {"gbps": res.gbps, "retransmits": res.retransmits, "streams": res.streams}

    def w_http(self, urls: list[str], close: bool) -> dict[str, Any]:
        from lbcore import lab
        extra = ["-H", "Connection: close"] if close else []
        argvs = [["wrk", "-t1", f"-c{WRK_CONNS}", f"-d{self.seconds:g}s", "--timeout",
                  WRK_TIMEOUT, *extra, u] for u in urls]
        outs = self.run_many(lab.CLIENT_NS, argvs, self.seconds + 20)
        rs = [parse.parse_wrk(o) for o in outs]
        key = "cps" if close else "rps"
        return {key: sum(r.rps for r in rs), "errors": sum(r.error_count for r in rs),
                "requests": sum(r.requests for r in rs)}

    def w_latency(self, url: str) -> dict[str, Any]:
        from lbcore import lab
        BUILD.mkdir(parents=True, exist_ok=True)
        script = BUILD / "delay.lua"
        script.write_text(peers.WRK_DELAY_LUA.format(delay_ms=LAT_DELAY_MS))
        argv = ["wrk", "-t1", f"-c{LAT_CONNS}", f"-d{self.seconds:g}s", "--timeout", WRK_TIMEOUT,
                "--latency", "-s", str(script), url]
        r = parse.parse_wrk(self.run(lab.CLIENT_NS, argv, self.seconds + 20))
        if 50.0 not in r.percentiles_us or 99.0 not in r.percentiles_us:
            raise CellError("wrk printed no latency distribution")
        return {"p50_us": r.percentiles_us[50.0], "p99_us": r.percentiles_us[99.0],
                "rate": r.rps, "errors": r.error_count}

    def run_system(self, sid: str, rep: int, state: Any, flood: Path) -> None:
        from lbcore import lab
        backends = state.backend_addresses()
        t = self.targets(sid, backends, lab.VIP_V4)
        cells: dict[str, Callable[[], dict[str, Any]]] = {
            "udp": lambda: self.w_udp(t.udp, len(backends), flood),
            "bulk1": lambda: self.w_bulk(t.bulk, 1),
            "bulk4": lambda: self.w_bulk(t.bulk, 4),
            "conn": lambda: self.w_http(t.http, close=True),
            "keepalive": lambda: self.w_http(t.http, close=False),
            "latency": lambda: self.w_latency(t.latency),
        }
        only = SYSTEMS[sid].only
        for w in self.workloads:
            if w == "udp" and sid == "haproxy":
                continue   # HAProxy (community) does not balance UDP
            if only and w not in only:
                continue
            self.cell(sid, w, rep, cells[w])

    # -- the whole run ----------------------------------------------------------------------

    def run_round(self, rep: int, group: str, live: list[str], flood: Path) -> None:
        """One lab, every live system of the group on it."""
        with self.lab(group) as state:
            if group == "peers" and "udp" in self.workloads:
                self.cell("sender", "udp", rep, lambda: self.w_sender(flood))
            for sid in live:
                try:
                    with self.system(sid, state):
                        self.run_system(sid, rep, state, flood)
                except LabGone:
                    raise
                except CellError as e:
                    self.check_lab(e)
                    log(f"  {sid}: set-up failed: {e}")
                    self.samples += [{"system": sid, "workload": w, "rep": rep,
                                      "error": f"set-up: {e}"} for w in self.workloads]

    def _lab_failed(self, group: str, live: list[str], e: Exception, rep: int,
                    doc: dict[str, Any]) -> None:
        """A lab that would not come up: lbcore's start failed (tun: a failure to report;
        rawsock: not implemented yet), or the lab itself broke (retried next repetition)."""
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log(f"  lab for {group} failed: {msg}")
        doc.setdefault("lab_errors", []).append({"group": group, "rep": rep,
                                                 "error": str(e)[-3000:]})
        for sid in live:
            mode = SYSTEMS[sid].mode
            if mode == "rawsock":   # one failure says it for every rawsock variant
                for other in self.systems:
                    if SYSTEMS[other].mode == "rawsock":
                        self.status[other] = "n/a (not implemented)"
            elif mode is not None:
                self.status[sid] = f"failed: {msg[:120]}"

    def execute(self) -> dict[str, Any]:
        """The whole run; the result document (also in ``self.doc`` as it grows, so that an
        interrupted run can still be written out)."""
        from lbcore import lab
        flood = build_tool("udpflood")
        probe = build_tool("wakeprobe") if "latency" in self.workloads else None
        started = dt.datetime.now(dt.UTC)
        machine = machine_facts()
        machine["background_busy_pct"] = background_busy()
        if max(machine["background_busy_pct"].values(), default=0) > 25:
            log(f"warning: the machine is busy before we start ({machine['background_busy_pct']}"
                " % per CPU): expect lower and noisier figures; compare ratios")
        doc: dict[str, Any] = {
            "schema": 1, "command": self.command,
            "started": started.isoformat(timespec="seconds"),
            "machine": machine,
            "settings": {"reps": self.reps, "seconds": self.seconds,
                         "workloads": self.workloads, "systems": self.systems,
                         "gen_cpu": GEN_CPU, "fwd_cpu": FWD_CPU, "wrk_conns": WRK_CONNS,
                         "haproxy_maxconn": haproxy_maxconn(),
                         "latency": {"conns": LAT_CONNS, "delay_ms": LAT_DELAY_MS},
                         "udp": {"payload": 64, "flows": peers.FLOOD_FLOWS, "batch": 64},
                         "notes": NOTES},
        }
        self.doc = doc
        groups: dict[str, list[str]] = {}
        for sid in self.systems:
            groups.setdefault(SYSTEMS[sid].group, []).append(sid)
        for sid in self.systems:
            self.status[sid] = "ok"
        self._finish(doc, started, "peers" in groups)
        rounds = [(rep, members, False) for rep, members in
                  interleave(self.reps, list(groups.values()))]
        probed: set[int] = set()
        while rounds:
            rep, members, retried = rounds.pop(0)
            if probe is not None and rep not in probed:
                probed.add(rep)        # on a quiet machine: no lab up yet in this repetition
                res = wakeprobe(probe)
                log(f"repetition {rep + 1}/{self.reps}: wakeprobe {res}")
                doc.setdefault("wakeprobe", []).append({"rep": rep, **res})
            group = SYSTEMS[members[0]].group
            live = [s for s in members if self.status[s] == "ok"]
            if not live:
                continue
            log(f"repetition {rep + 1}/{self.reps}: {', '.join(live)}")
            mark = len(self.samples)
            try:
                self.run_round(rep, group, live, flood)
            except LabGone as e:
                log(f"  {e}")
                doc.setdefault("lab_errors", []).append({"group": group, "rep": rep,
                                                         "error": str(e)})
                if not retried:
                    del self.samples[mark:]      # a partial round: run it again at the end
                    rounds.append((rep, members, True))
            except lab.LabError as e:
                if "already exists" in str(e):   # someone's lab, built without the lock
                    raise SystemExit(f"bench-lab: {e}; not touching it") from e
                self._lab_failed(group, live, e, rep, doc)
        self._finish(doc, started, "peers" in groups)
        return doc

    def _finish(self, doc: dict[str, Any], started: dt.datetime, with_sender: bool) -> None:
        finished = dt.datetime.now(dt.UTC)
        doc["finished"] = finished.isoformat(timespec="seconds")
        doc["duration_s"] = round((finished - started).total_seconds())
        systems = {"sender": {"label": "udpflood alone", "status": "ok"}} \
            if "udp" in self.workloads and with_sender else {}
        for sid in self.systems:
            systems[sid] = {"label": SYSTEMS[sid].label, "status": self.status[sid],
                            "only": list(SYSTEMS[sid].only)}
        doc["systems"] = systems
        doc["samples"] = self.samples


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lab.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Needs root (network namespaces). See bench/README.md.")
    p.add_argument("--quick", action="store_true",
                   help="1 repetition, 3 s cells, workloads " + ",".join(QUICK_WORKLOADS))
    p.add_argument("--reps", type=int, help="repetitions of every cell (default 3)")
    p.add_argument("--seconds", type=float, help="length of every cell (default 8)")
    p.add_argument("--systems", help="comma-separated, of: " + ",".join(SYSTEMS))
    p.add_argument("--workloads", help="comma-separated, of: " + ",".join(ALL_WORKLOADS)
                   + " (also " + ", ".join(f"{k}={v}" for k, v in WORKLOAD_ALIASES.items()) + ")")
    p.add_argument("--out", type=Path, help="output stem (default bench/results/lab-<date>)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get missing tools")
    p.add_argument("--lbcore-global", action="append", default=[], metavar="'KEY = VALUE'",
                   help="a line for the [global] table of lbcore's config, e.g. "
                        "'busy_poll_us = 1000' (repeatable): to measure a setting")
    p.add_argument("--no-lab-lock", action="store_true",
                   help="do not take lbcore's lab lock (the caller holds it, as tests do)")
    a = p.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.seconds = a.seconds or (3.0 if a.quick else 8.0)
    a.workloads = ([WORKLOAD_ALIASES.get(w, w) for w in a.workloads.split(",")] if a.workloads
                   else list(QUICK_WORKLOADS if a.quick else ALL_WORKLOADS))
    a.systems = a.systems.split(",") if a.systems else list(DEFAULT_SYSTEMS)
    for w in a.workloads:
        if w not in ALL_WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {','.join(ALL_WORKLOADS)}")
    for s in a.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}; choose from {','.join(SYSTEMS)}")
    if "kernel" not in a.systems:
        a.systems.insert(0, "kernel")   # the reference of every ratio
    if not (1 <= a.reps <= 20 and 1 <= a.seconds <= 60):
        p.error("--reps must be 1..20 and --seconds 1..60")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse_args(argv)
    if os.geteuid() != 0:
        print("bench-lab: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    ensure_tools(install=not a.no_install)
    os.sched_setaffinity(0, {GEN_CPU})
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
    stem = a.out or RESULTS / f"lab-{stamp}{'-quick' if a.quick else ''}"
    bench = Bench(reps=a.reps, seconds=a.seconds, workloads=a.workloads, systems=a.systems,
                  out_stem=stem, command=_command(argv), take_lock=not a.no_lab_lock,
                  lbcore_global=tuple(a.lbcore_global))

    main_pid = os.getpid()

    def on_term(signum: int, frame: object) -> None:
        # pyroute2 forks helper processes (netns creation) that inherit this handler and are
        # ended with SIGTERM: a child must just die, not unwind into our clean-up (which
        # would take the lab down under our feet).
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        doc = bench.execute()
    except KeyboardInterrupt:
        bench.stop_all()
        log("interrupted; the lab was taken down")
        if bench.doc is not None and bench.samples:
            bench.doc["interrupted"] = True
            bench.doc["samples"] = bench.samples
            for path in report.write_outputs(bench.doc, stem.with_name(stem.name + "-interrupted")):
                log(f"wrote {path} (partial)")
        return 130
    finally:
        bench.stop_all()
    for path in report.write_outputs(doc, stem):
        log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(report.render_markdown(doc))
    return 0


def _command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("MAKELEVEL"):
        extra = os.environ.get("BENCH_LAB_ARGS", "").strip()
        return "make bench-lab" + (f" BENCH_LAB_ARGS='{extra}'" if extra else "")
    return shlex.join(["python", "-m", "bench.lab.run", *args])


if __name__ == "__main__":
    raise SystemExit(main())
