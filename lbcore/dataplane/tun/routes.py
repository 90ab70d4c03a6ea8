"""Tun mode's kernel set-up, through lbcore.netconf (pyroute2).

What tun mode needs from the kernel:
  - the TUN device up, with a deep queue (txqueuelen 10000: a burst of small packets must not
    overflow the default 500-packet queue while the worker is between reads);
  - a route for each VIP into the TUN (the balancer reads client packets);
  - the return path (lbcore.dataplane.replies): replies from a backend's service port enter
    the TUN through a narrow policy rule, all its TCP and UDP through a port-less one (for
    fragmented replies), and RULE_TABLE's default route points into the TUN (with a blackhole
    default behind it, for when the TUN is gone but the rules are not). Whatever the balancer
    writes back is routed by the main table (rule `iif TUN lookup main`, before the reply
    rules): the translated packets, and a backend's own traffic that the data plane passes
    back unchanged, which so leaves by its normal route and never loops;
  - forwarding on, and no reverse-path filtering on the TUN, or a loose one where
    conf/all/rp_filter is on (the packets it emits carry client addresses that route out
    another link), with RFC 7600's dummy IPv4 address on it, which the loose check needs.

The TUN is persistent (lbcore.dataplane.tun.device): a stop keeps it with its routes and
sysctls (undo(keep=True)), and the next run's setup(adopted=True) finds them in place, makes the
VIP routes exactly the configured ones (a VIP the new config lacks loses its route) and
re-asserts the rest with idempotent replaces. With keep=False (clean-up on exit, a failed
first start) everything is undone in reverse order, except the reply path's
reservation (lbcore.dataplane.replies): the reply rules, RULE_TABLE's blackhole default and the
VIPs' blackholes stay, so that in the gap until the next run (or after a crash: the TUN and its
routes die with the process) replies are dropped, never routed un-translated. setup() adopts
the rules it finds and reserves before it routes anything into the TUN.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ... import netconf
from ..replies import (
    RULE_TABLE,
    TCP_UDP,
    UDP_ONLY,
    IPAddress,
    ReplyPath,
    ReplyRules,
    add_pass_rules,
    host_prefix,
    prune_pass_rules,
    release_vip,
    reserve_replies,
    reserve_vip,
    set_reserved_vips,
)

log = logging.getLogger("lbcore.tun")

TXQUEUELEN = 10000
RTPROT_KERNEL = 2        # routes the kernel adds by itself (IPv6 link-local)


DUMMY_V4 = "192.0.0.8/32"  # the IPv4 dummy address (RFC 7600), for a device without one


def _all_rp_filter() -> int:
    """net.ipv4.conf.all.rp_filter (1, strict, when it cannot be read)."""
    try:
        return int(netconf.sysctl_get("net/ipv4/conf/all/rp_filter"))
    except (OSError, ValueError):
        return 1


def _tun_rp_filter(all_rp: int) -> int:
    """The TUN's own net.ipv4.conf.<tun>.rp_filter; the kernel applies the larger of it and
    conf/all. 0 where conf/all is 0: nothing written to the TUN is checked (the data plane
    alone writes it), which saves a routing lookup per packet. Otherwise the check runs
    anyway, and 2 (loose) makes it one that a passed packet - a backend's own traffic, whose
    way back is the backend's link, not the TUN - survives: its source is routable. The
    strict check would drop it, and so would any check on a device without an address,
    which is why the TUN gets DUMMY_V4 (scope host: never a packet's source)."""
    return 0 if all_rp == 0 else 2


def _fragment_protos(all_rp: int) -> dict[int, tuple[int, ...]]:
    """Per IP version, the protocols whose backends get a port-less reply rule: those whose
    fragmented replies can then be translated, and whose other traffic the data plane passes
    back to the kernel through the TUN. IPv6 has no reverse-path filter in the kernel's
    forwarding path: TCP and UDP. IPv4 TCP too, unless conf/all/rp_filter is 1 (strict): the
    port-less rule also makes the TUN the way back to a TCP backend in the kernel's eyes, so
    the strict check on a client-side link would drop the answers to the backend's own TCP
    connections through the gateway - a price too high for fragmented TCP replies, which
    IPv4 stacks rarely send (DF). UDP backends keep their rule either way (their fragmented
    replies are common; their own UDP through a strict gateway is then lost, as it always
    was)."""
    if all_rp == 1:
        log.warning("net.ipv4.conf.all.rp_filter is 1 (strict): no pass-through of IPv4 "
                    "backends' own traffic; their fragmented IPv4 TCP replies are not "
                    "translated (2, loose, allows both)")
        return {4: UDP_ONLY, 6: TCP_UDP}
    return {4: TCP_UDP, 6: TCP_UDP}


@dataclass
class TunRoutes:
    """Routes, rules and sysctls for one TUN device; undo() reverts them."""
    tun_name: str
    vips: list[IPAddress]
    replies: list[ReplyPath]
    _changes: netconf.NetChanges = field(default_factory=netconf.NetChanges)
    _rules: ReplyRules = field(default_factory=ReplyRules)
    _tables: set[int] = field(default_factory=set)   # IP versions routed into the TUN

    def setup(self, adopted: bool = False) -> None:
        """Apply everything, or undo what was done and raise. ``adopted``: the device is a
        previous run's; its routes to VIPs no longer configured go."""
        ch = self._changes
        replies, self.replies = list(dict.fromkeys(self.replies)), []
        try:
            reserve_replies({r.address.version for r in replies})
            set_reserved_vips(self.vips)
            self._rules.adopt()
            netconf.link_set(self.tun_name, state="up", txqueuelen=TXQUEUELEN)
            families = {a.version for a in self.vips} | {r.address.version for r in replies}
            if 4 in families:
                netconf.sysctl_set("net/ipv4/ip_forward", 1, changes=ch)
            if 6 in families:
                netconf.sysctl_set("net/ipv6/conf/all/forwarding", 1, changes=ch)
                # a packet pipe, not a host link: no router advertisements on it
                netconf.sysctl_set(f"net/ipv6/conf/{self.tun_name}/accept_ra", 0)
            # the reverse-path check of what the data plane writes: none, or loose (see
            # _tun_rp_filter); loose needs the TUN to have an address
            all_rp = _all_rp_filter()
            netconf.addr_add(self.tun_name, DUMMY_V4, host_scope=True, changes=ch)
            netconf.sysctl_set(f"net/ipv4/conf/{self.tun_name}/rp_filter",
                               _tun_rp_filter(all_rp))
            self._rules.fragment_protos = _fragment_protos(all_rp)
            for vip in self.vips:
                self._route(vip)
            if adopted:
                self._drop_stale_vip_routes()
            self.set_replies(replies)
        except BaseException:
            self.undo()
            raise

    def set_replies(self, replies: Iterable[ReplyPath]) -> None:
        """Make the reply rules exactly `replies` (setup and reload)."""
        want = list(dict.fromkeys(replies))
        fams = {r.address.version for r in want}
        reserve_replies(fams)
        add_pass_rules(self.tun_name, fams)       # before any port-less rule
        for fam in sorted(fams - self._tables):
            netconf.route_add("0.0.0.0/0" if fam == 4 else "::/0", oif=self.tun_name,
                              table=RULE_TABLE, changes=self._changes)
            self._tables.add(fam)
        self.replies = self._rules.set(want)
        prune_pass_rules(self.tun_name, fams)

    def set_vips(self, vips: Iterable[IPAddress]) -> None:
        """Make the VIP routes exactly `vips` (reload)."""
        want = list(dict.fromkeys(vips))
        for vip in self.vips:
            if vip not in want:
                netconf.route_del(host_prefix(vip), oif=self.tun_name)
                release_vip(vip)
        for vip in want:
            if vip not in self.vips:
                self._route(vip)
        self.vips = want

    def undo(self, keep: bool = False) -> None:
        """Revert every change in reverse order, except the reply path's reservation (rules,
        blackholes: lbcore.dataplane.replies); never raises. ``keep``: revert nothing (the
        persistent device keeps its routes, the sysctls stay for it)."""
        self._rules.paths = []
        self.replies = []
        self._tables = set()
        if keep:
            self._changes.commit()
            return
        for failure in self._changes.undo():
            log.debug("undo: %s", failure)

    def _drop_stale_vip_routes(self) -> None:
        """Host routes into the adopted device for VIPs the config no longer has (routes the
        kernel made itself, such as IPv6 link-local ones, stay)."""
        want = {host_prefix(v) for v in self.vips}
        for r in netconf.routes():
            if (r.oif == self.tun_name and r.proto != RTPROT_KERNEL
                    and r.dst.endswith(("/32", "/128")) and r.dst not in want):
                netconf.route_del(r.dst, oif=self.tun_name, family=r.family)
                log.info("removed the route of %s into %s: no longer a VIP", r.dst,
                         self.tun_name)

    def _route(self, vip: IPAddress) -> None:
        reserve_vip(vip)     # first: whenever the TUN's route is gone, the VIP's is a blackhole
        # the route also dies with the TUN; the undo is for a live device
        netconf.route_add(host_prefix(vip), oif=self.tun_name, changes=self._changes)
