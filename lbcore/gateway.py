"""Network set-up of the gateway in tun mode, all through pyroute2.

What tun mode needs from the kernel (DESIGN.md "Forwarding modes"):
  - the TUN device up, with a deep queue (txqueuelen 10000, BASELINE.md
    lesson 4);
  - a route for each VIP into the TUN (the balancer reads client packets);
  - the return path: replies from a backend's service port are sent into the
    TUN by a policy rule `from BACKEND ipproto P sport PORT lookup TABLE`, and
    TABLE's default route points into the TUN. The rule is that narrow on
    purpose: health-check replies to the gateway itself (local table first)
    and a backend's other traffic are routed normally, and the packets the
    balancer writes back have the VIP as source, so they never loop;
  - forwarding on, and loose reverse-path filtering on the TUN (the packets
    it emits carry client addresses that route out another link).

Everything is recorded and undone in reverse order on exit. A SIGKILLed run
leaves only policy rules and sysctls (the TUN and its routes die with the
process); `setup()` removes stale rules of our priority first, so the next
run starts clean.
"""
from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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


@dataclass
class Gateway:
    """Routes, rules and sysctls for one TUN device; undo() reverts them."""
    tun_name: str
    vips: list[IPAddress]
    replies: list[ReplyPath]
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _ipr: IPRoute | None = None

    def setup(self) -> None:
        """Apply everything, or undo what was done and raise."""
        self._ipr = IPRoute()
        try:
            self._remove_stale_rules()
            idx = self._link_index()
            self._ipr.link("set", index=idx, state="up", txqlen=TXQUEUELEN)
            families = {a.version for a in self.vips} | {r.address.version for r in self.replies}
            for fam in sorted(families):
                self._sysctl_forwarding(fam)
            self._sysctl(f"net/ipv4/conf/{self.tun_name}/rp_filter", "2")
            if 6 in families:
                # no SLAAC/DAD on the TUN: it is a packet pipe, not a host link
                self._sysctl(f"net/ipv6/conf/{self.tun_name}/accept_ra", "0")
            for vip in self.vips:
                self._route(vip, idx)
            for fam in sorted({r.address.version for r in self.replies}):
                self._default_route(fam, idx)
            for rp in self.replies:
                self._rule("add", rp)
        except BaseException:
            self.undo()
            raise

    def set_replies(self, replies: Iterable[ReplyPath]) -> list[ReplyPath]:
        """Make the reply rules exactly `replies` (used again on reload)."""
        assert self._ipr is not None
        want = list(dict.fromkeys(replies))
        for rp in self.replies:
            if rp not in want:
                self._rule("del", rp)
        for rp in want:
            if rp not in self.replies:
                self._rule("add", rp)
        self.replies = want
        return want

    def set_vips(self, vips: Iterable[IPAddress]) -> None:
        """Make the VIP routes exactly `vips` (reload)."""
        assert self._ipr is not None
        idx = self._link_index()
        want = list(dict.fromkeys(vips))
        for vip in [v for v in self.vips if v not in want]:
            with contextlib.suppress(NetlinkError):
                self._ipr.route("del", dst=_host(vip), oif=idx, family=_af(vip))
        for vip in want:
            if vip not in self.vips:
                self._route(vip, idx)
        self.vips = want

    def undo(self) -> None:
        """Revert every change in reverse order; never raises."""
        if self._ipr is not None:
            for rp in self.replies:
                with contextlib.suppress(Exception):
                    self._rule("del", rp)
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                log.debug("undo step failed: %s", e)
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    # -- helpers ------------------------------------------------------------

    def _link_index(self) -> int:
        assert self._ipr is not None
        found = self._ipr.link_lookup(ifname=self.tun_name)
        if not found:
            raise RuntimeError(f"TUN device {self.tun_name!r} does not exist")
        return found[0]

    def _route(self, vip: IPAddress, idx: int) -> None:
        assert self._ipr is not None
        self._ipr.route("replace", dst=_host(vip), oif=idx, family=_af(vip))
        # the route dies with the TUN; deleting it first is harmless either way
        self._undo.append(lambda: self._ipr.route("del", dst=_host(vip), oif=idx,
                                                  family=_af(vip)))

    def _default_route(self, fam: int, idx: int) -> None:
        assert self._ipr is not None
        af = socket.AF_INET if fam == 4 else socket.AF_INET6
        dst = "0.0.0.0/0" if fam == 4 else "::/0"
        self._ipr.route("replace", dst=dst, oif=idx, table=RULE_TABLE, family=af)
        self._undo.append(lambda: self._ipr.route("del", dst=dst, oif=idx, table=RULE_TABLE,
                                                  family=af))

    def _rule(self, verb: str, rp: ReplyPath) -> None:
        assert self._ipr is not None
        try:
            self._ipr.rule(verb, family=_af(rp.address), src=str(rp.address),
                           src_len=rp.address.max_prefixlen, ip_proto=rp.proto,
                           sport_range=f"{rp.port}:{rp.port}", table=RULE_TABLE,
                           priority=RULE_PRIORITY)
        except NetlinkError as e:
            # EEXIST on add (left by a crash), ENOENT on del: both fine
            if verb == "add" and e.code != 17 or verb == "del" and e.code != 2:
                raise

    def _remove_stale_rules(self) -> None:
        assert self._ipr is not None
        for af in (socket.AF_INET, socket.AF_INET6):
            for r in self._ipr.get_rules(family=af):
                if r.get_attr("FRA_PRIORITY") == RULE_PRIORITY and \
                        r.get_attr("FRA_TABLE") == RULE_TABLE:
                    with contextlib.suppress(NetlinkError):
                        self._ipr.rule("del", family=af, priority=RULE_PRIORITY,
                                       table=RULE_TABLE, src=r.get_attr("FRA_SRC"),
                                       src_len=r["src_len"],
                                       ip_proto=r.get_attr("FRA_IP_PROTO"),
                                       sport_range=r.get_attr("FRA_SPORT_RANGE"))
                        log.info("removed a stale reply rule from an earlier run")

    def _sysctl(self, key: str, value: str) -> None:
        old = sysctl_write(key, value)
        if old is not None and old != value:
            self._undo.append(lambda: sysctl_write(key, old))

    def _sysctl_forwarding(self, fam: int) -> None:
        if fam == 4:
            self._sysctl("net/ipv4/ip_forward", "1")
        else:
            self._sysctl("net/ipv6/conf/all/forwarding", "1")


def sysctl_write(key: str, value: str) -> str | None:
    """Write /proc/sys/KEY in this process's namespace; return the old value."""
    path = f"/proc/sys/{key}"
    try:
        with open(path) as f:
            old = f.read().strip()
    except FileNotFoundError:
        return None
    if old != value:
        with open(path, "w") as f:
            f.write(value)
    return old


def _af(a: IPAddress) -> int:
    return socket.AF_INET if a.version == 4 else socket.AF_INET6


def _host(a: IPAddress) -> str:
    return f"{a}/{a.max_prefixlen}"


def parse_ip(s: str) -> IPAddress:
    return ip_address(s)
