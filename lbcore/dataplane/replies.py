"""The reply path, shared by both modes: which backend replies the data plane must see.

A backend answers the client directly (its default route is the gateway). The gateway steers
those replies, and only those, with one policy rule per (backend, protocol, service port):
`from BACKEND ipproto P sport PORT lookup RULE_TABLE`. The rule is that narrow on purpose:
health-check replies to the gateway itself (the local table is consulted first) and a backend's
other traffic are routed normally. What RULE_TABLE's default route does with the replies (into
the TUN, or a blackhole behind AF_PACKET) is the mode's business.

Policy rules outlive the process: a SIGKILLed run leaves them behind, and the next start
removes every rule of RULE_PRIORITY/RULE_TABLE before making its own. While they are left
behind they must not let a reply through untranslated (its source is the backend's own
address: the client would answer it with a reset), so RULE_TABLE also holds a blackhole
default at a worse metric (:func:`add_dead_end`): when a mode's own default route vanishes
with its device, the lookup ends there instead of falling through to the main table.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from .. import netconf

log = logging.getLogger("lbcore.replies")

RULE_TABLE = 4242       # routing table whose default route takes the replies
RULE_PRIORITY = 4242    # priority of the reply-path rules (before main, 32766)
DEAD_END_METRIC = 0x7FFFFFFF  # the blackhole default of RULE_TABLE: behind any live route

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


def add_dead_end(family: int, changes: netconf.NetChanges) -> None:
    """RULE_TABLE's last resort for IPv``family``: a blackhole default behind the mode's own
    default route, so that replies steered here by rules a dead process left behind are
    dropped, never forwarded untranslated. Add it before the mode's route: the undo then
    removes it last."""
    netconf.route_add("0.0.0.0/0" if family == 4 else "::/0", table=RULE_TABLE,
                      type="blackhole", priority=DEAD_END_METRIC, changes=changes)


def _rule(rp: ReplyPath, add: bool) -> None:
    fn = netconf.rule_add if add else netconf.rule_del
    fn(priority=RULE_PRIORITY, table=RULE_TABLE, src=host_prefix(rp.address), ipproto=rp.proto,
       sport=rp.port, family=af(rp.address))


def af(a: IPAddress) -> int:
    """The socket address family of an address."""
    return socket.AF_INET if a.version == 4 else socket.AF_INET6


def host_prefix(a: IPAddress) -> str:
    """The address as a host prefix (/32 or /128), as routes and rules name it."""
    return f"{a}/{a.max_prefixlen}"
