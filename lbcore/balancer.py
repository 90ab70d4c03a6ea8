"""The control class: what the operator and the health checks change, turned
into forwarding tables for the data plane (katran's KatranLb analogue).

Balancer(dataplane) holds the desired state - VIPs, their backends, each
backend's health, drain flag and weight - and after every change builds a new
Maglev table in C and publishes it atomically (`Dataplane.publish`). Verbs
are verb_noun, one per change: add_vip/del_vip/add_backend/del_backend/
set_backend_weight/drain/set_health/pick; deleting something absent is a no-op.

Flow semantics on a change:
  - draining: weight 0 in the ring, but its flows stay pinned to it;
  - down (health) or removed: weight 0 / gone, and its flows are purged from
    the flow table after the publish, so their next packets are re-picked;
  - weight change: the ring moves the minimum of slots (Maglev); established
    flows keep their backend through the flow table.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

from .config import check_weight

log = logging.getLogger("lbcore.balancer")

IPAddress = IPv4Address | IPv6Address
PROTO = {"tcp": 6, "udp": 17}
PROTO_NAMES = {n: name for name, n in PROTO.items()}


class PublishError(RuntimeError):
    """A forwarding table could not be built or published; the previous one stays live."""


@dataclass
class BackendState:
    address: IPAddress
    port: int
    weight: int                   # configured weight
    stat_id: int
    up: bool = True
    draining: bool = False
    weight_override: int | None = None
    last_change: float = field(default_factory=time.time)
    reason: str = "configured"
    up_since: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[IPAddress, int]:
        return (self.address, self.port)

    @property
    def current_weight(self) -> int:
        """The operator's runtime weight if set, else the configured one."""
        return self.weight if self.weight_override is None else self.weight_override

    def effective_weight(self, slow_start: float, now: float) -> int:
        """Weight in the ring: 0 when down or draining; ramps up linearly
        during slow start after the backend came up."""
        if not self.up or self.draining:
            return 0
        w = self.current_weight
        if slow_start > 0 and w > 0:
            frac = (now - self.up_since) / slow_start
            if frac < 1:
                return max(1, int(w * max(frac, 0.0)))
        return w


@dataclass
class VipState:
    name: str
    address: IPAddress
    port: int
    proto: str
    pool: str
    stat_id: int
    ring_size: int
    slow_start: float = 0.0
    backends: dict[tuple[IPAddress, int], BackendState] = field(default_factory=dict)
    # closed ports, persistence, limits (lbcore._core.VIP_SETTINGS keys); empty = all off
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[IPAddress, int, str]:
        return (self.address, self.port, self.proto)


class Balancer:
    """Desired forwarding state -> published tables.

    dataplane: anything with publish(vips, seed), pick(...) and a flow_table
    with purge_backend() and lookup() (lbcore._core.Dataplane, or a fake in
    tests).
    """

    def __init__(self, dataplane, seed: int = 0, ring_size: int = 65537,
                 clock_ms: Callable[[], int] | None = None) -> None:
        self.dp = dataplane
        # the flow table's clock (lbcore._core.now_ms, ms of CLOCK_MONOTONIC_COARSE)
        self.clock_ms = clock_ms or _monotonic_ms
        self.seed = seed
        self.ring_size = ring_size
        self.vips: dict[tuple[IPAddress, int, str], VipState] = {}
        self._next_vip_stat = 0
        self._next_be_stat = 0
        self.rebuilds = 0
        self.last_rebuild_s = 0.0
        self.publish_failures = 0
        self.last_publish_error: str | None = None
        # (address, port, proto) whose flows go once the next table is live
        self._purge_after_publish: list[tuple[IPAddress, int, str]] = []

    # -- VIPs and backends -------------------------------------------------

    def add_vip(self, name: str, address: str | IPAddress, port: int, proto: str,
                pool: str = "", ring_size: int | None = None,
                slow_start: float = 0.0, settings: dict[str, Any] | None = None) -> VipState:
        """Add a VIP (address, port, protocol), or update the name, pool, ring size, slow
        start and traffic settings of the one that exists; returns it."""
        addr = ip_address(address) if isinstance(address, str) else address
        key = (addr, port, proto)
        if key in self.vips:
            v = self.vips[key]
            v.name, v.pool, v.slow_start = name, pool, slow_start
            v.ring_size = ring_size or self.ring_size
            v.settings = dict(settings or {})
            return v
        v = VipState(name=name, address=addr, port=port, proto=proto, pool=pool,
                     stat_id=self._alloc_vip_stat(), ring_size=ring_size or self.ring_size,
                     slow_start=slow_start, settings=dict(settings or {}))
        self.vips[key] = v
        return v

    def del_vip(self, key: tuple[IPAddress, int, str]) -> None:
        """Remove the VIP (address, port, protocol); its flows go after the next publish."""
        v = self.vips.pop(key, None)
        if v is not None:
            for b in v.backends.values():
                self._queue_purge(b, v)

    def add_backend(self, vip: VipState, address: str | IPAddress, port: int,
                    weight: int = 1) -> BackendState:
        """Add a backend to ``vip``, or set the configured weight of the one that exists;
        keeps its health, drain and runtime-weight state. Returns it."""
        weight = check_weight(weight)
        addr = ip_address(address) if isinstance(address, str) else address
        if addr.version != vip.address.version:
            raise ValueError(f"backend {addr} is not of the address family of VIP {vip.address}")
        b = vip.backends.get((addr, port))
        if b is not None:
            b.weight = weight
            return b
        b = BackendState(address=addr, port=port, weight=weight, stat_id=self._alloc_be_stat())
        vip.backends[(addr, port)] = b
        return b

    def del_backend(self, vip: VipState, key: tuple[IPAddress, int]) -> None:
        """Remove the backend (address, port) of ``vip``; its flows go after the next
        publish."""
        b = vip.backends.pop(key, None)
        if b is not None:
            self._queue_purge(b, vip)

    def configure(self, config) -> list[str]:
        """Make the desired state match a Config (start and reload): add,
        change and remove VIPs and backends; keep the health, drain and
        weight state of everything that stays. Returns what changed, for
        the log. Nothing is published: call publish() after."""
        changes: list[str] = []
        self.seed = config.hash_seed
        self.ring_size = config.ring_size
        want = {v.key: v for v in config.vips}
        for key in [k for k in self.vips if k not in want]:
            changes.append(f"removed VIP {self.vips[key].name}")
            self.del_vip(key)
        for key, vc in want.items():
            pool = config.pool_of(vc)
            if key not in self.vips:
                changes.append(f"added VIP {vc.name or vc}")
            v = self.add_vip(vc.name or str(vc), vc.address, vc.port, vc.protocol,
                             pool=pool.name, ring_size=config.ring_size,
                             slow_start=pool.slow_start,
                             settings=vc.settings(config.closed_port))
            bwant = {(b.address, b.port): b for b in pool.backends}
            for bkey in [k for k in v.backends if k not in bwant]:
                changes.append(f"removed backend {bkey[0]}:{bkey[1]} from {v.name}")
                self.del_backend(v, bkey)
            for bkey, bc in bwant.items():
                old = v.backends.get(bkey)
                if old is None:
                    changes.append(f"added backend {bc.address}:{bc.port} to {v.name}")
                elif old.weight != bc.weight:
                    changes.append(f"weight of {bc.address}:{bc.port} in {v.name}: "
                                   f"{old.weight} -> {bc.weight}")
                self.add_backend(v, bc.address, bc.port, bc.weight)
        return changes

    # -- runtime changes ---------------------------------------------------

    def find_backends(self, vip_spec: str | None, backend_spec: str
                      ) -> list[tuple[VipState, BackendState]]:
        """Backends matching 'ADDR[:PORT]' on VIPs matching 'NAME|ADDR[:PORT]'
        (None = every VIP)."""
        out = []
        for v in self.vips.values():
            if vip_spec is not None and not vip_matches(v, vip_spec):
                continue
            for b in v.backends.values():
                if _backend_matches(b, backend_spec):
                    out.append((v, b))
        return out

    def find_vips(self, spec: str) -> list[VipState]:
        """VIPs matching 'NAME', 'ADDR', 'ADDR:PORT', '[ADDR]:PORT' or 'ADDR:PORT/PROTO'."""
        return [v for v in self.vips.values() if vip_matches(v, spec)]

    def set_health(self, vip: VipState, b: BackendState, up: bool, reason: str) -> bool:
        """Record a health transition; True if it changed anything."""
        if b.up == up:
            return False
        b.up = up
        b.reason = reason
        b.last_change = time.time()
        if up:
            b.up_since = time.monotonic()
        else:
            self._queue_purge(b, vip)
        log.info("backend %s:%d of %s is %s (%s)", b.address, b.port, vip.name,
                 "up" if up else "down", reason)
        return True

    def drain(self, vip: VipState, b: BackendState, draining: bool = True) -> bool:
        """Drain (weight 0 for new flows, tracked flows stay) or undrain a backend; True if
        that changed anything."""
        if b.draining == draining:
            return False
        b.draining = draining
        b.last_change = time.time()
        b.reason = "drained by operator" if draining else "undrained by operator"
        log.info("backend %s:%d of %s %s", b.address, b.port, vip.name,
                 "draining" if draining else "undrained")
        return True

    def set_backend_weight(self, vip: VipState, b: BackendState, weight: int) -> bool:
        """Set a runtime weight that overrides the configured one until the next restart;
        True if that changed anything. The config's rule (0..MAX_WEIGHT) is checked before
        anything changes: a weight the table builder refuses would fail every later publish."""
        weight = check_weight(weight)
        if b.weight_override == weight:
            return False
        b.weight_override = weight
        b.last_change = time.time()
        b.reason = f"weight set to {weight}"
        log.info("backend %s:%d of %s weight %d", b.address, b.port, vip.name, weight)
        return True

    def in_slow_start(self) -> bool:
        """Whether some backend's weight is still ramping up (tables must be rebuilt)."""
        now = time.monotonic()
        return any(v.slow_start > 0 and b.up and now - b.up_since < v.slow_start
                   for v in self.vips.values() for b in v.backends.values())

    # -- tables ------------------------------------------------------------

    def table_spec(self) -> list[tuple]:
        """The forwarding table in Dataplane.publish()'s format."""
        now = time.monotonic()
        spec = []
        for v in self.vips.values():
            bes = [(b.address, b.port, b.effective_weight(v.slow_start, now), b.stat_id,
                    b.draining) for b in v.backends.values()]
            spec.append((v.address, v.port, v.proto, v.stat_id, v.ring_size, bes, v.settings))
        return spec

    def publish(self) -> None:
        """Build and publish the table; then forget the flows of backends that
        went down or away (only now can no worker pick them any more).

        The daemon does the same in steps (table_spec, take_purges, the data plane's publish in
        a worker thread, published, purge) so that the event loop is not held up."""
        spec, purges = self.table_spec(), self.take_purges()
        t0 = time.perf_counter()
        try:
            self.dp.publish(spec, self.seed)
        except TimeoutError:
            pass        # the new table is live; only the old one could not be freed
        except Exception as e:
            self.publish_failed(e, purges)
            raise
        self.published(time.perf_counter() - t0)
        self.purge(purges)

    def take_purges(self) -> list[tuple[IPAddress, int, str]]:
        """The backends whose flows must go once the next table is live (and forget them)."""
        purges, self._purge_after_publish = self._purge_after_publish, []
        return purges

    def published(self, seconds: float) -> None:
        """Record a table that was built in ``seconds`` and is now live."""
        self.last_rebuild_s = seconds
        self.rebuilds += 1
        self.last_publish_error = None

    def publish_failed(self, exc: BaseException,
                       purges: Iterable[tuple[IPAddress, int, str]]) -> None:
        """Record a table that could not be built or published (the old one stays live);
        the purges it would have allowed wait for the next table that is."""
        self.publish_failures += 1
        self.last_publish_error = f"{type(exc).__name__}: {exc}"
        self._purge_after_publish[:0] = list(purges)
        log.error("publishing the forwarding table failed (the previous table stays live): %s",
                  self.last_publish_error)

    # -- transactions ------------------------------------------------------

    def snapshot(self) -> Any:
        """A copy of the desired state, for restore() when a change could not be published
        (the Python side must describe the table that is live, not one that was refused)."""
        return copy.deepcopy((self.vips, self.seed, self.ring_size, self._next_vip_stat,
                              self._next_be_stat, self._purge_after_publish))

    def restore(self, snap: Any) -> None:
        """Go back to a snapshot() (keeping purges queued since: their flows must still go)."""
        queued = list(self._purge_after_publish)
        (self.vips, self.seed, self.ring_size, self._next_vip_stat, self._next_be_stat,
         purges) = copy.deepcopy(snap)
        self._purge_after_publish = list(dict.fromkeys(purges + queued))

    def purge(self, purges: Iterable[tuple[IPAddress, int, str]]) -> None:
        """Drop the tracked flows of these (address, port, protocol) backends: their next
        packet is picked again from the live table. Safe from a worker thread."""
        for addr, port, proto in purges:
            n = self.dp.flow_table.purge_backend(str(addr), port, proto)
            if n:
                log.info("re-picking %d flows of %s:%d/%s", n, addr, port, proto)

    def pick(self, vip_spec: str, src: str, sport: int, proto: str | None = None) -> dict:
        """Which backend a flow from src:sport to the VIP goes to, and why."""
        vips = [v for v in self.find_vips(vip_spec) if proto is None or v.proto == proto]
        if not vips:
            raise KeyError(f"no VIP matches {vip_spec!r}")
        v = vips[0]
        flow = self.dp.flow_table.lookup(src, str(v.address), sport, v.port, v.proto,
                                         now=self.clock_ms())
        if flow is not None:
            return {"vip": v.name, "backend": f"{flow['backend']}:{flow['bport']}",
                    "why": f"tracked flow (state {flow['state']})"}
        got = self.dp.pick(src, sport, str(v.address), v.port, v.proto)
        if got is None or got[1] is None:
            return {"vip": v.name, "backend": None, "why": "no usable backend"}
        return {"vip": v.name, "backend": f"{got[2]}:{got[3]}",
                "why": f"Maglev table slot (new flow; ring size {v.ring_size})"}

    # -- internals -----------------------------------------------------------

    def _queue_purge(self, b: BackendState, vip: VipState) -> None:
        self._purge_after_publish.append((b.address, b.port, vip.proto))

    def _alloc_vip_stat(self) -> int:
        self._next_vip_stat += 1
        if self._next_vip_stat >= 65536:
            raise RuntimeError("out of VIP counter slots; restart lbcore")
        return self._next_vip_stat

    def _alloc_be_stat(self) -> int:
        self._next_be_stat += 1
        if self._next_be_stat >= 65536:
            raise RuntimeError("out of backend counter slots; restart lbcore")
        return self._next_be_stat


def vip_matches(v: VipState, spec: str) -> bool:
    """Whether ``spec`` names the VIP (see Balancer.find_vips)."""
    return spec in (v.name, str(v.address), f"{v.address}:{v.port}",
                    f"[{v.address}]:{v.port}", f"{v.address}:{v.port}/{v.proto}")


def _backend_matches(b: BackendState, spec: str) -> bool:
    return spec in (str(b.address), f"{b.address}:{b.port}", f"[{b.address}]:{b.port}")


def _monotonic_ms() -> int:
    return (time.monotonic_ns() // 1_000_000) & 0xFFFFFFFF
