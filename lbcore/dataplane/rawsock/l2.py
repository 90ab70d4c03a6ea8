"""The rawsock workers' MAC table, filled from the kernel's neighbour and routing tables.

See :class:`L2Resolver`: one dump of each table whenever rtnetlink reports a change (and every
REFRESH_S anyway), and on-demand resolution by the kernel of the next hops the workers found
unresolved.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ... import netconf
from ..replies import IPAddress

log = logging.getLogger("lbcore.rawsock")

NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80   # reachable stale delay probe noarp perm.
RTN_UNICAST = 1
# re-read the kernel's tables at least this often. Every change is announced on the notifier
# (and a lost announcement, ENOBUFS, makes it readable too), so this is only a safety net; a
# re-read is three netlink dumps, several ms of CPU in this thread, which the scheduler takes
# from a worker spinning on the same CPU: once a second showed in the latency's p99.
REFRESH_S = 30.0
TICK_S = 1.0             # on_tick (the ring-drop count) this often
MISS_CHECK_S = 0.1       # look at the workers' unresolved next hops this often
RESOLVE_EVERY_S = 1.0    # ask the kernel to resolve one next hop at most this often

L2Route = tuple[int, str, str | None]      # (link, network, gateway)
L2Neigh = tuple[int, str, bytes]           # (link, address, MAC)


def _mac(s: str | None) -> bytes | None:
    if not s:
        return None
    b = bytes.fromhex(s.replace(":", ""))
    return b if len(b) == 6 else None


def nexthop(routes: Sequence[L2Route], link: int, dst: IPAddress) -> IPAddress | None:
    """The next hop of ``dst`` leaving on ``link`` by longest prefix, of equal ones the first
    (what the C lookup does): the route's gateway, ``dst`` itself on-link, or None without a
    route."""
    best: tuple[int, IPAddress] | None = None
    for lk, net, gw in routes:
        n = ipaddress.ip_network(net)
        if lk == link and n.version == dst.version and dst in n:
            if best is None or n.prefixlen > best[0]:
                best = (n.prefixlen, ipaddress.ip_address(gw) if gw else dst)
    return best[1] if best else None


class L2Resolver:
    """Keeps the data plane's L2 table equal to what the kernel knows about ``links`` (their
    MACs, their unicast routes, their resolved neighbours) and asks the kernel to resolve the
    next hops that are missing. ``wanted``: the addresses frames are sent to on the backend
    link (the backends), resolved before any client asks."""

    def __init__(self, dp: Any, links: Sequence[str], backend_link: int,
                 on_tick: Any = None, on_refresh: Any = None) -> None:
        self.dp = dp
        self.on_tick = on_tick
        self.on_refresh = on_refresh
        self.links = list(links)
        self.backend_link = backend_link
        self.wanted: list[IPAddress] = []
        self.published: tuple | None = None
        self.routes: list[L2Route] = []
        self.neighbours: list[L2Neigh] = []
        self._asked: dict[tuple[int, IPAddress], float] = {}
        self.refreshed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._notifier: socket.socket | None = None

    def snapshot(self) -> tuple[list[bytes], list[L2Route], list[L2Neigh]]:
        """(MAC of each link, routes, neighbours) as the kernel has them now."""
        info = {li.name: li for li in netconf.links()}
        macs = []
        for name in self.links:
            if name not in info:
                raise OSError(errno.ENODEV, f"rawsock link {name!r} is gone")
            macs.append(_mac(info[name].mac) or bytes(6))
        routes: list[L2Route] = []
        # the better metric first: of two routes of one prefix the first wins (a passed
        # packet, which may leave by either link, goes where the kernel would send it)
        for r in sorted(netconf.routes(), key=lambda r: r.priority):
            if r.oif in self.links and r.type == RTN_UNICAST:
                routes.append((self.links.index(r.oif), r.prefix, r.gateway))
        neigh: list[L2Neigh] = []
        for ifname, ip, lladdr, state in netconf.neighbours():
            mac = _mac(lladdr)
            if (ifname in self.links and mac and state & NUD_VALID
                    and not ipaddress.ip_address(ip).is_multicast):
                neigh.append((self.links.index(ifname), ip, mac))
        return macs, routes, neigh

    def refresh(self) -> bool:
        """Publish the kernel's current state if it changed; resolve what is missing. True if a
        new table was published."""
        macs, routes, neigh = self.snapshot()
        self.refreshed_at = time.monotonic()
        key = (tuple(macs), tuple(routes), tuple(sorted(neigh)))
        changed = key != self.published
        if changed:
            self.dp.set_l2(macs, routes, neigh)
            old = {(lk, a): m for lk, a, m in self.neighbours}
            for lk, a, m in neigh:
                if old.get((lk, a), m) != m:
                    log.info("neighbour %s on %s: MAC %s -> %s", a, self.links[lk],
                             old[(lk, a)].hex(":"), m.hex(":"))
            log.debug("L2 table: %d route(s), %d neighbour(s)", len(routes), len(neigh))
            self.published = key
            self.routes, self.neighbours = routes, neigh
        self.resolve_missing()
        return changed

    def resolve_missing(self) -> None:
        """Ask the kernel to resolve the next hops the last snapshot lacks."""
        routes, neigh = self.routes, self.neighbours
        have = {(lk, ipaddress.ip_address(a)) for lk, a, _ in neigh}
        want: set[tuple[int, IPAddress]] = set()
        for addr in self.wanted:
            nh = nexthop(routes, self.backend_link, addr)
            if nh is not None:
                want.add((self.backend_link, nh))
        for lk, _, gw in routes:
            if gw:
                want.add((lk, ipaddress.ip_address(gw)))
        for lk, addr in self.dp.l2_misses():
            want.add((lk, ipaddress.ip_address(addr)))
        now = time.monotonic()
        for lk, addr in want - have:
            if now - self._asked.get((lk, addr), -RESOLVE_EVERY_S) < RESOLVE_EVERY_S:
                continue
            self._asked[(lk, addr)] = now
            try:
                netconf.neigh_resolve(self.links[lk], str(addr))
            except Exception as e:  # noqa: BLE001 - a hint; the next round tries again
                log.debug("resolving %s on %s: %s", addr, self.links[lk], e)

    def start(self) -> None:
        """Refresh on every rtnetlink change and every REFRESH_S seconds (then call
        on_refresh), call on_tick every TICK_S, in a thread of its own, until stop()."""
        self._stop.clear()
        self._notifier = netconf.change_notifier()
        self._thread = threading.Thread(target=self._run, name="lbcore-l2", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        ticked = time.monotonic()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._notifier], [], [], MISS_CHECK_S)
            try:
                if ready:
                    netconf.drain_notifier(self._notifier)
                now = time.monotonic()
                if ready or now - self.refreshed_at >= REFRESH_S:
                    self.refresh()
                    if self.on_refresh is not None:
                        self.on_refresh()
                else:
                    self.resolve_missing()
                if self.on_tick is not None and now - ticked >= TICK_S:
                    ticked = now
                    self.on_tick()
                failing = False
            except Exception as e:  # noqa: BLE001 - logged once, retried
                if not failing:
                    log.warning("L2 refresh failed (retrying): %s", e)
                failing = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None


