"""Network set-up of the gateway in tun mode, through lbcore.netconf (pyroute2).

What tun mode needs from the kernel (DESIGN.md "Forwarding modes"):
  - the TUN device up, with a deep queue (txqueuelen 10000, BASELINE.md
    lesson 4);
  - a route for each VIP into the TUN (the balancer reads client packets);
  - the return path: replies from a backend's service port are sent into the
    TUN by a policy rule `from BACKEND ipproto P sport PORT lookup TABLE`, and
    TABLE's default route points into the TUN. The rule is that narrow on
    purpose: health-check replies to the gateway itself (the local table is
    consulted first) and a backend's other traffic are routed normally, and
    the packets the balancer writes back have the VIP as source, so they never
    loop;
  - forwarding on, and loose reverse-path filtering on the TUN (the packets
    it emits carry client addresses that route out another link).

Everything is recorded and undone in reverse order on exit. A SIGKILLed run
leaves only policy rules and sysctls behind (the TUN and its routes die with
the process); setup() removes stale rules of our priority first, so the next
run starts clean.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from . import netconf

log = logging.getLogger("lbcore.gateway")

RULE_TABLE = 4242       # routing table holding "default dev <tun>"
RULE_PRIORITY = 4242    # priority of the reply-path rules (before main, 32766)
TXQUEUELEN = 10000

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class ReplyPath:
    """One (backend, protocol, port) whose replies must enter the TUN."""
    address: IPAddress
    proto: int
    port: int


class ReplyRules:
    """The policy rules `from BACKEND ipproto P sport PORT lookup RULE_TABLE`, one per
    reply path, shared by both modes; what RULE_TABLE's default route does with the
    replies (into the TUN, or a blackhole behind AF_PACKET) is the mode's business."""

    def __init__(self) -> None:
        self.paths: list[ReplyPath] = []

    def set(self, replies: Iterable[ReplyPath]) -> list[ReplyPath]:
        """Make the rules exactly `replies` (start and reload); returns them."""
        want = list(dict.fromkeys(replies))
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

    @staticmethod
    def remove_stale() -> None:
        """Rules of an earlier run that was SIGKILLed (rules outlive the process)."""
        for r in netconf.rules():
            if r.priority == RULE_PRIORITY and r.table == RULE_TABLE:
                lo, _, hi = (r.sport or "").partition(":")
                netconf.rule_del(priority=r.priority, table=r.table, src=r.src,
                                 ipproto=r.ipproto, family=r.family,
                                 sport=(int(lo), int(hi or lo)) if r.sport else None)
                log.info("removed a stale reply rule (from %s) of an earlier run", r.src)


def _rule(rp: ReplyPath, add: bool) -> None:
    fn = netconf.rule_add if add else netconf.rule_del
    fn(priority=RULE_PRIORITY, table=RULE_TABLE, src=_host(rp.address), ipproto=rp.proto,
       sport=rp.port, family=_af(rp.address))


@dataclass
class Gateway:
    """Routes, rules and sysctls for one TUN device; undo() reverts them."""
    tun_name: str
    vips: list[IPAddress]
    replies: list[ReplyPath]
    _changes: netconf.NetChanges = field(default_factory=netconf.NetChanges)
    _rules: ReplyRules = field(default_factory=ReplyRules)

    def setup(self) -> None:
        """Apply everything, or undo what was done and raise."""
        ch = self._changes
        replies, self.replies = list(dict.fromkeys(self.replies)), []
        try:
            ReplyRules.remove_stale()
            netconf.link_set(self.tun_name, state="up", txqueuelen=TXQUEUELEN)
            families = {a.version for a in self.vips} | {r.address.version for r in replies}
            if 4 in families:
                netconf.sysctl_set("net/ipv4/ip_forward", 1, changes=ch)
            if 6 in families:
                netconf.sysctl_set("net/ipv6/conf/all/forwarding", 1, changes=ch)
                # a packet pipe, not a host link: no router advertisements on it
                netconf.sysctl_set(f"net/ipv6/conf/{self.tun_name}/accept_ra", 0)
            netconf.sysctl_set(f"net/ipv4/conf/{self.tun_name}/rp_filter", 2)
            for vip in self.vips:
                self._route(vip)
            self.set_replies(replies)
        except BaseException:
            self.undo()
            raise

    def set_replies(self, replies: Iterable[ReplyPath]) -> None:
        """Make the reply rules exactly `replies` (setup and reload)."""
        want = list(dict.fromkeys(replies))
        for fam in sorted({r.address.version for r in want}
                          - {r.address.version for r in self._rules.paths}):
            netconf.route_add("0.0.0.0/0" if fam == 4 else "::/0", oif=self.tun_name,
                              table=RULE_TABLE, changes=self._changes)
        self.replies = self._rules.set(want)

    def set_vips(self, vips: Iterable[IPAddress]) -> None:
        """Make the VIP routes exactly `vips` (reload)."""
        want = list(dict.fromkeys(vips))
        for vip in self.vips:
            if vip not in want:
                netconf.route_del(_host(vip), oif=self.tun_name)
        for vip in want:
            if vip not in self.vips:
                self._route(vip)
        self.vips = want

    def undo(self) -> None:
        """Revert every change in reverse order; never raises."""
        self._rules.clear()
        self.replies = []
        for failure in self._changes.undo():
            log.debug("undo: %s", failure)

    def _route(self, vip: IPAddress) -> None:
        # the route also dies with the TUN; the undo is for a live device
        netconf.route_add(_host(vip), oif=self.tun_name, changes=self._changes)


def _af(a: IPAddress) -> int:
    return socket.AF_INET if a.version == 4 else socket.AF_INET6


def _host(a: IPAddress) -> str:
    return f"{a}/{a.max_prefixlen}"
