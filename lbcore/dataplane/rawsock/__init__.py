"""Mode "rawsock": the AF_PACKET data plane's set-up (docs/rawsock.md).

The workers (ext/lb_rawsock.c) read frames from TPACKET_V2 rings on the client-facing and the
backend-facing link and send the rewritten frames with sendmmsg() on the other link. This module
prepares everything around them, in the gateway's own namespace, and undoes it on exit:

* **Sockets**: per worker one :class:`lbcore._core.RawSocket` per link, in a PACKET_FANOUT_HASH
  group per link (the workers share a link by flow hash), with a classic-BPF filter generated
  here (:func:`build_filter`): on the client link only frames to a VIP, on the backend link
  only the TCP/UDP of a backend's address (of the protocols of its VIPs) that is not addressed
  to the gateway itself (its health checks) or to a multicast/broadcast address.
* **The kernel keeps out** of what the balancer forwards. AF_PACKET gets a copy of each frame;
  the kernel's own copy must die quietly (no ICMP, no second, un-NATed forward). First, on
  each link a tc ingress filter (a direct-action classic-BPF program, :func:`build_kernel_drop`:
  the socket filter's own test) drops the kernel's copy of every frame the workers take,
  after the packet sockets got theirs and before IP, on the CPU that received it; without it
  each copy costs an input route lookup through the policy rules and a route allocated and
  freed per packet (the lab's 64-byte flood, sender-bound: 0.75x kernel forwarding without
  the filter, 0.99x with it). Set through
  netlink (pyroute2) on a clsact qdisc (added if the link has no ingress qdisc; an existing
  one is joined), removed on exit; where the kernel refuses it, the routes below do it alone
  (status "rawsock", warned). Underneath, and on their own while lbcore is not running, the
  VIPs get blackhole routes (the kernel drops a packet to a blackhole silently, before
  forwarding), and the backends' replies are steered by the same narrow policy rules as in
  tun mode (``from BACKEND ipproto P sport PORT``, priority 4242) into a table whose default
  route is a blackhole, and by the port-less rules (``from BACKEND ipproto P``, for TCP and
  UDP) that bring a backend's fragmented replies too. Health-check replies are addressed to
  the gateway, which the local table (always consulted first) delivers, and which both
  filters leave to the kernel (rebuilt when the gateway's addresses change). What the
  port-less rules take from the kernel that is no reply of any flow (the backend's own
  traffic through the gateway) the workers forward themselves, routed by the L2 table's
  routes of both links (passed). Nothing matches more than the balancer's own traffic and
  the backends' own. The rules and routes are the reply path's reservation
  (lbcore.dataplane.replies), the same as in tun mode: they stay when lbcore stops or dies.
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
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from ... import _core, netconf
from ..replies import (
    RTPROT_LBCORE,
    TCP_UDP,
    IPAddress,
    ReplyPath,
    ReplyRules,
    release_vip,
    reserve_replies,
    reserve_vip,
    set_reserved_vips,
)
from .bpf import BPF_MAXINSNS, Insn, build_filter, build_kernel_drop
from .l2 import L2Resolver

log = logging.getLogger("lbcore.rawsock")

__all__ = ["RTPROT_LBCORE", "RawsockPlane", "build_filter"]
# Receive ring slots per socket, 2 KiB each: 16384 = 32 MiB (the former V3 ring had 16 MiB, but
# packed small frames ~16 to a slot's worth). A slot holds a frame of up to 1500 bytes of IP (a
# GSO super-packet is read whole from the socket's queue instead). A worker that keeps up needs
# a batch's worth; the rest absorbs the worker's absences (descheduled on a busy CPU): 16384
# slots are ~65 ms of a one-worker 64-byte flood at 250k pps, where 8192 still lost 0.5 % of
# one on a loaded machine and a ring of 256 lost 40 %.
RING_FRAMES = 16384
# The tc ingress filter that drops the kernel's copy of what the workers take: its priority
# on the links' ingress qdisc, and its name there (`tc filter show dev LINK ingress`).
KERNEL_DROP_PREF = 0xF4
KERNEL_DROP_NAME = "lbcore-kernel-copy"
KERNEL_DROP_READ_TICKS = 5      # its drop count is read every 5th tick of the L2 resolver (5 s)


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
        self.resolver = L2Resolver(dp, self.links, len(self.links) - 1, self._tick,
                                   self._addresses_changed)
        self.ring_drops = 0
        self._drops_logged_at = 0.0
        self._changes = netconf.NetChanges()
        self._rules = ReplyRules()
        # the port-less rule for TCP and UDP: what it takes from the kernel that is no reply
        # (a backend's own traffic) the workers forward themselves (LB_PASS)
        self._rules.fragment_protos = {4: TCP_UDP, 6: TCP_UDP}
        # per link: how the kernel's own copy of the frames the workers take dies ("tc": a
        # tc ingress filter before IP; "routes": the blackhole routes and rules alone) and,
        # for "routes", why; what the filter has dropped is read every 5 s
        self.kernel_copy: dict[str, dict[str, Any]] = {}
        self._ticks = 0
        self._local: list[IPAddress] = []
        # the filters are rebuilt from a reload's thread and from the L2 resolver's (the
        # gateway's addresses changed): one at a time
        self._filter_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------

    def setup(self) -> None:
        """Kernel routes/rules, the L2 table, the sockets; or undo what was done and raise."""
        try:
            reserve_replies({r.address.version for r in self._want_replies})
            set_reserved_vips(self._want_vips)
            self._rules.adopt()
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
            self._set_kernel_drop()
            self.resolver.start()
            log.info("rawsock: %s, %d worker(s), %d socket(s) of %d KiB ring each",
                     " + ".join(self.links), self.workers, sum(map(len, self.socks)),
                     RING_FRAMES * 2)
        except BaseException:
            self.undo()
            raise

    def run_worker(self, i: int) -> None:
        self.dp.run_rawsock_worker(i, self.socks[i])

    def _tick(self) -> None:
        self._check_rings()
        # a netlink dump per link (~1 ms of Python on the workers' CPU): not every second
        self._ticks += 1
        if self._ticks % KERNEL_DROP_READ_TICKS == 0:
            self._count_kernel_drops()

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
        self._rules.paths = []      # the rules and blackholes stay: lbcore.dataplane.replies
        self.replies = []
        self.vips = []
        for failure in self._changes.undo():    # the tc filters too: the blackholes remain
            log.debug("undo: %s", failure)
        self.kernel_copy = {}

    # -- pieces ----------------------------------------------------------------

    @staticmethod
    def _local_addresses() -> list[IPAddress]:
        """The gateway's own addresses (and the broadcast addresses of its IPv4 subnets): the
        kernel delivers what is sent to them, the filters leave it to the kernel."""
        local: list[IPAddress] = []
        for _, a in netconf.addresses():
            iface = ipaddress.ip_interface(a)
            local.append(iface.ip)
            if iface.version == 4 and iface.network.prefixlen <= 30:
                local.append(iface.network.broadcast_address)   # delivered, never forwarded
        return local

    def _per_link(self) -> list[tuple[list[IPAddress], list[ReplyPath], list[IPAddress]]]:
        """(VIPs, reply paths, local addresses) of each link's filters: the client link's
        VIPs, the backend link's replies, which leave the gateway's own addresses alone; one
        link carries both."""
        if len(self.links) == 1:
            return [(self.vips, self.replies, self._local)]
        return [(self.vips, [], []), ([], self.replies, self._local)]

    def _filters(self) -> list[list[Insn]]:
        self._local = self._local_addresses()
        return [build_filter(*link) for link in self._per_link()]

    def _open_sockets(self, ifindex: list[int]) -> None:
        filters = self._filters()
        # one fanout group per link and process (ids are per namespace)
        fanout = [((os.getpid() << 1) + j) % 0xFFFF + 1 for j in range(len(self.links))]
        for _ in range(self.workers):
            self.socks.append([_core.RawSocket(ifindex[j], fanout[j], filters[j], RING_FRAMES,
                                               True)
                               for j in range(len(self.links))])

    def _refilter(self) -> None:
        with self._filter_lock:
            if not self.socks:
                return
            filters = self._filters()
            for socks in self.socks:
                for s, f in zip(socks, filters, strict=True):
                    s.set_filter(f)
            self._set_kernel_drop()

    def _addresses_changed(self) -> None:
        """After an L2 refresh (an rtnetlink change): the filters leave the gateway's own
        addresses to the kernel, so a new or removed address means new filters."""
        if self.socks and self._local_addresses() != self._local:
            log.info("rawsock: the gateway's addresses changed; filters rebuilt")
            self._refilter()

    def _set_kernel_drop(self) -> None:
        """Give every link the tc ingress filter that drops the kernel's copy of what its
        sockets take (build_kernel_drop), or replace it with the current VIPs and replies.
        Where that fails (no clsact/cls_bpf in the kernel, a foreign ingress qdisc) or the
        program would be too large, the blackhole routes and rules alone keep the kernel out,
        as before: it only costs the receiving CPU more per frame. Logged once per link."""
        for name, link in zip(self.links, self._per_link(), strict=True):
            prog = build_kernel_drop(*link)
            was = self.kernel_copy.get(name, {})
            had_tc = was.get("dropped_by") == "tc"
            try:
                if prog is None:
                    raise ValueError(f"the exact filter exceeds {BPF_MAXINSNS} instructions")
                netconf.ingress_bpf_set(name, prog, pref=KERNEL_DROP_PREF,
                                        name=KERNEL_DROP_NAME,
                                        changes=None if had_tc else self._changes)
                if not had_tc:
                    log.info("rawsock: %s: the kernel's copies die in a tc ingress filter "
                             "(%d instructions)", name, len(prog))
                self.kernel_copy[name] = {"dropped_by": "tc", "reason": None,
                                          "dropped": was.get("dropped", 0)}
            except (OSError, ValueError, NetlinkError) as e:
                if had_tc:
                    netconf.ingress_bpf_del(name, pref=KERNEL_DROP_PREF)
                if was.get("dropped_by") != "routes":
                    log.warning("rawsock: %s: no tc ingress filter (%s); the kernel's copies "
                                "die in its blackhole routes (more CPU per frame)", name, e)
                self.kernel_copy[name] = {"dropped_by": "routes", "reason": str(e),
                                          "dropped": None}

    def _count_kernel_drops(self) -> None:
        for name, k in list(self.kernel_copy.items()):
            n = netconf.ingress_drops(name) if k["dropped_by"] == "tc" else None
            if n is not None:
                k["dropped"] = n

    def status(self) -> dict[str, Any]:
        """For the status snapshot: per link, how the kernel's copies die and how many the tc
        filter dropped; the frames the receive rings had no room for."""
        return {"kernel_copy": {k: dict(v) for k, v in self.kernel_copy.items()},
                "ring_drops": self.ring_drops}

    def set_vips(self, vips: Iterable[IPAddress]) -> None:
        """Make the VIPs exactly ``vips``: blackhole routes (the kernel drops its copy of their
        traffic silently), IPv6 proxy NDP on the client link, the socket filters."""
        want = list(dict.fromkeys(vips))
        ch = self._changes
        for vip in self.vips:
            if vip not in want:
                release_vip(vip)
                if vip.version == 6:
                    netconf.neigh_proxy_del(self.client_link, str(vip))
        for vip in want:
            if vip in self.vips:
                continue
            reserve_vip(vip)
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
        reserve_replies({r.address.version for r in want})
        self.replies = self._rules.set(want)
        self.resolver.wanted = list(dict.fromkeys(r.address for r in want))
        self._refilter()

    def update(self, vips: Iterable[IPAddress], replies: Iterable[ReplyPath]) -> None:
        """A reload: new VIPs and reply paths."""
        self.set_vips(vips)
        self.set_replies(replies)
