"""The reply path, shared by both modes: which backend replies the data plane must see.

A backend answers the client directly (its default route is the gateway). The gateway steers
those replies, and only those, with one policy rule per (backend, protocol, service port):
`from BACKEND ipproto P sport PORT lookup RULE_TABLE`. The rule is that narrow on purpose:
health-check replies to the gateway itself (the local table is consulted first) and a backend's
other traffic are routed normally. What RULE_TABLE's default route does with the replies (into
the TUN, or a blackhole behind AF_PACKET) is the mode's business.

Fragments. A policy rule's port selector is matched against the ports the kernel's flow
dissector finds, and it finds none in a fragment (not even in the first: it does not parse past
the IP header of a fragment), so a backend's fragmented reply would miss its port rule and be
routed un-translated (a TCP client answers that with a RST). Rules cannot test the fragment
offset either. So a backend address gets one more rule per protocol,
`from BACKEND ipproto P lookup RULE_TABLE` (a ReplyPath with port 0, :data:`FRAGMENTS`): all
its P to anything but the gateway itself goes to the data plane, which translates the
fragments of a tracked reply (the fragment cache, keyed on the first fragment's flow decision,
in any order). What is no reply of any flow (the backend's own traffic through the gateway:
its DNS queries, its updates) the data plane passes: mode tun writes it back to the TUN
unchanged, and the rule `iif TUN lookup main` (PASS_PRIORITY, before the reply rules) has
the kernel route it normally this time; it cannot come back (only the VIPs' routes lead into
the TUN, and a VIP address is never passed). Mode rawsock forwards it itself, as the kernel
would have (the route of its links that covers the destination, TTL / hop limit one less).
Which protocols get the rule is the mode's:

* mode tun: TCP and UDP, but for IPv4 UDP only where net.ipv4.conf.all.rp_filter is 1
  (strict): the port-less rule makes the TUN the way back to the backend, and the strict
  check on a client-side link would drop the answers to the backend's own TCP. Where the
  check is on, the TUN's own is loose and the TUN has an address, so that a passed packet
  (whose way back is the backend's link) leaves it (lbcore.dataplane.tun.routes);
* mode rawsock: TCP and UDP, IPv4 and IPv6. RULE_TABLE is a blackhole there, and the
  backend-side socket filter takes everything of the protocol from the backend's address
  that is not to the gateway itself (nor multicast/broadcast): the replies, whole or in
  fragments, are translated, and the rest - the backend's own traffic, which the blackhole
  keeps from the kernel - the workers route and send themselves, by the routes of the two
  links in the L2 table (none covering the destination: dropped, counted ``no_route``;
  routes through the gateway's other interfaces are not seen). Nothing is written back
  into the kernel, so rp_filter does not matter.

The same rules make the reverse-path check pass for the translated packets towards a
backend: the kernel validates a packet that leaves the TUN by looking up the way back (from
the backend to the client, with the packet's ports swapped, i.e. none for a fragment), which
the port rules lead into the TUN for whole packets, the port-less ones for fragments.

Policy rules outlive the process, and on purpose the reply path never opens: no un-translated
reply (source = the backend's own address) may leave the gateway, not while lbcore starts, not
in the gap of a restart, not after a crash, not after a clean stop. A client would answer such
a reply with a RST and lose its connection. So:

* RULE_TABLE always holds a blackhole default route with a worse metric (RESERVE_METRIC) than
  the mode's own default: while the TUN lives its route wins; when the TUN dies (a restart, a
  crash) its route vanishes with it and the blackhole drops the replies instead of the main
  table routing them (the backend retransmits; the next run translates);
* every VIP has a blackhole host route of that metric in the main table: in the gap a client's
  packet to a VIP is dropped (and retransmitted) rather than routed elsewhere or answered with
  an ICMP error;
* the rules, and these routes (route protocol RTPROT_LBCORE, so any run recognises them), stay
  when lbcore stops or dies; a start adopts the rules it finds and changes them to its config
  without a moment in which a backend's rule is missing. :func:`reserve_replies` and
  :func:`reserve_vip` are the one place such blackholes are made.

Removing all of it is an explicit act: ``lbcore cleanup`` or ``lbcore run --cleanup-on-exit``
(:func:`remove_all`), for a gateway that stops balancing for good.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .. import netconf

log = logging.getLogger("lbcore.replies")

RULE_TABLE = 4242       # routing table whose default route takes the replies
RULE_PRIORITY = 4242    # priority of the reply-path rules (before main, 32766)
RTPROT_LBCORE = 0xF4    # route protocol of lbcore's blackholes: any run finds them
RESERVE_METRIC = 4242   # their metric: worse than any route lbcore makes (0 / IPv6's 1024)
RTN_BLACKHOLE = 6

PASS_PRIORITY = RULE_PRIORITY - 1   # `iif TUN lookup main`: before the reply rules
MAIN_TABLE = 254

IPAddress = IPv4Address | IPv6Address
IPPROTO_TCP = 6
IPPROTO_UDP = 17
FRAGMENTS = 0           # a ReplyPath's port for "all of P from the address" (its fragments)
UDP_ONLY = (IPPROTO_UDP,)
TCP_UDP = (IPPROTO_TCP, IPPROTO_UDP)


@dataclass(frozen=True)
class ReplyPath:
    """One (backend, protocol, port) whose replies must enter the TUN; port FRAGMENTS: all of
    the protocol from the address, for its fragmented replies."""
    address: IPAddress
    proto: int
    port: int


class ReplyRules:
    """The policy rules `from BACKEND ipproto P sport PORT lookup RULE_TABLE`, one per
    reply path, shared by both modes; what RULE_TABLE's default route does with the
    replies (into the TUN, or a blackhole behind AF_PACKET) is the mode's business."""

    def __init__(self) -> None:
        self.paths: list[ReplyPath] = []
        # per IP version, the protocols whose backends get a port-less FRAGMENTS rule (each
        # mode sets its own: see the module docstring)
        self.fragment_protos: dict[int, tuple[int, ...]] = {4: UDP_ONLY, 6: UDP_ONLY}

    def set(self, replies: Iterable[ReplyPath]) -> list[ReplyPath]:
        """Make the rules exactly `replies` (start and reload); returns them."""
        want = with_fragments(replies, self.fragment_protos)
        for rp in list(self.paths):
            if rp not in want:
                _rule(rp, add=False)
                self.paths.remove(rp)
        for rp in want:
            if rp not in self.paths:
                _rule(rp, add=True)
                self.paths.append(rp)     # recorded at once: clear() after a failure
        self.paths = want
        return want

    def clear(self) -> None:
        """Remove every rule; never raises (the way out)."""
        for rp in self.paths:
            try:
                _rule(rp, add=False)
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("removing rule for %s failed: %s", rp, e)
        self.paths = []

    def adopt(self) -> None:
        """Take over the rules an earlier run left (they stay when lbcore stops): the next
        set() removes those the config lacks and adds only what is missing, so a backend's
        replies are never without their rule. A rule that is no reply path of ours goes."""
        for r in netconf.rules():
            if r.priority != RULE_PRIORITY or r.table != RULE_TABLE:
                continue
            rp = _as_reply_path(r)
            if rp is not None and rp not in self.paths:
                self.paths.append(rp)
                continue
            _rule_del_info(r)
            log.info("removed a stray reply rule (from %s)", r.src)

    @staticmethod
    def remove_stale() -> None:
        """Remove every reply rule (the way out of :func:`remove_all`)."""
        for r in netconf.rules():
            if r.priority == RULE_PRIORITY and r.table == RULE_TABLE:
                _rule_del_info(r)


def with_fragments(replies: Iterable[ReplyPath],
                   protos: Mapping[int, Iterable[int]] | None = None) -> list[ReplyPath]:
    """``replies`` (duplicates gone) and, after them, the FRAGMENTS path of every address
    with a reply path of a protocol in ``protos[IP version]`` (default: UDP only; mode tun
    adds TCP where its data plane's pass-through works, mode rawsock always, see the module
    docstring)."""
    protos = protos if protos is not None else {4: UDP_ONLY, 6: UDP_ONLY}
    want = list(dict.fromkeys(replies))
    frags = [ReplyPath(rp.address, rp.proto, FRAGMENTS) for rp in want
             if rp.proto in tuple(protos.get(rp.address.version, UDP_ONLY))
             and rp.port != FRAGMENTS]
    return list(dict.fromkeys(want + frags))


def _as_reply_path(r: netconf.RuleInfo) -> ReplyPath | None:
    """The ReplyPath a rule of ours stands for, or None if it is not one (a port range)."""
    try:
        net = ipaddress.ip_network(r.src or "")
        lo, _, hi = (r.sport or "").partition(":")
        if (net.prefixlen != net.max_prefixlen or r.ipproto is None
                or (hi and hi != lo) or r.dst or r.iif or r.oif or r.dport or r.fwmark):
            return None
        if not lo:      # the FRAGMENTS rule of a TCP or UDP backend
            return (ReplyPath(net.network_address, int(r.ipproto), FRAGMENTS)
                    if int(r.ipproto) in TCP_UDP else None)
        return ReplyPath(net.network_address, int(r.ipproto), int(lo))
    except ValueError:
        return None


def _rule_del_info(r: netconf.RuleInfo) -> None:
    lo, _, hi = (r.sport or "").partition(":")
    netconf.rule_del(priority=r.priority, table=r.table, src=r.src, ipproto=r.ipproto,
                     family=r.family, sport=(int(lo), int(hi or lo)) if r.sport else None)


# --------------------------------------------------------------------------- the pass rule

def _is_pass_rule(r: netconf.RuleInfo) -> bool:
    return r.priority == PASS_PRIORITY and r.table == MAIN_TABLE and bool(r.iif)


def add_pass_rules(tun: str, versions: Iterable[int]) -> None:
    """The rule `iif TUN lookup main` (priority PASS_PRIORITY, before the reply rules) for
    each IP version in ``versions``. What the data plane writes back to the TUN is routed by
    the main table: a packet it passes (a backend's own traffic, LB_PASS) goes where it was
    going instead of into RULE_TABLE again; the translated packets (source a VIP or a client)
    match no reply rule anyway. Added before any port-less reply rule (a pass without it
    would come back into the TUN), it stays like them when lbcore stops (the persistent TUN
    keeps its name and the next run its rules). Idempotent."""
    for fam in sorted({socket.AF_INET if v == 4 else socket.AF_INET6 for v in versions}):
        netconf.rule_add(priority=PASS_PRIORITY, table=MAIN_TABLE, iif=tun, family=fam)


def prune_pass_rules(tun: str, versions: Iterable[int]) -> None:
    """Remove every pass rule but those add_pass_rules(tun, versions) makes (an earlier run's
    TUN of another name, a version no longer served): after the reply rules are set, so that
    no port-less rule is ever without its pass rule."""
    want = {socket.AF_INET if v == 4 else socket.AF_INET6 for v in versions}
    for r in netconf.rules():
        if _is_pass_rule(r) and (r.iif != tun or r.family not in want):
            _pass_rule_del(r)
            log.info("removed a stale pass rule (iif %s)", r.iif)


def _pass_rule_del(r: netconf.RuleInfo) -> None:
    netconf.rule_del(priority=r.priority, table=r.table, iif=r.iif, family=r.family)


# --------------------------------------------------------------------------- the reservation

def _default(version: int) -> str:
    return "0.0.0.0/0" if version == 4 else "::/0"


_RESERVE = {"type": "blackhole", "proto": RTPROT_LBCORE, "priority": RESERVE_METRIC}


def reserve_replies(versions: Iterable[int]) -> None:
    """The blackhole default route of RULE_TABLE for each IP version (4, 6): what takes the
    backends' replies whenever no data plane does. Idempotent; stays when lbcore stops."""
    for v in sorted(set(versions)):
        netconf.route_add(_default(v), table=RULE_TABLE,
                          family=socket.AF_INET if v == 4 else socket.AF_INET6, **_RESERVE)


def reserve_vip(vip: IPAddress) -> None:
    """The blackhole host route of a VIP in the main table (behind the data plane's own
    route, if any): in a restart's gap the VIP's packets are dropped, not routed elsewhere or
    answered with ICMP. Idempotent; stays when lbcore stops."""
    netconf.route_add(host_prefix(vip), family=af(vip), **_RESERVE)


def release_vip(vip: IPAddress) -> None:
    """Remove a VIP's blackhole (it left the config: the gateway routes it normally again)."""
    netconf.route_del(host_prefix(vip), family=af(vip), **_RESERVE)


def _vip_blackholes() -> list[tuple[IPAddress, netconf.RouteInfo]]:
    """lbcore's VIP blackholes in place (an earlier run's included, whatever their metric)."""
    out = []
    for r in netconf.routes():
        if r.proto == RTPROT_LBCORE and r.type == RTN_BLACKHOLE and r.dst != "default":
            net = ipaddress.ip_network(r.dst)
            if net.prefixlen == net.max_prefixlen:
                out.append((net.network_address, r))
    return out


def set_reserved_vips(vips: Iterable[IPAddress]) -> None:
    """Exactly ``vips`` have blackholes: new ones first, then the ones of VIPs gone from the
    config (an earlier run's included) are removed."""
    want = list(dict.fromkeys(vips))
    for vip in want:
        reserve_vip(vip)
    for vip, r in _vip_blackholes():
        if vip not in want:
            netconf.route_del(r.dst, family=r.family, type="blackhole", proto=RTPROT_LBCORE,
                              priority=r.priority)
            log.info("removed the blackhole of %s (no longer a VIP)", vip)


def reserved() -> bool:
    """Whether a reply path is reserved (rules or blackholes an earlier run left)."""
    return bool([r for r in netconf.rules()
                 if (r.priority == RULE_PRIORITY and r.table == RULE_TABLE) or _is_pass_rule(r)]
                or [r for r in netconf.routes(table=None) if r.proto == RTPROT_LBCORE])


def remove_all() -> int:
    """Remove every reply rule and every lbcore blackhole (``lbcore cleanup``): afterwards the
    gateway routes the backends' replies and the VIPs as if lbcore had never run. Returns how
    many rules and routes went."""
    n = 0
    for r in netconf.rules():
        if r.priority == RULE_PRIORITY and r.table == RULE_TABLE:
            _rule_del_info(r)
            n += 1
    for r in netconf.rules():       # after the reply rules: none is ever without its pass rule
        if _is_pass_rule(r):
            _pass_rule_del(r)
            n += 1
    for r in netconf.routes(table=None):
        if r.proto == RTPROT_LBCORE:
            if netconf.route_del(r.prefix, table=r.table, family=r.family, proto=RTPROT_LBCORE,
                                 type=r.type, priority=r.priority):
                n += 1
    return n


def _rule(rp: ReplyPath, add: bool) -> None:
    fn = netconf.rule_add if add else netconf.rule_del
    fn(priority=RULE_PRIORITY, table=RULE_TABLE, src=host_prefix(rp.address), ipproto=rp.proto,
       sport=rp.port if rp.port != FRAGMENTS else None, family=af(rp.address))


def af(a: IPAddress) -> int:
    """The socket address family of an address."""
    return socket.AF_INET if a.version == 4 else socket.AF_INET6


def host_prefix(a: IPAddress) -> str:
    """The address as a host prefix (/32 or /128), as routes and rules name it."""
    return f"{a}/{a.max_prefixlen}"
