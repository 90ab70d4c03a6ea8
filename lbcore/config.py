"""The lbcore configuration: one TOML file -> one frozen, validated `Config`.

`parse_config()` checks the whole file before anything touches the network and
collects *every* mistake, not just the first: each is one line naming the key
path (``pool.web.backends[2].port``), the bad value and what was expected, so an
operator can fix a file in one pass. `ConfigError.errors` holds those lines.

Array indexes in key paths count from 0 (``vip[0]`` is the first ``[[vip]]``).
Things that are legal but probably not meant (a pool whose weights are all 0, a
pool no VIP uses, ...) are warnings: `Config.warnings`, printed by
``lbcore check-config`` and logged by the daemon, never fatal.

Limits mirror ext/lb_consts.h (tests/test_config.py checks they agree with the
compiled `_core` when it is built); they are repeated here so that
``check-config`` needs neither root nor the C extension.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# --- limits, mirrored from ext/lb_consts.h --------------------------------------------
RING_SIZE_MAX = 16777213          # LB_RING_SIZE_MAX: largest Maglev table (prime, < 2^24)
MAX_BACKENDS = 65534              # LB_MAX_BACKENDS: per VIP (ring slots are uint16_t)
MAX_VIPS = 4096                   # LB_MAX_VIPS
FLOW_MAX = 16 << 20               # LB_FLOW_MAX: flow-table capacity limit
MAX_WORKERS = 64
MAX_CPU = 4095                    # the highest CPU number global.worker_cpus may name
MAX_WEIGHT = 65535                # as ipvsadm: a weight is 0..65535
# Flow timestamps are ms compared wrap-safe on 32 bits, so an idle timeout must
# stay below 2^31 ms (~24.8 days).
MAX_TIMEOUT_S = (2**31 - 1) / 1000.0
MAX_SLOW_START_S = 86400.0
HEALTH_INTERVAL_MIN_S = 0.01      # below this a check loop is a busy loop
HEALTH_INTERVAL_MAX_S = 3600.0
HEALTH_COUNT_MAX = 1000           # rise/fall
UDP_PAYLOAD_MAX = 65507           # largest UDP payload over IPv4
FRAG_ENTRIES_MAX = 1 << 24        # lb_frag_new: datagrams remembered at most
FRAG_BUFFERS_MAX = 1 << 20        # lb_frag_new: held fragments at most (2 KiB each)
FRAG_TIMEOUT_MAX_S = 60.0
CLIENT_ENTRIES_MAX = 1 << 24      # lb_limit_new: per-client table
RATE_MAX = 10_000_000             # new flows / rejects per second (token buckets)
IFNAMSIZ = 16                     # Linux: names are at most 15 bytes + NUL
SUN_PATH_MAX = 107                # sockaddr_un.sun_path is 108 bytes incl. NUL

# --- defaults -------------------------------------------------------------------------
DEFAULT_MODE = "tun"
DEFAULT_WORKERS = 1
DEFAULT_FLOW_TABLE_SIZE = 1 << 20
DEFAULT_HASH_SEED = 0
DEFAULT_RING_SIZE = 65537         # LB_RING_SIZE, as katran
DEFAULT_TUN_NAME = "lbc0"
DEFAULT_CONTROL_SOCKET = "/run/lbcore/lbcore.sock"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9150"
DEFAULT_LOG_LEVEL = "info"
# The flow table's file: on tmpfs (gone after a reboot, when adopting would be
# wrong), in the service's RuntimeDirectory, root-only. "" keeps the table in
# private memory (no adoption across restarts).
DEFAULT_FLOW_FILE = "/run/lbcore/flows.shm"
# Flow sync: events per worker ring (a power of two), how often the flows
# still active are re-sent (below the shortest idle timeouts, so a peer's copy
# of a flow that is busy here never expires there), and how far a datagram's
# timestamp may be from the receiver's clock (replay window; gateways run NTP).
DEFAULT_SYNC_RING = 8192
DEFAULT_SYNC_REFRESH = 10.0
DEFAULT_SYNC_WINDOW = 30.0
SYNC_KEY_MIN = 16                 # bytes of shared key, at least
SYNC_MAX_PEERS = 64
# A VIP with no usable backend drops by default: a short total outage (all
# backends restarting in a deploy) is then ridden out by the clients' own SYN and
# request retransmissions instead of turning into hard errors, and the gateway
# never answers spoofed floods with RSTs/ICMP (no reflection).
DEFAULT_ALL_DOWN = "drop"
# Idle timeouts, seconds: IPVS for TCP (SYN 60 s, established 15 min, FIN 2 min,
# close 10 s) and nf_conntrack for UDP (30 s unreplied, 120 s once replied).
DEFAULT_TCP_SYN = 60.0
DEFAULT_TCP_ESTABLISHED = 900.0
DEFAULT_TCP_FIN = 120.0
DEFAULT_TCP_CLOSE = 10.0
DEFAULT_UDP = 30.0
DEFAULT_UDP_STREAM = 120.0
DEFAULT_WEIGHT = 1
# [bgp]: BFD at 100 ms x 3 detects a dead peer in 0.3 s; the hold time is RFC 4271's
# smallest non-zero value, the fallback when BFD is off or not answered.
DEFAULT_BFD_INTERVAL = 0.1
DEFAULT_BFD_MULTIPLIER = 3
DEFAULT_HOLD_TIME = 3
# After the withdraw, the router needs a few ms to move the flows; the rest of the grace
# period lets the last packets of the moved flows (and replies) drain through this gateway.
DEFAULT_WITHDRAW_GRACE = 2.0
DEFAULT_BGP_RUN_DIR = "/run/lbcore"
DEFAULT_ANCHOR_DEVICE = "lbcore-bgp"
DEFAULT_BIRD = "bird"
AS_MAX = 4294967295               # 4-octet AS numbers (RFC 6793)
DEFAULT_SLOW_START = 0.0
# Closed ports of a VIP address: dropped by default, like all_down (no answer to
# spoofed sources); "reject" answers like a host: RST / ICMP port unreachable.
DEFAULT_CLOSED_PORT = "drop"
# Rejects (RST, ICMP unreachable) per second and burst, whole gateway: the
# kernel's icmp_msgs_per_sec / icmp_msgs_burst.
DEFAULT_REJECT_RATE = 1000
DEFAULT_REJECT_BURST = 50
# Microseconds a worker keeps polling its queue after the last packet before it
# sleeps: at low rates every sleep costs a wake-up (tens to hundreds of µs on a
# VM) on the next packet; spinning costs CPU only while traffic comes and goes.
DEFAULT_BUSY_POLL_US = 50
BUSY_POLL_US_MAX = 100_000
DEFAULT_CLIENT_TABLE_SIZE = 65536     # LB_CLIENT_ENTRIES
# The fragment cache (LB_FRAG_*): datagrams in flight, early fragments held, and how
# long a datagram's decision lives (its fragments arrive within milliseconds).
DEFAULT_FRAG_CACHE_SIZE = 4096
DEFAULT_FRAG_BUFFERS = 1024
DEFAULT_FRAG_TIMEOUT = 2.0
# Source persistence keeps a client on its backend this long after its last new
# flow (IPVS's persistent timeout is 300 s by default, too).
DEFAULT_PERSISTENCE_TIMEOUT = 300.0
# HAProxy's defaults: inter 2 s, rise 2, fall 3; timeout 1 s keeps a slow check
# well inside its interval.
DEFAULT_HEALTH_INTERVAL = 2.0
DEFAULT_HEALTH_TIMEOUT = 1.0
DEFAULT_HEALTH_RISE = 2
DEFAULT_HEALTH_FALL = 3
DEFAULT_HTTP_PATH = "/"
DEFAULT_EXPECT_STATUS = (200,)

MODES = ("tun", "rawsock")
LOG_LEVELS = ("debug", "info", "warning", "error")
# A VIP with no usable backend drops new flows (counted as no_backend): clients
# retransmit and ride out a short total outage, and the gateway never answers
# a spoofed flood (no reflection). Answering with RST / ICMP unreachable is
# not implemented, so it is not accepted either.
ALL_DOWN_ACTIONS = ("drop",)
PROTOCOLS = ("tcp", "udp")
CLOSED_PORT_ACTIONS = ("drop", "reject")
LIMIT_ACTIONS = ("drop", "reject")
PERSISTENCE_MODES = ("none", "source")
HEALTH_TYPES = ("tcp", "http", "udp", "exec")
TIMEOUT_KEYS = ("tcp_syn", "tcp_established", "tcp_fin", "tcp_close", "udp", "udp_stream")


class ConfigError(ValueError):
    """A config that cannot be used. `errors` lists every mistake found, one
    line each (``key.path: expected ..., got ...``); `source` names the file."""

    def __init__(self, errors: list[str], source: str = "<string>") -> None:
        self.errors = list(errors)
        self.source = source
        n = len(self.errors)
        head = f"{source}: {n} error{'s' if n != 1 else ''}"
        super().__init__(head + "".join(f"\n  {e}" for e in self.errors))


class ConfigFileError(ConfigError):
    """The file itself could not be read (missing, a directory, no permission):
    not a mistake in its content. ``check-config`` exits 2 for it, 1 otherwise."""


# --- the config objects ---------------------------------------------------------------

@dataclass(frozen=True)
class Timeouts:
    """Flow idle timeouts in seconds, per protocol and TCP state."""
    tcp_syn: float = DEFAULT_TCP_SYN
    tcp_established: float = DEFAULT_TCP_ESTABLISHED
    tcp_fin: float = DEFAULT_TCP_FIN
    tcp_close: float = DEFAULT_TCP_CLOSE
    udp: float = DEFAULT_UDP
    udp_stream: float = DEFAULT_UDP_STREAM

    def as_ms(self) -> dict[str, int]:
        """The timeouts as whole milliseconds (what `struct lb_timeouts` holds),
        keyed tcp_syn, tcp_established, tcp_fin, tcp_close, udp, udp_stream."""
        return {k: int(round(getattr(self, k) * 1000.0)) for k in TIMEOUT_KEYS}


@dataclass(frozen=True)
class FragmentsConfig:
    """The fragment cache: datagrams remembered, early fragments held, timeout (s)."""
    cache_size: int = DEFAULT_FRAG_CACHE_SIZE
    buffers: int = DEFAULT_FRAG_BUFFERS
    timeout: float = DEFAULT_FRAG_TIMEOUT


@dataclass(frozen=True)
class RawsockConfig:
    """The two links of mode ``rawsock`` (AF_PACKET). They may be the same link."""
    client_link: str
    backend_link: str


@dataclass(frozen=True)
class BgpNeighbor:
    """A BGP peer (the rack's router): its address and AS number."""
    address: IPAddress
    asn: int


@dataclass(frozen=True)
class BgpConfig:
    """``[bgp]``: announce the VIPs to the rack's router through lbcore's own BIRD instance
    (lbcore.bgp). ``next_hop`` holds at most one address per family (empty: BIRD uses the
    session's local address); ``hold_time`` 0 turns keepalives off (RFC 4271)."""
    local_as: int
    router_id: ipaddress.IPv4Address
    neighbors: tuple[BgpNeighbor, ...]
    bfd: bool = True
    bfd_interval: float = DEFAULT_BFD_INTERVAL
    bfd_multiplier: int = DEFAULT_BFD_MULTIPLIER
    hold_time: int = DEFAULT_HOLD_TIME
    next_hop: tuple[IPAddress, ...] = ()
    withdraw_grace: float = DEFAULT_WITHDRAW_GRACE
    run_dir: str = DEFAULT_BGP_RUN_DIR
    anchor_device: str = DEFAULT_ANCHOR_DEVICE
    bird: str = DEFAULT_BIRD


@dataclass(frozen=True)
class SyncConfig:
    """Flow sync with peer gateways ([sync]): where to listen, whom to send
    to, the shared key (bytes; never shown), ring size, refresh and replay
    window in seconds."""
    listen: tuple[IPAddress, int]
    peers: tuple[tuple[IPAddress, int], ...]
    key: bytes = field(repr=False)
    ring_size: int = DEFAULT_SYNC_RING
    refresh: float = DEFAULT_SYNC_REFRESH
    window: float = DEFAULT_SYNC_WINDOW


@dataclass(frozen=True)
class HealthCheckConfig:
    """How one pool's backends are checked. Only the fields of `type` matter:
    http uses path/host/expect_status/body_match, udp payload/expect, exec
    command; `port` None means the backend's own port."""
    type: str
    interval: float = DEFAULT_HEALTH_INTERVAL
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    rise: int = DEFAULT_HEALTH_RISE
    fall: int = DEFAULT_HEALTH_FALL
    port: int | None = None
    path: str = DEFAULT_HTTP_PATH
    host: str | None = None
    expect_status: tuple[int, ...] = DEFAULT_EXPECT_STATUS
    body_match: str = ""
    payload: str = ""
    expect: str = ""
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendConfig:
    """One backend server of a pool."""
    address: IPAddress
    port: int
    weight: int = DEFAULT_WEIGHT

    @property
    def key(self) -> tuple[IPAddress, int]:
        """(address, port): a backend's identity within its pool."""
        return (self.address, self.port)

    def __str__(self) -> str:
        return _hostport(self.address, self.port)


@dataclass(frozen=True)
class PoolConfig:
    """A named set of backends with one health check (None = always up)."""
    name: str
    backends: tuple[BackendConfig, ...] = ()
    health: HealthCheckConfig | None = None
    slow_start: float = DEFAULT_SLOW_START

    def backend(self, address: IPAddress | str, port: int) -> BackendConfig | None:
        """The backend with this address and port, or None."""
        addr = ipaddress.ip_address(address)
        return next((b for b in self.backends if b.key == (addr, port)), None)


@dataclass(frozen=True)
class VipConfig:
    """A virtual IP: traffic to address:port/protocol goes to `pool`."""
    address: IPAddress
    port: int
    protocol: str
    pool: str
    name: str = ""
    closed_port: str | None = None        # None: global.closed_port
    persistence: str = "none"
    persistence_timeout: float = DEFAULT_PERSISTENCE_TIMEOUT
    max_flows: int = 0                    # 0: no limit
    client_rate: int = 0                  # new flows per second per client address
    client_burst: int = 0                 # 0: client_rate
    new_flow_rate: int = 0                # new flows per second of the VIP (overload guard)
    new_flow_burst: int = 0               # 0: new_flow_rate
    limit_action: str = "drop"

    @property
    def key(self) -> tuple[IPAddress, int, str]:
        """(address, port, protocol): unique among VIPs."""
        return (self.address, self.port, self.protocol)

    def settings(self, closed_port: str = DEFAULT_CLOSED_PORT) -> dict[str, Any]:
        """The data plane's per-VIP settings (lbcore._core.VIP_SETTINGS), with
        `closed_port` the global value this VIP does not override."""
        return {"closed_port": self.closed_port or closed_port,
                "persistence": self.persistence,
                "persist_ms": int(round(self.persistence_timeout * 1000.0)),
                "limit_action": self.limit_action, "max_flows": self.max_flows,
                "client_rate": self.client_rate, "client_burst": self.client_burst,
                "new_flow_rate": self.new_flow_rate, "new_flow_burst": self.new_flow_burst}

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.address.version

    def __str__(self) -> str:
        return f"{_hostport(self.address, self.port)}/{self.protocol}"


@dataclass(frozen=True)
class Config:
    """A whole, valid configuration. Build it with `parse_config`/`load_config`;
    the ``[global]`` keys are fields here directly. `pools` is read-only,
    keyed by pool name; `warnings` and `source` do not take part in equality."""
    mode: str = DEFAULT_MODE
    workers: int = DEFAULT_WORKERS
    # the CPU of each worker, in order; () = automatic (from the highest CPU down)
    worker_cpus: tuple[int, ...] = ()
    flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE
    hash_seed: int = DEFAULT_HASH_SEED
    ring_size: int = DEFAULT_RING_SIZE
    tun_name: str = DEFAULT_TUN_NAME
    control_socket: str = DEFAULT_CONTROL_SOCKET
    # (address, port) to serve metrics on, None when disabled (metrics_listen = "")
    metrics_listen: tuple[IPAddress, int] | None = (
        ipaddress.IPv4Address("127.0.0.1"), 9150)
    log_level: str = DEFAULT_LOG_LEVEL
    all_down: str = DEFAULT_ALL_DOWN
    closed_port: str = DEFAULT_CLOSED_PORT
    reject_rate: int = DEFAULT_REJECT_RATE
    reject_burst: int = DEFAULT_REJECT_BURST
    busy_poll_us: int = DEFAULT_BUSY_POLL_US
    client_table_size: int = DEFAULT_CLIENT_TABLE_SIZE
    timeouts: Timeouts = field(default_factory=Timeouts)
    flow_file: str = DEFAULT_FLOW_FILE        # "" = no file, no adoption
    fragments: FragmentsConfig = field(default_factory=FragmentsConfig)
    rawsock: RawsockConfig | None = None      # set only in mode "rawsock"
    bgp: BgpConfig | None = None              # set only with a [bgp] section
    sync: SyncConfig | None = None            # set when [sync] is configured
    vips: tuple[VipConfig, ...] = ()
    pools: Mapping[str, PoolConfig] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    source: str = field(default="<string>", compare=False)

    def pool_of(self, vip: VipConfig) -> PoolConfig:
        """The pool a VIP sends to (always defined in a validated config)."""
        return self.pools[vip.pool]

    def vip(self, name: str) -> VipConfig | None:
        """The VIP with this name, or None."""
        return next((v for v in self.vips if v.name == name), None)

    @property
    def backend_count(self) -> int:
        """Backends over all pools (a backend listed in two pools counts twice)."""
        return sum(len(p.backends) for p in self.pools.values())


# --- value display and small checks ---------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_POOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HTTP_PATH = re.compile(r"/[\x21-\x7e]*")
_HEADER_VALUE = re.compile(r"[\x21-\x7e]+")


def _hostport(address: IPAddress, port: int) -> str:
    """address:port as written in a URL or a log: "198.18.0.1:80", "[2001:db8::1]:80".
    Also used by lbcore.health, so a backend reads the same in both."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _join(path: str, key: str) -> str:
    k = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{k}" if path else k


def _show(v: Any, limit: int = 80) -> str:
    """A value as it would be written in TOML, cut to `limit` characters."""
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, str):
        s = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, list):
        s = "[" + ", ".join(_show(x, limit) for x in v) + "]"
    elif isinstance(v, dict):
        s = "{ " + ", ".join(f"{_join('', str(k))} = {_show(x, limit)}"
                             for k, x in v.items()) + " }"
    else:
        s = str(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _num(x: float) -> str:
    """A number of seconds without float noise: 2.0 -> "2", 0.05 -> "0.05" (also used by
    lbcore.health in its timeout reasons)."""
    return f"{x:.3f}".rstrip("0").rstrip(".")


def _tname(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return "a date/time"


def is_prime(n: int) -> bool:
    """Trial division: enough for ring sizes below 2^24 (divisors up to 4096)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _nearest_primes(n: int) -> tuple[int | None, int | None]:
    lo = next((p for p in range(n - 1, 1, -1) if is_prime(p)), None)
    hi = next((p for p in range(n + 1, RING_SIZE_MAX + 1) if is_prime(p)), None)
    return lo, hi


def hash_seed_of(value: str) -> int:
    """The 64-bit seed for a string ``hash_seed``: the first 8 bytes of its
    BLAKE2b digest, big-endian. Stable across hosts and Python versions (unlike
    `hash()`), so every gateway with the same string gets the same seed."""
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "big")


def valid_ifname(name: str) -> bool:
    """Linux dev_valid_name(): 1..15 bytes, not "." or "..", no "/", ":" or
    whitespace."""
    return (0 < len(name.encode()) < IFNAMSIZ and name not in (".", "..")
            and not any(c in "/:" or c.isspace() or not c.isprintable() for c in name))


# --- the validator --------------------------------------------------------------------

_MISSING: Any = object()


class _Checker:
    """Collects errors and warnings while the file is walked. Every getter
    returns the value, its default, or None after recording an error, so the
    walk goes on and reports everything in one run."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}" if path else msg)

    def warn(self, path: str, msg: str) -> None:
        self.warnings.append(f"{path}: {msg}" if path else msg)

    def bad(self, path: str, v: Any, expected: str, note: str = "") -> None:
        self.error(path, f"expected {expected}, got {_show(v)}" + (f"; {note}" if note else ""))

    def wrong_type(self, path: str, v: Any, expected: str) -> None:
        self.error(path, f"expected {expected}, got {_show(v)} ({_tname(v)})")

    def known_keys(self, tbl: dict, path: str, allowed: Iterable[str],
                   elsewhere: Mapping[str, str] | None = None) -> None:
        """Report keys not in `allowed`, with a difflib "did you mean". Keys in
        `elsewhere` are valid in another context, which the message names."""
        allowed = sorted(allowed)
        elsewhere = elsewhere or {}
        for k in tbl:
            if k in allowed:
                continue
            p = _join(path, k)
            if k in elsewhere:
                self.error(p, f"not allowed here: {elsewhere[k]}")
                continue
            close = difflib.get_close_matches(k, allowed + sorted(elsewhere), n=1, cutoff=0.6)
            if close:
                self.error(p, f"unknown key; did you mean \"{close[0]}\"?")
            else:
                self.error(p, "unknown key; expected one of: " + ", ".join(allowed))

    def table(self, parent: dict, key: str, path: str, required: bool = False) -> dict | None:
        p = _join(path, key)
        if key not in parent:
            if required:
                self.error(p, "missing; expected a table")
            return None
        v = parent[key]
        if not isinstance(v, dict):
            self.wrong_type(p, v, "a table")
            return None
        return v

    def _absent(self, p: str, what: str, default: Any) -> Any:
        """What a missing key at path ``p`` yields: its default, or without one an error
        ("missing; expected <what>") and None."""
        if default is _MISSING:
            self.error(p, f"missing; expected {what}")
            return None
        return default

    def integer(self, tbl: dict, key: str, path: str, lo: int, hi: int,
                default: Any = _MISSING) -> int | None:
        p = _join(path, key)
        if key not in tbl:
            return self._absent(p, f"an integer {lo}..{hi}", default)
        v = tbl[key]
        if isinstance(v, bool) or not isinstance(v, int):
            self.wrong_type(p, v, f"an integer {lo}..{hi}")
            return None
        if not lo <= v <= hi:
            self.bad(p, v, f"an integer {lo}..{hi}")
            return None
        return v

    def seconds(self, tbl: dict, key: str, path: str, lo: float, hi: float,
                default: Any = _MISSING, lo_open: bool = False) -> float | None:
        """A duration in seconds: integer or float, finite, in [lo, hi] (or
        (lo, hi] with `lo_open`)."""
        p = _join(path, key)
        rng = f"{'>' if lo_open else '>='} {_num(lo)} and <= {_num(hi)}"
        if key not in tbl:
            return self._absent(p, f"seconds {rng}", default)
        v = tbl[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.wrong_type(p, v, f"seconds (a number) {rng}")
            return None
        if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
            self.bad(p, v, f"seconds {rng}")
            return None
        return float(v)

    def string(self, tbl: dict, key: str, path: str, what: str = "a string",
               default: Any = _MISSING) -> str | None:
        p = _join(path, key)
        if key not in tbl:
            return self._absent(p, what, default)
        v = tbl[key]
        if not isinstance(v, str):
            self.wrong_type(p, v, what)
            return None
        return v

    def checked_string(self, tbl: dict, key: str, path: str, what: str,
                       valid: Callable[[str], object], expected: str,
                       default: Any = _MISSING) -> str | None:
        """A string for which `valid` is true. `what` is the message when it is
        missing or not a string, `expected` when `valid` rejects it."""
        v = self.string(tbl, key, path, what, default)
        if v is not None and not valid(v):
            self.bad(_join(path, key), v, expected)
            return None
        return v

    def array(self, tbl: dict, key: str, path: str, what: str,
              default: Any = _MISSING) -> list | None:
        """An array of anything (`what` says what it should hold)."""
        p = _join(path, key)
        if key not in tbl:
            return self._absent(p, what, default)
        v = tbl[key]
        if not isinstance(v, list):
            self.wrong_type(p, v, what)
            return None
        return v

    def array_of(self, tbl: dict, key: str, path: str, what: str,
                 item_ok: Callable[[Any], bool], default: Any = _MISSING) -> tuple | None:
        """A non-empty array whose every element passes `item_ok`, as a tuple.
        `what` describes the whole array in every message."""
        if key not in tbl and default is not _MISSING:
            return default
        v = self.array(tbl, key, path, what)
        if v is None:
            return None
        if not v or not all(item_ok(x) for x in v):
            self.bad(_join(path, key), v, what)
            return None
        return tuple(v)

    def table_array(self, items: list, path: str, what: str,
                    keys: Iterable[str]) -> Iterator[tuple[str, dict]]:
        """(key path, table) for each element of an array of tables, with the
        path ``path[i]``. An element that is not a table is reported (`what` is
        what it should be) and skipped; unknown keys are reported as each table
        comes up, so errors stay in file order."""
        for i, t in enumerate(items):
            p = f"{path}[{i}]"
            if not isinstance(t, dict):
                self.wrong_type(p, t, what)
                continue
            self.known_keys(t, p, keys)
            yield p, t

    def choice(self, tbl: dict, key: str, path: str, choices: tuple[str, ...],
               default: Any = _MISSING) -> str | None:
        what = " or ".join(f'"{c}"' for c in choices)
        v = self.string(tbl, key, path, what, default)
        if v is None or v in choices:
            return v
        close = difflib.get_close_matches(v, choices, n=1, cutoff=0.6)
        self.bad(_join(path, key), v, what, f'did you mean "{close[0]}"?' if close else "")
        return None

    def address(self, tbl: dict, key: str, path: str) -> IPAddress | None:
        what = "an IPv4 or IPv6 address"
        v = self.string(tbl, key, path, what)
        if v is None:
            return None
        p = _join(path, key)
        try:
            a = ipaddress.ip_address(v)
        except ValueError:
            self.bad(p, v, what + " (no prefix length, no port)")
            return None
        if getattr(a, "scope_id", None):
            self.bad(p, v, "an address without a %zone (link-local addresses are not supported)")
            return None
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            self.bad(p, v, "a plain IPv4 or IPv6 address",
                     f"write {a.ipv4_mapped} instead of an IPv4-mapped IPv6 address")
            return None
        if (a.is_unspecified or a.is_loopback or a.is_multicast
                or a == ipaddress.IPv4Address("255.255.255.255")):
            self.bad(p, v, "a unicast address (not unspecified, loopback, multicast or "
                     "broadcast)")
            return None
        return a


# --- sections -------------------------------------------------------------------------

_GLOBAL_KEYS = ("mode", "workers", "worker_cpus", "flow_table_size", "hash_seed", "ring_size",
                "tun_name", "control_socket", "metrics_listen", "log_level", "all_down",
                "closed_port", "reject_rate", "reject_burst", "busy_poll_us", "client_table_size",
                "timeouts", "fragments", "flow_file")
_SYNC_KEYS = ("listen", "peers", "key", "key_file", "ring_size", "refresh", "window")
_VIP_KEYS = ("name", "address", "port", "protocol", "pool", "closed_port", "persistence",
             "persistence_timeout", "max_flows", "client_rate", "client_burst",
             "new_flow_rate", "new_flow_burst", "limit_action")
_FRAGMENT_KEYS = ("cache_size", "buffers", "timeout")
_POOL_KEYS = ("slow_start", "backends", "health")
_BACKEND_KEYS = ("address", "port", "weight")
_HEALTH_COMMON = ("type", "interval", "timeout", "rise", "fall", "port")
_HEALTH_ONLY = {
    "path": "http", "host": "http", "expect_status": "http", "body_match": "http",
    "payload": "udp", "expect": "udp", "command": "exec",
}
_IFNAME_WHAT = 'a network interface name (1..15 characters, no "/", ":" or spaces)'


def _parse_metrics_listen(c: _Checker, g: dict) -> tuple[IPAddress, int] | None | str:
    """"" -> None (disabled); "HOST:PORT" / "[V6]:PORT" -> (address, port).
    Returns the string "bad" after recording an error."""
    p = "global.metrics_listen"
    v = c.string(g, "metrics_listen", "global", '"ADDRESS:PORT" or ""', DEFAULT_METRICS_LISTEN)
    if v is None:
        return "bad"
    if v == "":
        return None
    what = '"ADDRESS:PORT" with an IP address ("[::1]:9150" for IPv6), or "" to disable'
    return _hostport_value(c, p, v, what)


def _hostport_value(c: _Checker, p: str, v: str, what: str) -> tuple[IPAddress, int] | str:
    """"HOST:PORT" / "[V6]:PORT" -> (address, port), or "bad" after an error."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", v)
    if not m:
        c.bad(p, v, what)
        return "bad"
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        c.bad(p, v, what, "host names are not resolved")
        return "bad"
    if (addr.version == 6) != bool(m.group(1)):
        c.bad(p, v, what)
        return "bad"
    if not 1 <= int(port) <= 65535:
        c.bad(p, v, what, "the port must be 1..65535")
        return "bad"
    return (addr, int(port))


def _parse_hash_seed(c: _Checker, g: dict) -> int | None:
    """An integer 0..2^64-1, or a string that `hash_seed_of` turns into one."""
    seed = g.get("hash_seed", DEFAULT_HASH_SEED)
    p = "global.hash_seed"
    what = "an integer 0..2^64-1 or a non-empty string"
    if isinstance(seed, str):
        if seed:
            return hash_seed_of(seed)
        c.bad(p, seed, what)
    elif isinstance(seed, bool) or not isinstance(seed, int):
        c.wrong_type(p, seed, what)
    elif not 0 <= seed < 2**64:
        c.bad(p, seed, what)
    else:
        return seed
    return None


def _parse_ring_size(c: _Checker, g: dict) -> int | None:
    """A prime up to RING_SIZE_MAX; a non-prime is answered with its nearest primes."""
    ring = g.get("ring_size", DEFAULT_RING_SIZE)
    p = "global.ring_size"
    what = f"a prime number 2..{RING_SIZE_MAX}"
    if isinstance(ring, bool) or not isinstance(ring, int):
        c.wrong_type(p, ring, what)
    elif not 2 <= ring <= RING_SIZE_MAX:
        c.bad(p, ring, what)
    elif not is_prime(ring):
        lo, hi = _nearest_primes(ring)
        near = " or ".join(str(x) for x in (lo, hi) if x is not None)
        c.bad(p, ring, what, f"{ring} is not prime; nearest primes: {near}")
    else:
        return ring
    return None


def _parse_control_socket(c: _Checker, g: dict) -> str | None:
    p = "global.control_socket"
    sock = c.string(g, "control_socket", "global", "an absolute path", DEFAULT_CONTROL_SOCKET)
    if sock is None:
        return None
    if not sock.startswith("/"):
        c.bad(p, sock,
              "an absolute path (the daemon and the CLI may run in different directories)")
    elif len(sock.encode()) > SUN_PATH_MAX or "\0" in sock:
        c.bad(p, sock, f"a Unix socket path of at most {SUN_PATH_MAX} bytes")
    else:
        return sock
    return None


def _parse_timeouts(c: _Checker, g: dict) -> Timeouts | None:
    t = c.table(g, "timeouts", "global") or {}
    c.known_keys(t, "global.timeouts", TIMEOUT_KEYS)
    defaults = Timeouts()
    tvals = {k: c.seconds(t, k, "global.timeouts", 0.001, MAX_TIMEOUT_S, getattr(defaults, k))
             for k in TIMEOUT_KEYS}
    return None if None in tvals.values() else Timeouts(**tvals)


def _parse_flow_file(c: _Checker, g: dict) -> str | None:
    p = "global.flow_file"
    v = c.string(g, "flow_file", "global", 'an absolute path or ""', DEFAULT_FLOW_FILE)
    if v is None or v == "":
        return v
    if not v.startswith("/") or v.endswith("/") or "\0" in v:
        c.bad(p, v, 'an absolute path of a file (on tmpfs, e.g. /run/lbcore/flows.shm), '
              'or "" to keep flows in private memory')
        return None
    return v


def _parse_sync_key(c: _Checker, t: dict) -> bytes | None:
    """Exactly one of key (a string in the file) and key_file (a file whose
    content, surrounding whitespace stripped, is the key)."""
    if ("key" in t) == ("key_file" in t):
        c.error("sync", "expected exactly one of key and key_file (the shared key that "
                "authenticates sync datagrams)" + ("; got both" if "key" in t else ""))
        return None
    if "key" in t:
        k = c.string(t, "key", "sync", f"a string of at least {SYNC_KEY_MIN} characters")
        if k is None:
            return None
        if len(k.encode()) < SYNC_KEY_MIN:
            c.error("sync.key", f"expected at least {SYNC_KEY_MIN} bytes, got "
                    f"{len(k.encode())} (value not shown)")
            return None
        return k.encode()
    path = c.string(t, "key_file", "sync", "an absolute path")
    if path is None:
        return None
    if not path.startswith("/"):
        c.bad("sync.key_file", path, "an absolute path")
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(4097).strip()
    except OSError as e:
        c.bad("sync.key_file", path, "a readable file", f"cannot read it: {e.strerror or e}")
        return None
    if len(raw) < SYNC_KEY_MIN:
        c.bad("sync.key_file", path, f"a file holding a key of at least {SYNC_KEY_MIN} bytes",
              f"it holds {len(raw)}")
        return None
    return raw


def _parse_sync(c: _Checker, data: dict) -> SyncConfig | None | str:
    """The [sync] table: None when absent, "bad" after an error."""
    t = c.table(data, "sync", "")
    if t is None:
        return "bad" if "sync" in data else None
    c.known_keys(t, "sync", _SYNC_KEYS)
    what = '"ADDRESS:PORT" with an IP address ("[2001:db8::1]:7700" for IPv6)'
    lv = c.string(t, "listen", "sync", what)
    listen = _hostport_value(c, "sync.listen", lv, what) if lv is not None else "bad"
    raw_peers = c.array(t, "peers", "sync", f"an array of 1..{SYNC_MAX_PEERS} {what}")
    peers: list[tuple[IPAddress, int]] = []
    ok = raw_peers is not None
    if raw_peers is not None:
        if not 1 <= len(raw_peers) <= SYNC_MAX_PEERS:
            c.bad("sync.peers", raw_peers, f"an array of 1..{SYNC_MAX_PEERS} {what}")
            ok = False
        for i, pv in enumerate(raw_peers):
            pp = f"sync.peers[{i}]"
            if not isinstance(pv, str):
                c.wrong_type(pp, pv, what)
                ok = False
                continue
            hp = _hostport_value(c, pp, pv, what)
            if hp == "bad":
                ok = False
            elif hp in peers:
                c.bad(pp, pv, "a peer listed once", "it is listed twice")
                ok = False
            elif hp == listen:
                c.bad(pp, pv, "another gateway's address", "it is this gateway's sync.listen")
                ok = False
            else:
                peers.append(hp)   # type: ignore[arg-type]
    key = _parse_sync_key(c, t)
    ring = c.integer(t, "ring_size", "sync", 2, 1 << 20, DEFAULT_SYNC_RING)
    if ring is not None and ring & (ring - 1):
        c.bad("sync.ring_size", ring, "a power of two 2..1048576")
        ring = None
    refresh = c.seconds(t, "refresh", "sync", 0.1, 3600.0, DEFAULT_SYNC_REFRESH)
    window = c.seconds(t, "window", "sync", 1.0, 3600.0, DEFAULT_SYNC_WINDOW)
    if (listen == "bad" or not ok or key is None or ring is None or refresh is None
            or window is None):
        return "bad"
    return SyncConfig(listen=listen, peers=tuple(peers), key=key, ring_size=ring,  # type: ignore[arg-type]
                      refresh=refresh, window=window)
def _parse_fragments(c: _Checker, g: dict) -> FragmentsConfig | None:
    f = c.table(g, "fragments", "global") or {}
    c.known_keys(f, "global.fragments", _FRAGMENT_KEYS)
    vals = {"cache_size": c.integer(f, "cache_size", "global.fragments", 4, FRAG_ENTRIES_MAX,
                                    DEFAULT_FRAG_CACHE_SIZE),
            "buffers": c.integer(f, "buffers", "global.fragments", 0, FRAG_BUFFERS_MAX,
                                 DEFAULT_FRAG_BUFFERS),
            "timeout": c.seconds(f, "timeout", "global.fragments", 0.001, FRAG_TIMEOUT_MAX_S,
                                 DEFAULT_FRAG_TIMEOUT)}
    return None if None in vals.values() else FragmentsConfig(**vals)


def _parse_worker_cpus(c: _Checker, g: dict) -> tuple[int, ...] | None:
    """global.worker_cpus: one CPU number per worker, none twice; absent or [] = automatic.
    Whether the machine has them is checked at start (`check_worker_cpus`), not here: a config
    is valid or not whatever machine reads it."""
    what = f"an array of CPU numbers 0..{MAX_CPU}, one per worker, none twice"
    v = c.array(g, "worker_cpus", "global", what, [])
    if v is None:
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_CPU
               for x in v) or len(set(v)) != len(v):
        c.bad("global.worker_cpus", v, what)
        return None
    workers = g.get("workers", DEFAULT_WORKERS)
    if v and isinstance(workers, int) and len(v) != workers:
        c.bad("global.worker_cpus", v, what,
              f"{len(v)} CPU(s) for global.workers = {workers}")
        return None
    return tuple(v)


def check_worker_cpus(cpus: Sequence[int], allowed: set[int]) -> str | None:
    """Why ``cpus`` (global.worker_cpus) cannot be used on this machine, where this process may
    run on ``allowed`` (its affinity: the machine's CPUs, less what a cgroup or taskset took),
    or None if it can."""
    bad = [c for c in cpus if c not in allowed]
    if not bad:
        return None
    return (f"global.worker_cpus: CPU {', '.join(map(str, bad))} "
            f"{'is' if len(bad) == 1 else 'are'} not one this process may run on "
            f"(it may run on {', '.join(map(str, sorted(allowed)))})")


def _parse_global(c: _Checker, data: dict) -> dict[str, Any]:
    """The [global] values by key (None, or "bad" for metrics_listen, after an
    error). The keys are checked in file-documentation order, so are the errors."""
    g = c.table(data, "global", "") or {}
    c.known_keys(g, "global", _GLOBAL_KEYS)
    return {
        "mode": c.choice(g, "mode", "global", MODES, DEFAULT_MODE),
        "workers": c.integer(g, "workers", "global", 1, MAX_WORKERS, DEFAULT_WORKERS),
        "worker_cpus": _parse_worker_cpus(c, g),
        "flow_table_size": c.integer(g, "flow_table_size", "global", 1, FLOW_MAX,
                                     DEFAULT_FLOW_TABLE_SIZE),
        "hash_seed": _parse_hash_seed(c, g),
        "ring_size": _parse_ring_size(c, g),
        "tun_name": c.checked_string(g, "tun_name", "global", _IFNAME_WHAT, valid_ifname,
                                     _IFNAME_WHAT, DEFAULT_TUN_NAME),
        "control_socket": _parse_control_socket(c, g),
        "metrics_listen": _parse_metrics_listen(c, g),
        "log_level": c.choice(g, "log_level", "global", LOG_LEVELS, DEFAULT_LOG_LEVEL),
        "all_down": c.choice(g, "all_down", "global", ALL_DOWN_ACTIONS, DEFAULT_ALL_DOWN),
        "closed_port": c.choice(g, "closed_port", "global", CLOSED_PORT_ACTIONS,
                                DEFAULT_CLOSED_PORT),
        "reject_rate": c.integer(g, "reject_rate", "global", 0, RATE_MAX, DEFAULT_REJECT_RATE),
        "reject_burst": c.integer(g, "reject_burst", "global", 1, RATE_MAX,
                                  DEFAULT_REJECT_BURST),
        "busy_poll_us": c.integer(g, "busy_poll_us", "global", 0, BUSY_POLL_US_MAX,
                                  DEFAULT_BUSY_POLL_US),
        "client_table_size": c.integer(g, "client_table_size", "global", 4, CLIENT_ENTRIES_MAX,
                                       DEFAULT_CLIENT_TABLE_SIZE),
        "timeouts": _parse_timeouts(c, g),
        "flow_file": _parse_flow_file(c, g),
        "fragments": _parse_fragments(c, g),
    }


def _parse_rawsock(c: _Checker, data: dict, mode: str | None) -> RawsockConfig | None:
    r = c.table(data, "rawsock", "")
    if r is None:
        if mode == "rawsock" and "rawsock" not in data:
            c.error("rawsock", 'missing; mode "rawsock" needs a [rawsock] table with '
                    "client_link and backend_link")
        return None
    c.known_keys(r, "rawsock", ("client_link", "backend_link"))
    what = "a network interface name (1..15 characters)"
    links = {k: c.checked_string(r, k, "rawsock", what, valid_ifname, what)
             for k in ("client_link", "backend_link")}
    if mode != "rawsock":
        c.warn("rawsock", f'ignored: global.mode is "{mode}", not "rawsock"')
        return None
    if None in links.values():
        return None
    return RawsockConfig(**links)


_BGP_KEYS = ("local_as", "router_id", "neighbors", "bfd", "bfd_interval", "bfd_multiplier",
             "hold_time", "next_hop", "withdraw_grace", "run_dir", "anchor_device", "bird")


def _parse_bgp_neighbors(c: _Checker, b: dict) -> tuple[BgpNeighbor, ...] | None:
    what = "an array of { address, as } tables"
    items = c.array(b, "neighbors", "bgp", what)
    if items is None:
        return None
    if not items:
        c.bad("bgp.neighbors", items, what, "at least one neighbor")
        return None
    out: list[BgpNeighbor] = []
    ok = True
    for p, t in c.table_array(items, "bgp.neighbors", "a { address, as } table",
                              ("address", "as")):
        addr = c.address(t, "address", p)
        asn = c.integer(t, "as", p, 1, AS_MAX)
        if addr is None or asn is None:
            ok = False
            continue
        if any(n.address == addr for n in out):
            c.bad(_join(p, "address"), str(addr), "a neighbor address listed once")
            ok = False
            continue
        out.append(BgpNeighbor(addr, asn))
    return tuple(out) if ok and len(out) == len(items) else None


def _parse_next_hop(c: _Checker, b: dict) -> tuple[IPAddress, ...] | None:
    """One address or an array of addresses, at most one per family."""
    if "next_hop" not in b:
        return ()
    v = b["next_hop"]
    what = "an address or an array of addresses (at most one IPv4 and one IPv6)"
    raw = v if isinstance(v, list) else [v]
    out: list[IPAddress] = []
    for x in raw:
        a = c.address({"next_hop": x}, "next_hop", "bgp")
        if a is None:
            return None
        out.append(a)
    if not out or len({a.version for a in out}) != len(out):
        c.bad("bgp.next_hop", v, what)
        return None
    return tuple(out)


def _parse_bgp(c: _Checker, data: dict, tun_name: str | None) -> BgpConfig | None:
    b = c.table(data, "bgp", "")
    if b is None:
        return None
    c.known_keys(b, "bgp", _BGP_KEYS)
    rid = c.address(b, "router_id", "bgp")
    if rid is not None and rid.version != 4:
        c.bad("bgp.router_id", str(rid), "an IPv4 address (a BGP router id is 32 bits)")
        rid = None
    bfd = b.get("bfd", True)
    if not isinstance(bfd, bool):
        c.wrong_type("bgp.bfd", bfd, "true or false")
        bfd = None
    hold = c.integer(b, "hold_time", "bgp", 0, 65535, DEFAULT_HOLD_TIME)
    if hold is not None and 0 < hold < 3:
        c.bad("bgp.hold_time", hold, "0 (no keepalives) or 3..65535 seconds (RFC 4271)")
        hold = None
    what = 'a network interface name (1..15 characters, no "/", ":" or spaces)'
    anchor = c.checked_string(b, "anchor_device", "bgp", what, valid_ifname, what,
                              DEFAULT_ANCHOR_DEVICE)
    if anchor is not None and anchor == tun_name:
        c.bad("bgp.anchor_device", anchor, "a device name other than global.tun_name")
        anchor = None
    vals = {
        "local_as": c.integer(b, "local_as", "bgp", 1, AS_MAX),
        "router_id": rid,
        "neighbors": _parse_bgp_neighbors(c, b),
        "bfd": bfd,
        "bfd_interval": c.seconds(b, "bfd_interval", "bgp", 0.01, 10.0, DEFAULT_BFD_INTERVAL),
        "bfd_multiplier": c.integer(b, "bfd_multiplier", "bgp", 1, 255,
                                    DEFAULT_BFD_MULTIPLIER),
        "hold_time": hold,
        "next_hop": _parse_next_hop(c, b),
        "withdraw_grace": c.seconds(b, "withdraw_grace", "bgp", 0.0, 3600.0,
                                    DEFAULT_WITHDRAW_GRACE),
        "run_dir": c.checked_string(b, "run_dir", "bgp", "an absolute directory path",
                                    lambda s: s.startswith("/") and len(s) < SUN_PATH_MAX - 12,
                                    f"an absolute path shorter than {SUN_PATH_MAX - 12} "
                                    "characters (it holds BIRD's control socket)",
                                    DEFAULT_BGP_RUN_DIR),
        "anchor_device": anchor,
        "bird": c.checked_string(b, "bird", "bgp", "a program name or path",
                                 lambda s: bool(s.strip()), "a program name or path",
                                 DEFAULT_BIRD),
    }
    if None in vals.values():
        return None
    return BgpConfig(**vals)


def _check_bgp_families(c: _Checker, bgp: BgpConfig, vips: list[VipConfig]) -> None:
    """A session carries the routes of its own address family: a VIP family with no
    neighbor of that family could never be announced."""
    have = {n.address.version for n in bgp.neighbors}
    for fam in sorted({v.family for v in vips} - have):
        c.error("bgp.neighbors", f"no IPv{fam} neighbor, but the IPv{fam} VIPs "
                f"({', '.join(sorted({str(v.address) for v in vips if v.family == fam}))}) "
                f"must be announced; expected an IPv{fam} neighbor address")
    for a in bgp.next_hop:
        if a.version not in have:
            c.bad("bgp.next_hop", str(a), f"a next hop of a family that has a neighbor "
                  f"(no IPv{a.version} neighbor)")


# --- health checks: the keys every type has, then one parser per type -----------------

def _check_health_keys(c: _Checker, tbl: dict, path: str, typ: str | None) -> None:
    """Unknown keys, and keys of another check type than `typ`. When the type
    itself is wrong (None), the keys of every type are accepted: only the type
    is reported."""
    own = set(_HEALTH_COMMON) | {k for k, t in _HEALTH_ONLY.items() if typ in (t, None)}
    elsewhere = {k: f'only for type "{t}" (this check is type "{typ}")'
                 for k, t in _HEALTH_ONLY.items() if k not in own}
    c.known_keys(tbl, path, own, elsewhere)


def _parse_health_timing(c: _Checker, tbl: dict, path: str) -> dict[str, Any]:
    """interval, timeout (which must end before the next check starts), rise, fall."""
    interval = c.seconds(tbl, "interval", path, HEALTH_INTERVAL_MIN_S, HEALTH_INTERVAL_MAX_S,
                         DEFAULT_HEALTH_INTERVAL)
    timeout_default = min(DEFAULT_HEALTH_TIMEOUT, interval or DEFAULT_HEALTH_TIMEOUT)
    timeout = c.seconds(tbl, "timeout", path, 0.0, HEALTH_INTERVAL_MAX_S, timeout_default,
                        lo_open=True)
    if timeout is not None and interval is not None and timeout > interval:
        c.bad(_join(path, "timeout"), tbl["timeout"], f"seconds > 0 and <= interval "
              f"({_num(interval)})", "a check must end before the next one starts")
        timeout = None
    return {"interval": interval, "timeout": timeout,
            "rise": c.integer(tbl, "rise", path, 1, HEALTH_COUNT_MAX, DEFAULT_HEALTH_RISE),
            "fall": c.integer(tbl, "fall", path, 1, HEALTH_COUNT_MAX, DEFAULT_HEALTH_FALL)}


def _parse_tcp_check(c: _Checker, tbl: dict, path: str) -> dict[str, Any]:
    return {}       # a connect: nothing beyond the keys every type has


def _parse_http_check(c: _Checker, tbl: dict, path: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"path": c.checked_string(
        tbl, "path", path, 'an HTTP path starting with "/"', _HTTP_PATH.fullmatch,
        'an HTTP path starting with "/", without spaces or control characters',
        DEFAULT_HTTP_PATH)}
    if "host" in tbl:    # absent: the backend's address:port (None is not an error here)
        kw["host"] = c.checked_string(tbl, "host", path, "a Host header value",
                                      _HEADER_VALUE.fullmatch,
                                      "a Host header value without spaces")
    kw["expect_status"] = c.array_of(
        tbl, "expect_status", path, "a non-empty array of HTTP status codes 100..599, e.g. [200]",
        lambda x: type(x) is int and 100 <= x <= 599, DEFAULT_EXPECT_STATUS)
    kw["body_match"] = c.string(tbl, "body_match", path, "a string", "")
    return kw


def _parse_udp_check(c: _Checker, tbl: dict, path: str) -> dict[str, Any]:
    return {"payload": c.checked_string(tbl, "payload", path, 'the text to send, e.g. "ping"',
                                        lambda s: len(s.encode()) <= UDP_PAYLOAD_MAX,
                                        f"at most {UDP_PAYLOAD_MAX} bytes"),
            "expect": c.string(tbl, "expect", path, "a string", "")}


def _parse_exec_check(c: _Checker, tbl: dict, path: str) -> dict[str, Any]:
    what = 'a non-empty array of strings (program and arguments), e.g. ["/usr/bin/true"]'
    p = _join(path, "command")
    cmd = c.array_of(tbl, "command", path, what, lambda x: isinstance(x, str) and "\0" not in x)
    if cmd is not None and not cmd[0]:          # arguments may be "", the program may not
        c.bad(p, list(cmd), what)
        cmd = None
    elif cmd is not None and shutil.which(cmd[0]) is None:
        c.warn(p, f"{_show(cmd[0])} is not an executable file on this host")
    return {"command": cmd}


# One parser per check type, for its keys beyond _HEALTH_COMMON (in HEALTH_TYPES order).
_HEALTH_PARSERS: dict[str, Callable[[_Checker, dict, str], dict[str, Any]]] = {
    "tcp": _parse_tcp_check, "http": _parse_http_check, "udp": _parse_udp_check,
    "exec": _parse_exec_check,
}


def _parse_health(c: _Checker, tbl: dict, path: str) -> HealthCheckConfig | None:
    typ = c.choice(tbl, "type", path, HEALTH_TYPES)
    _check_health_keys(c, tbl, path, typ)
    kw = _parse_health_timing(c, tbl, path)
    if "port" in tbl:    # absent: the backend's own port
        kw["port"] = c.integer(tbl, "port", path, 1, 65535)
    if typ is None:
        return None
    kw.update(_HEALTH_PARSERS[typ](c, tbl, path))
    if None in kw.values():
        return None
    return HealthCheckConfig(type=typ, **kw)


# --- pools and VIPs -------------------------------------------------------------------

def _parse_backends(c: _Checker, pool: dict, path: str) -> tuple[BackendConfig, ...] | None:
    """The ``backends`` array of the pool at `path`; None after any error."""
    errors_before = len(c.errors)
    bp = _join(path, "backends")
    raw = c.array(pool, "backends", path, "an array of { address, port, weight } tables")
    if raw is None:
        return None
    if not raw:
        c.warn(bp, "no backends: VIPs using this pool have no backend (see global.all_down)")
    if len(raw) > MAX_BACKENDS:
        c.error(bp, f"expected at most {MAX_BACKENDS} backends per pool, got {len(raw)}")
    backends: list[BackendConfig] = []
    seen: dict[tuple[IPAddress, int], str] = {}
    for p, b in c.table_array(raw, bp, "a table { address = ..., port = ..., weight = ... }",
                              _BACKEND_KEYS):
        addr = c.address(b, "address", p)
        port = c.integer(b, "port", p, 1, 65535)
        weight = c.integer(b, "weight", p, 0, MAX_WEIGHT, DEFAULT_WEIGHT)
        if None in (addr, port, weight):
            continue
        be = BackendConfig(addr, port, weight)
        if be.key in seen:
            c.error(p, f"duplicate backend {be}, already at {seen[be.key]}")
            continue
        seen[be.key] = p
        backends.append(be)
    if len(c.errors) > errors_before:
        return None
    if backends and all(b.weight == 0 for b in backends):
        c.warn(bp, "every backend has weight 0: VIPs using this pool have no backend "
               "(see global.all_down)")
    return tuple(backends)


def _parse_pool(c: _Checker, name: str, tbl: Any) -> PoolConfig | None:
    path = _join("pool", name)
    if not isinstance(tbl, dict):
        c.wrong_type(path, tbl, "a table ([pool.NAME])")
        return None
    errors_before = len(c.errors)
    if not _POOL_NAME.fullmatch(name):
        c.bad(path, name, "a pool name of 1..64 letters, digits, \"_\", \".\" or \"-\"")
    c.known_keys(tbl, path, _POOL_KEYS)
    slow = c.seconds(tbl, "slow_start", path, 0.0, MAX_SLOW_START_S, DEFAULT_SLOW_START)
    h = c.table(tbl, "health", path)
    health = _parse_health(c, h, _join(path, "health")) if h is not None else None
    backends = _parse_backends(c, tbl, path)
    if len(c.errors) > errors_before or backends is None or slow is None:
        return None
    return PoolConfig(name=name, backends=backends, health=health, slow_start=slow)


def _parse_vip_pool(c: _Checker, v: dict, path: str, pool_names: list[str]) -> str | None:
    """The name of a defined pool; an undefined one is answered with the
    closest name, or the list of names."""
    pool = c.string(v, "pool", path, "the name of a [pool.NAME] table")
    if pool is None or pool in pool_names:
        return pool
    close = difflib.get_close_matches(pool, pool_names, n=1, cutoff=0.6)
    if close:
        hint = f'; did you mean "{close[0]}"?'
    elif pool_names:
        hint = "; defined pools: " + ", ".join(pool_names)
    else:
        hint = "; no pool is defined"
    c.error(_join(path, "pool"), f"{_show(pool)} is not defined: expected the name of a "
            f"[pool.NAME] table{hint}")
    return None


def _vip_name_ok(name: str) -> bool:
    return len(name) <= 64 and not any(ch.isspace() or not ch.isprintable() for ch in name)


def _parse_vip_traffic(c: _Checker, v: dict, path: str) -> dict[str, Any] | None:
    """The VIP's traffic keys: closed ports, persistence, limits, overload guard."""
    kw: dict[str, Any] = {
        "closed_port": c.choice(v, "closed_port", path, CLOSED_PORT_ACTIONS, None)
        if "closed_port" in v else None,
        "persistence": c.choice(v, "persistence", path, PERSISTENCE_MODES, "none"),
        "persistence_timeout": c.seconds(v, "persistence_timeout", path, 0.001, MAX_TIMEOUT_S,
                                         DEFAULT_PERSISTENCE_TIMEOUT),
        "max_flows": c.integer(v, "max_flows", path, 0, FLOW_MAX, 0),
        "client_rate": c.integer(v, "client_rate", path, 0, RATE_MAX, 0),
        "client_burst": c.integer(v, "client_burst", path, 0, RATE_MAX, 0),
        "new_flow_rate": c.integer(v, "new_flow_rate", path, 0, RATE_MAX, 0),
        "new_flow_burst": c.integer(v, "new_flow_burst", path, 0, RATE_MAX, 0),
        "limit_action": c.choice(v, "limit_action", path, LIMIT_ACTIONS, "drop"),
    }
    if "closed_port" in v and kw["closed_port"] is None:
        return None
    for burst, rate in (("client_burst", "client_rate"), ("new_flow_burst", "new_flow_rate")):
        if kw[burst] and not kw[rate]:
            c.bad(_join(path, burst), v[burst], f"0 (no {rate} is set)",
                  f"a burst needs {rate} > 0")
    if "persistence_timeout" in v and kw["persistence"] == "none":
        c.warn(_join(path, "persistence_timeout"), 'ignored: persistence is "none"')
    return None if any(x is None for k, x in kw.items() if k != "closed_port") else kw


def _parse_vip(c: _Checker, v: dict, path: str, pool_names: list[str]) -> VipConfig | None:
    addr = c.address(v, "address", path)
    port = c.integer(v, "port", path, 1, 65535)
    proto = c.choice(v, "protocol", path, PROTOCOLS)
    pool = _parse_vip_pool(c, v, path, pool_names)
    what = "a name (1..64 characters, no spaces)"
    name = c.checked_string(v, "name", path, what, _vip_name_ok, what, "")
    traffic = _parse_vip_traffic(c, v, path)
    if None in (addr, port, proto, pool, name) or traffic is None:
        return None
    return VipConfig(addr, port, proto, pool, name or f"{_hostport(addr, port)}/{proto}",
                     **traffic)


def _parse_vips(c: _Checker, data: dict, pool_names: Iterable[str]) -> list[VipConfig] | None:
    """The [[vip]] array; None after any error in it."""
    errors_before = len(c.errors)
    raw = c.array(data, "vip", "", "an array of tables ([[vip]])", [])
    if raw is None:
        return None
    if len(raw) > MAX_VIPS:
        c.error("vip", f"expected at most {MAX_VIPS} VIPs, got {len(raw)}")
    pool_names = sorted(pool_names)
    vips: list[VipConfig] = []
    by_key: dict[tuple, str] = {}
    by_name: dict[str, str] = {}
    for p, v in c.table_array(raw, "vip", "a table ([[vip]])", _VIP_KEYS):
        vip = _parse_vip(c, v, p, pool_names)
        if vip is None:
            continue
        if vip.key in by_key:
            c.error(p, f"duplicate VIP {vip}, already defined at {by_key[vip.key]}")
        elif vip.name in by_name:
            c.error(_join(p, "name"), f"duplicate VIP name {_show(vip.name)}, already used by "
                    f"{by_name[vip.name]}; expected a unique name")
        else:
            by_key[vip.key] = by_name[vip.name] = p
            vips.append(vip)
    return None if len(c.errors) > errors_before else vips


def _check_ring_size(c: _Checker, ring_size: int, pool: str, n: int) -> None:
    """The ring must have a slot for every backend, and should have 100 per
    backend for an even spread (Maglev §3.4)."""
    if n >= ring_size:
        c.error("global.ring_size", f"expected a prime larger than the {n} backends of "
                f"pool {_show(pool)}, got {ring_size}")
    elif n and ring_size < 100 * n:
        c.warn("global.ring_size", f"{ring_size} is less than 100 slots per backend of "
               f"pool {_show(pool)} ({n} backends): the load spreads unevenly "
               "(Maglev §3.4)")


def _cross_check(c: _Checker, vips: list[VipConfig], pools: dict[str, PoolConfig],
                 ring_size: int | None) -> None:
    """Checks that need VIPs and pools together: address families, VIP
    addresses reused as backends, unused pools, ring size vs backend count."""
    vip_addrs = {v.address: i for i, v in enumerate(vips)}
    for name, pool in pools.items():
        users = [(i, v) for i, v in enumerate(vips) if v.pool == name]
        if not users:
            c.warn(_join("pool", name), "not used by any VIP")
        for j, be in enumerate(pool.backends):
            ap = f"{_join('pool', name)}.backends[{j}].address"
            other = next(((i, v) for i, v in users if v.family != be.address.version), None)
            if other is not None:
                i, v = other
                c.error(ap, f"{be.address} is IPv{be.address.version} but vip[{i}] "
                        f"({_show(v.name)}) that uses pool {_show(name)} is IPv{v.family}; "
                        f"expected an IPv{v.family} address (NAT does not translate families)")
            if be.address in vip_addrs:
                c.error(ap, f"{be.address} is also the address of vip[{vip_addrs[be.address]}]; "
                        "expected a backend address that is not a VIP")
        if ring_size is not None and users:
            _check_ring_size(c, ring_size, name, len(pool.backends))


def _check_closed_ports(c: _Checker, vips: list[VipConfig], closed_port: str | None) -> None:
    """The closed ports of an address are one setting: every VIP on that address must give
    the same closed_port (its own or the global one)."""
    first: dict[IPAddress, tuple[int, str]] = {}
    for i, v in enumerate(vips):
        eff = v.closed_port or closed_port
        if eff is None:
            continue
        if v.address not in first:
            first[v.address] = (i, eff)
        elif first[v.address][1] != eff:
            j, other = first[v.address]
            c.error(f"vip[{i}].closed_port", f'{_show(eff)} differs from vip[{j}] on the same '
                    f'address {v.address} ({_show(other)}); expected the same closed_port for '
                    "every VIP of an address (the ports no VIP serves are the address's)")


def config_from_dict(data: dict, source: str = "<string>") -> Config:
    """Validate an already-parsed TOML document (a dict as `tomllib` returns)
    and build the `Config`. Raises ConfigError with every mistake found."""
    c = _Checker()
    if not isinstance(data, dict):
        raise ConfigError([f"expected a TOML document (a table), got {_tname(data)}"], source)
    c.known_keys(data, "", ("global", "rawsock", "bgp", "vip", "pool", "sync"))
    g = _parse_global(c, data)
    rawsock = _parse_rawsock(c, data, g["mode"])
    bgp = _parse_bgp(c, data, g["tun_name"])
    sync = _parse_sync(c, data)
    pools: dict[str, PoolConfig] = {}
    pool_ok = True
    raw_pools = c.table(data, "pool", "")
    for name, tbl in (raw_pools or {}).items():
        pc = _parse_pool(c, name, tbl)
        if pc is None:
            pool_ok = False
        else:
            pools[name] = pc
    pool_names = list(raw_pools or {})
    vips = _parse_vips(c, data, pool_names)
    if vips is not None and not vips:
        c.warn("vip", "no [[vip]] defined: the balancer forwards nothing")
    if vips is not None and pool_ok:
        _cross_check(c, vips, pools, g.get("ring_size"))
    if bgp is not None and vips:
        _check_bgp_families(c, bgp, vips)
    if vips:
        _check_closed_ports(c, vips, g["closed_port"])
    if c.errors:
        raise ConfigError(c.errors, source)
    return Config(
        mode=g["mode"], workers=g["workers"], worker_cpus=g["worker_cpus"],
        flow_table_size=g["flow_table_size"],
        hash_seed=g["hash_seed"], ring_size=g["ring_size"], tun_name=g["tun_name"],
        control_socket=g["control_socket"], metrics_listen=g["metrics_listen"],
        log_level=g["log_level"], all_down=g["all_down"], closed_port=g["closed_port"],
        reject_rate=g["reject_rate"], reject_burst=g["reject_burst"],
        busy_poll_us=g["busy_poll_us"],
        client_table_size=g["client_table_size"], timeouts=g["timeouts"],
        fragments=g["fragments"], flow_file=g["flow_file"], rawsock=rawsock, bgp=bgp,
        sync=sync if isinstance(sync, SyncConfig) else None, vips=tuple(vips or ()),
        pools=MappingProxyType(pools),
        warnings=tuple(c.warnings), source=source)


_TOML_POS = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text. Raises ConfigError (a TOML syntax error
    is reported with its line and column)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS.match(msg)
        if m:
            msg = f"line {m.group(2)}, column {m.group(3)}: TOML syntax error: {m.group(1)}"
        else:
            msg = f"TOML syntax error: {msg}"
        raise ConfigError([msg], source) from None
    return config_from_dict(data, source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file. Raises ConfigFileError if it
    cannot be read, ConfigError if its content is wrong."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigFileError([f"cannot read the config file: {e.strerror or e}"],
                              source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - raw.rfind(b"\n", 0, e.start)
        raise ConfigError([f"line {line}, column {col}: not UTF-8 text (TOML files are UTF-8)"],
                          source) from None
    return parse_config(text, source)


def cmd_check_config(args: argparse.Namespace) -> int:
    """``lbcore check-config FILE``: validate without touching the network.
    Exit 0 and "OK: N VIPs, M backends" (warnings on stderr); 1 with every
    error on stderr if the content is wrong; 2 if the file cannot be read."""
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        for err in e.errors:
            print(f"{e.source}: {err}", file=sys.stderr)
        n = len(e.errors)
        print(f"check-config: {n} error{'s' if n != 1 else ''} in {e.source}", file=sys.stderr)
        return 2 if isinstance(e, ConfigFileError) else 1
    for w in cfg.warnings:
        print(f"{cfg.source}: warning: {w}", file=sys.stderr)
    # valid, but `run` on this machine would refuse it (the file may be meant for another)
    why = check_worker_cpus(cfg.worker_cpus, os.sched_getaffinity(0))
    if why is not None:
        print(f"{cfg.source}: warning: {why}: `lbcore run` refuses it on this machine",
              file=sys.stderr)
    bgp = (f", BGP to {len(cfg.bgp.neighbors)} neighbor(s)" if cfg.bgp is not None else "")
    print(f"OK: {len(cfg.vips)} VIPs, {cfg.backend_count} backends{bgp}")
    return 0


# --- runtime arguments ----------------------------------------------------------------
# The control socket's commands change the same state as the file does, so their arguments
# pass the same checks (the _Checker rules and limits above); a bad one is a ValueError whose
# message names the argument, never an exception from deeper down.

SPEC_MAX = 256                    # bytes of a VIP / backend selector ("NAME", "ADDR:PORT")


class ArgumentError(ValueError):
    """A runtime argument the config's rules refuse; the message names it."""


def _one(name: str, value: Any, get: Callable[[_Checker, dict], Any]) -> Any:
    c = _Checker()
    v = get(c, {name: value})
    if c.errors:
        raise ArgumentError(c.errors[0])
    return v


def check_weight(value: Any, name: str = "weight") -> int:
    """A backend weight, as pool.*.backends[].weight: an integer 0..MAX_WEIGHT."""
    return _one(name, value, lambda c, t: c.integer(t, name, "", 0, MAX_WEIGHT))


def check_integer(value: Any, name: str, lo: int, hi: int) -> int:
    """An integer lo..hi (not a bool, not a float), with the config's message."""
    return _one(name, value, lambda c, t: c.integer(t, name, "", lo, hi))


def check_port(value: Any, name: str = "port", lo: int = 1) -> int:
    """A port lo..65535 (1 for a service port, 0 allowed for a client's)."""
    return check_integer(value, name, lo, 65535)


def check_address(value: Any, name: str = "address") -> IPAddress:
    """A unicast IPv4 or IPv6 address, as a backend's or VIP's address."""
    return _one(name, value, lambda c, t: c.address(t, name, ""))


def check_protocol(value: Any, name: str = "proto") -> str:
    """"tcp" or "udp", as vip[].protocol."""
    return _one(name, value, lambda c, t: c.choice(t, name, "", PROTOCOLS))


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (with the config's "did you mean")."""
    return _one(name, value, lambda c, t: c.choice(t, name, "", choices))


def check_spec(value: Any, name: str) -> str:
    """A selector of VIPs or backends (a VIP name, ADDR, ADDR:PORT, [ADDR]:PORT,
    ADDR:PORT/PROTO): a non-empty string of at most SPEC_MAX bytes without control
    characters; what it selects is the caller's business."""
    return _one(name, value, lambda c, t: c.checked_string(
        t, name, "", "a string (a name or ADDR[:PORT])",
        lambda s: 0 < len(s.encode()) <= SPEC_MAX and s.isprintable(),
        f"a name or ADDR[:PORT] of 1..{SPEC_MAX} printable characters"))
