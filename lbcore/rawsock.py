"""Mode "rawsock": the AF_PACKET data plane's set-up (issue 5, docs/rawsock.md).

The workers (ext/lb_rawsock.c) read frames from TPACKET_V3 rings on the client-facing and the
backend-facing link and send the rewritten frames with sendmmsg() on the other link. This module
prepares everything around them, in the gateway's own namespace, and undoes it on exit:

* **Sockets**: per worker one :class:`lbcore._core.RawSocket` per link, in a PACKET_FANOUT_HASH
  group per link (the workers share a link by flow hash), with a classic-BPF filter generated
  here (:func:`build_filter`): on the client link only frames to a VIP, on the backend link only
  replies from a (backend, protocol, port) of the config that are not addressed to the gateway
  itself (its health checks).
* **The kernel keeps out** of what the balancer forwards. AF_PACKET gets a copy of each frame;
  the kernel's own copy must die quietly (no ICMP, no second, un-NATed forward). The VIPs get
  blackhole routes (the kernel drops a packet to a blackhole silently, before forwarding), and
  the backends' replies are steered by the same narrow policy rules as in tun mode
  (``from BACKEND ipproto P sport PORT``, priority 4242) into a table whose default route is a
  blackhole. Health-check replies are addressed to the gateway, which the local table (always
  consulted first) delivers. Plain routes and rules: no nftables/tc dependency, nothing that
  matches more than the balancer's own traffic, the same clean-up of a crashed run as tun mode.
* **ARP/NDP for the VIPs**: a VIP is normally routed to the gateway (as in the lab), so nobody
  asks for it; for a VIP on the client link's subnet: the kernel answers NDP for an IPv6 VIP
  through a proxy entry (``proxy_ndp``, proxy_delay 0), and the data plane answers ARP for an
  IPv4 VIP itself (the kernel's proxy ARP needs a unicast route to the VIP, which would make
  it forward the VIP's traffic too).
* **L2**: :class:`L2Resolver` fills the data plane's MAC table (next hop -> MAC per link, plus
  each link's own MAC and its routes) from the kernel's neighbour and routing tables. It re-reads
  them (one dump each) whenever rtnetlink reports a link/address/route/neighbour change, and
  once a second anyway: the events only wake it, so a lost event (netlink overflow) delays an
  update by a second at most, and the kernel's own neighbour machinery (ARP/NDP, gratuitous
  ARP, NUD probes) is what notices a new MAC. Next hops the table lacks - the backends, the
  routes' gateways, and whatever the workers reported as unresolved - are resolved on demand
  by the kernel (a neighbour entry flagged NTF_USE), at most once a second each; frames to an
  unresolved next hop are dropped and counted (``no_neigh``).
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from . import _core, netconf
from .gateway import RULE_TABLE, ReplyPath, ReplyRules, _af, _host

log = logging.getLogger("lbcore.rawsock")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# --------------------------------------------------------------------------- classic BPF

# opcodes (linux/filter.h, bpf_common.h)
BPF_LD_W_ABS = 0x20     # A = word at k
BPF_LD_H_ABS = 0x28     # A = half at k
BPF_LD_B_ABS = 0x30     # A = byte at k
BPF_LD_H_IND = 0x48     # A = half at X + k
BPF_LDX_B_MSH = 0xB1    # X = 4 * (byte at k & 0xf): the IPv4 header length
BPF_JA = 0x05           # pc += k
BPF_JEQ_K = 0x15        # pc += (A == k) ? jt : jf
BPF_JSET_K = 0x45       # pc += (A & k) ? jt : jf
BPF_RET_K = 0x06        # return k (bytes to keep; 0 = drop)
ACCEPT = 0xFFFFFFFF
REJECT = 0

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

Insn = tuple[int, int, int, int]


class _Asm:
    """A tiny classic-BPF assembler: jumps may name labels; a conditional jump further than 255
    instructions is an error (the programs below only jump over their own short blocks, and
    use the 32-bit BPF_JA for the long ones)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, Any, Any, Any]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: Any = 0, jt: Any = 0, jf: Any = 0) -> None:
        self.code.append((code, jt, jf, k))

    def assemble(self) -> list[Insn]:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            def rel(t: Any, pc: int = pc) -> int:
                return self.labels[t] - pc - 1 if isinstance(t, str) else t
            if code == BPF_JA:
                k = rel(k)
            else:
                jt, jf = rel(jt), rel(jf)
                if not (0 <= jt <= 255 and 0 <= jf <= 255):
                    raise ValueError(f"BPF jump out of range at {pc}: {jt}/{jf}")
            out.append((code, jt, jf, k & 0xFFFFFFFF))
        return out


def _words(a: ipaddress.IPv6Address) -> tuple[int, ...]:
    return struct.unpack("!4I", a.packed)


def _v6_equal(a: _Asm, off: int, addr: ipaddress.IPv6Address, ret: int) -> None:
    """if the 16 bytes at off == addr: return ret; else fall through (9 instructions)."""
    w = _words(addr)
    for i in range(4):
        a.op(BPF_LD_W_ABS, off + 4 * i)
        a.op(BPF_JEQ_K, w[i], 0, 7 - 2 * i)
    a.op(BPF_RET_K, ret)


BPF_MAXINSNS = 4096


def build_filter(vips: Iterable[IPAddress], replies: Iterable[ReplyPath],
                 local: Iterable[IPAddress] = ()) -> list[Insn]:
    """The socket filter of one link, as (code, jt, jf, k) instructions.

    Accepted: Ethernet frames (no VLAN tag) carrying IPv4/IPv6 packets to one of ``vips`` (any
    protocol: the pipeline also translates ICMP errors for a VIP), ARP requests for an IPv4 VIP
    (the data plane answers them), or a TCP/UDP packet from one
    of ``replies`` (backend address, protocol, source port; IPv6 without extension headers) to
    an address that is not in ``local`` (the gateway's own: its health checks are the kernel's).
    A client-side socket gets only VIPs, a backend-side one only replies, one socket on a shared
    link both. Everything else stays with the kernel alone.

    A config too big for one program (BPF_MAXINSNS) gets a coarser reply test: protocol and
    source port only, whatever the address. The pipeline then drops what is no reply of a
    tracked flow (counted ``no_vip``), and the kernel still handles those frames as before.
    """
    vips = list(dict.fromkeys(vips))
    replies = list(dict.fromkeys(replies))
    local = list(dict.fromkeys(local))
    prog = _build(vips, replies, local, coarse=False)
    if len(prog) > BPF_MAXINSNS:
        prog = _build(vips, replies, local, coarse=True)
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"socket filter of {len(prog)} instructions (max {BPF_MAXINSNS}): "
                         "too many VIPs for mode rawsock")
    return prog


def _build(vips: list[IPAddress], replies: list[ReplyPath], local: list[IPAddress],
           coarse: bool) -> list[Insn]:
    if coarse:   # one test per (family, protocol, port): the address matches anything
        replies = list(dict.fromkeys(
            ReplyPath(ipaddress.ip_address(0) if r.address.version == 4
                      else ipaddress.IPv6Address(0), r.proto, r.port) for r in replies))
    a = _Asm()
    a.op(BPF_LD_H_ABS, 12)
    a.op(BPF_JEQ_K, ETH_P_IP, 0, 1)
    a.op(BPF_JA, "v4")
    a.op(BPF_JEQ_K, ETH_P_IPV6, 0, 1)
    a.op(BPF_JA, "v6")
    v4 = [v for v in vips if v.version == 4]
    if v4:
        a.op(BPF_JEQ_K, ETH_P_ARP, 0, 1)
        a.op(BPF_JA, "arp")
    a.op(BPF_RET_K, REJECT)

    if v4:
        # ARP requests for a VIP: the data plane answers them (the kernel cannot: the VIP is
        # not a local address, and its blackhole route is no unicast route to proxy for)
        a.label("arp")
        a.op(BPF_LD_H_ABS, 14 + 6)                  # operation
        a.op(BPF_JEQ_K, 1, 1, 0)
        a.op(BPF_RET_K, REJECT)
        a.op(BPF_LD_W_ABS, 14 + 24)                 # target protocol address
        for v in v4:
            a.op(BPF_JEQ_K, int(v), 0, 1)
            a.op(BPF_RET_K, ACCEPT)
        a.op(BPF_RET_K, REJECT)

    a.label("v4")
    if v4:
        a.op(BPF_LD_W_ABS, 14 + 16)                 # destination
        for v in v4:
            a.op(BPF_JEQ_K, int(v), 0, 1)
            a.op(BPF_RET_K, ACCEPT)
    r4 = [r for r in replies if r.address.version == 4]
    if r4:
        a.op(BPF_LD_W_ABS, 14 + 16)
        for addr in (x for x in local if x.version == 4):
            a.op(BPF_JEQ_K, int(addr), 0, 1)
            a.op(BPF_RET_K, REJECT)
        a.op(BPF_LD_H_ABS, 14 + 6)                  # flags + fragment offset
        a.op(BPF_JSET_K, 0x1FFF, 0, 1)              # a later fragment has no ports
        a.op(BPF_RET_K, REJECT)
        a.op(BPF_LDX_B_MSH, 14)
        for r in r4:
            if not coarse:
                a.op(BPF_LD_W_ABS, 14 + 12)         # source
                a.op(BPF_JEQ_K, int(r.address), 0, 5)
            a.op(BPF_LD_B_ABS, 14 + 9)              # protocol
            a.op(BPF_JEQ_K, r.proto, 0, 3)
            a.op(BPF_LD_H_IND, 14)                  # source port
            a.op(BPF_JEQ_K, r.port, 0, 1)
            a.op(BPF_RET_K, ACCEPT)
    a.op(BPF_RET_K, REJECT)

    a.label("v6")
    for v in vips:
        if v.version == 6:
            _v6_equal(a, 14 + 24, v, ACCEPT)
    r6 = [r for r in replies if r.address.version == 6]
    if r6:
        for addr in local:
            if addr.version == 6:
                _v6_equal(a, 14 + 24, addr, REJECT)
        for r in r6:
            w = _words(r.address)
            for i in range(4 if not coarse else 0):
                a.op(BPF_LD_W_ABS, 14 + 8 + 4 * i)  # source
                a.op(BPF_JEQ_K, w[i], 0, 11 - 2 * i)
            a.op(BPF_LD_B_ABS, 14 + 6)              # next header
            a.op(BPF_JEQ_K, r.proto, 0, 3)
            a.op(BPF_LD_H_ABS, 14 + 40)             # source port
            a.op(BPF_JEQ_K, r.port, 0, 1)
            a.op(BPF_RET_K, ACCEPT)
    a.op(BPF_RET_K, REJECT)
    return a.assemble()


# --------------------------------------------------------------------------- L2

NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80   # reachable stale delay probe noarp perm.
RTN_UNICAST = 1
REFRESH_S = 1.0          # re-read the kernel's tables at least this often
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
    """The next hop of ``dst`` leaving on ``link`` by longest prefix (what the C lookup does):
    the route's gateway, ``dst`` itself on-link, or None without a route."""
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
                 on_tick: Any = None) -> None:
        self.dp = dp
        self.on_tick = on_tick
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
        for r in netconf.routes():
            if r.oif in self.links and r.type == RTN_UNICAST:
                net = r.dst if r.dst != "default" else (
                    "::/0" if r.family == socket.AF_INET6 else "0.0.0.0/0")
                routes.append((self.links.index(r.oif), net, r.gateway))
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
        key = (tuple(macs), tuple(sorted(routes, key=str)), tuple(sorted(neigh)))
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
        """Refresh on every rtnetlink change and every REFRESH_S seconds, in a thread of its
        own, until stop()."""
        self._stop.clear()
        self._notifier = netconf.change_notifier()
        self._thread = threading.Thread(target=self._run, name="lbcore-l2", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            ready, _, _ = select.select([self._notifier], [], [], MISS_CHECK_S)
            try:
                if ready:
                    netconf.drain_notifier(self._notifier)
                if ready or time.monotonic() - self.refreshed_at >= REFRESH_S:
                    self.refresh()
                    if self.on_tick is not None:
                        self.on_tick()
                else:
                    self.resolve_missing()
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


# --------------------------------------------------------------------------- the plane

RTPROT_LBCORE = 0xF4     # route protocol of our blackhole routes: a crashed run's are found
RTN_BLACKHOLE = 6
BLOCK_SIZE = 1 << 18     # bytes: a whole 64 KiB GSO packet fits in a block
BLOCK_NR = 64            # 16 MiB of receive ring per socket


class RawsockPlane:
    """Mode rawsock's data-plane back end for Daemon.serve: setup(), run_worker(i) in each
    worker thread, update() on reload, undo() on exit (also after a failed setup)."""

    def __init__(self, config: Any, dp: Any, vips: Sequence[IPAddress],
                 replies: Sequence[ReplyPath]) -> None:
        rs = config.rawsock
        if rs is None:
            raise ValueError('mode "rawsock" needs a [rawsock] table')
        self.dp = dp
        self.workers = config.workers
        self.client_link = rs.client_link
        self.backend_link = rs.backend_link
        self.links = list(dict.fromkeys([rs.client_link, rs.backend_link]))
        self.vips: list[IPAddress] = []
        self.replies: list[ReplyPath] = []
        self._want_vips = list(dict.fromkeys(vips))
        self._want_replies = list(dict.fromkeys(replies))
        self.socks: list[list[Any]] = []
        self.resolver = L2Resolver(dp, self.links, len(self.links) - 1, self._check_rings)
        self.ring_drops = 0
        self._drops_logged_at = 0.0
        self._changes = netconf.NetChanges()
        self._rules = ReplyRules()
        self._reply_tables: set[int] = set()

    # -- lifecycle -------------------------------------------------------------

    def setup(self) -> None:
        """Kernel routes/rules, the L2 table, the sockets; or undo what was done and raise."""
        try:
            ReplyRules.remove_stale()
            self._remove_stale_routes()
            ifindex = []
            for name in self.links:
                idx = netconf.link_index(name)
                if idx is None:
                    raise OSError(errno.ENODEV, f"rawsock link {name!r} does not exist")
                ifindex.append(idx)
                netconf.link_set(name, state="up")
            self.set_vips(self._want_vips)
            self.set_replies(self._want_replies)
            self.resolver.refresh()
            self._open_sockets(ifindex)
            self.resolver.start()
            log.info("rawsock: %s, %d worker(s), %d socket(s) of %d KiB ring each",
                     " + ".join(self.links), self.workers, sum(map(len, self.socks)),
                     BLOCK_SIZE * BLOCK_NR // 1024)
        except BaseException:
            self.undo()
            raise

    def run_worker(self, i: int) -> None:
        self.dp.run_rawsock_worker(i, self.socks[i])

    def _check_rings(self) -> None:
        """Sum the frames the receive rings dropped (full: the workers fell behind); warn at
        most every 10 s while it goes on."""
        drops = 0
        for socks in self.socks:
            for s in socks:
                drops += s.ring_stats()[1]
        if drops:
            self.ring_drops += drops
            now = time.monotonic()
            if now - self._drops_logged_at >= 10.0:
                self._drops_logged_at = now
                log.warning("receive rings full: %d frame(s) dropped so far (workers behind)",
                            self.ring_drops)

    def undo(self) -> None:
        """Close the sockets, revert routes, rules and sysctls; never raises. The workers must
        have stopped (Daemon stops them first)."""
        self.resolver.stop()
        for socks in self.socks:
            for s in socks:
                s.close()
        self.socks = []
        self._rules.clear()
        self.replies = []
        self.vips = []
        for failure in self._changes.undo():
            log.debug("undo: %s", failure)

    # -- pieces ----------------------------------------------------------------

    def _filters(self) -> list[list[Insn]]:
        local = [ipaddress.ip_interface(a).ip for _, a in netconf.addresses()]
        if len(self.links) == 1:
            return [build_filter(self.vips, self.replies, local)]
        return [build_filter(self.vips, ()), build_filter((), self.replies, local)]

    def _open_sockets(self, ifindex: list[int]) -> None:
        filters = self._filters()
        # one fanout group per link and process (ids are per namespace)
        fanout = [((os.getpid() << 1) + j) % 0xFFFF + 1 for j in range(len(self.links))]
        for _ in range(self.workers):
            self.socks.append([_core.RawSocket(ifindex[j], fanout[j], filters[j], BLOCK_SIZE,
                                               BLOCK_NR, True)
                               for j in range(len(self.links))])

    def _refilter(self) -> None:
        if not self.socks:
            return
        filters = self._filters()
        for socks in self.socks:
            for s, f in zip(socks, filters, strict=True):
                s.set_filter(f)

    def set_vips(self, vips: Iterable[IPAddress]) -> None:
        """Make the VIPs exactly ``vips``: blackhole routes (the kernel drops its copy of their
        traffic silently), IPv6 proxy NDP on the client link, the socket filters."""
        want = list(dict.fromkeys(vips))
        ch = self._changes
        for vip in self.vips:
            if vip not in want:
                netconf.route_del(_host(vip), family=_af(vip))
                if vip.version == 6:
                    netconf.neigh_proxy_del(self.client_link, str(vip))
        for vip in want:
            if vip in self.vips:
                continue
            netconf.route_add(_host(vip), type="blackhole", family=_af(vip), changes=ch,
                              proto=RTPROT_LBCORE)
            if vip.version == 6:
                link = self.client_link
                netconf.sysctl_set(f"net/ipv6/conf/{link}/forwarding", 1, changes=ch)
                netconf.sysctl_set(f"net/ipv6/conf/{link}/proxy_ndp", 1, changes=ch)
                netconf.sysctl_set(f"net/ipv6/neigh/{link}/proxy_delay", 0, changes=ch)
                netconf.neigh_proxy_add(link, str(vip), changes=ch)
        self.vips = want
        self._refilter()

    def set_replies(self, replies: Iterable[ReplyPath]) -> None:
        """Make the reply rules exactly ``replies`` (the kernel drops its copy of a backend's
        reply through table RULE_TABLE's blackhole default), and the socket filters."""
        want = list(dict.fromkeys(replies))
        for fam in sorted({r.address.version for r in want} - self._reply_tables):
            netconf.route_add("0.0.0.0/0" if fam == 4 else "::/0", table=RULE_TABLE,
                              type="blackhole", changes=self._changes, proto=RTPROT_LBCORE)
            self._reply_tables.add(fam)
        self.replies = self._rules.set(want)
        self.resolver.wanted = list(dict.fromkeys(r.address for r in want))
        self._refilter()

    def update(self, vips: Iterable[IPAddress], replies: Iterable[ReplyPath]) -> None:
        """A reload: new VIPs and reply paths."""
        self.set_vips(vips)
        self.set_replies(replies)

    @staticmethod
    def _remove_stale_routes() -> None:
        """Blackhole routes of an earlier run that was SIGKILLed (routes outlive it); a VIP
        that is no longer configured must not stay unreachable from the gateway."""
        for r in netconf.routes(table=None):
            if r.proto == RTPROT_LBCORE and r.type == RTN_BLACKHOLE:
                dst = r.dst if r.dst != "default" else (
                    "::/0" if r.family == socket.AF_INET6 else "0.0.0.0/0")
                netconf.route_del(dst, table=r.table, family=r.family)
                log.info("removed a stale blackhole route (%s) of an earlier run", dst)
