"""The anchor: what ties an announcement to the life of this process's data plane.

A VIP is announced while a route ``VIP/32 dev ANCHOR table ANNOUNCE_TABLE`` exists; BIRD
learns that table and exports what it holds. ANCHOR is a TUN device that nobody reads or
writes: it exists only while this process holds its file descriptor, and the kernel deletes it
and every route through it when the last descriptor closes - on a clean exit, and just as well
when the process is SIGKILLed or crashes. BIRD hears of the deletion through netlink at once
(tens of ms), so a dead balancer's VIPs are withdrawn with no timer involved, and no liveness
check of lbcore's own can fail to run. No policy rule points at ANNOUNCE_TABLE: its routes are
signals to BIRD, never used for forwarding.

The device serves one more purpose: rack-side redundancy can track it (the lab's keepalived
has ``track_interface`` on it), so the gateway that takes the backends' replies is always one
whose balancer runs.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from .. import netconf
from ..dataplane.replies import IPAddress, af, host_prefix
from ..dataplane.tun.device import close_tun, open_tun
from .bird import ANNOUNCE_TABLE

log = logging.getLogger("lbcore.bgp")

RTPROT_STATIC = 4      # route protocol BIRD's "learn" imports (not kernel, not bird)


class Anchor:
    """The anchor device and its routes in ANNOUNCE_TABLE."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fds: list[int] = []
        self.routes: list[IPAddress] = []

    @property
    def open(self) -> bool:
        return bool(self.fds)

    def create(self) -> None:
        """Create the device (one queue, never read) and bring it up."""
        if self.fds:
            return
        self.fds, _ = open_tun(self.name, 1, vnet_hdr=False)
        try:
            netconf.link_set(self.name, state="up")
            # a signal, not a link: no addresses, no router advertisements
            netconf.sysctl_set(f"net/ipv6/conf/{self.name}/accept_ra", 0)
        except BaseException:
            self.close()
            raise

    def set(self, vips: Iterable[IPAddress]) -> None:
        """Make the announced routes exactly ``vips`` (the device must exist)."""
        want = list(dict.fromkeys(vips))
        for vip in list(self.routes):
            if vip not in want:
                netconf.route_del(host_prefix(vip), oif=self.name, table=ANNOUNCE_TABLE,
                                  family=af(vip))
                self.routes.remove(vip)
                log.info("withdrawn: %s", vip)
        for vip in want:
            if vip not in self.routes:
                netconf.route_add(host_prefix(vip), oif=self.name, table=ANNOUNCE_TABLE,
                                  family=af(vip), proto=RTPROT_STATIC)
                self.routes.append(vip)
                log.info("announced: %s", vip)

    def close(self) -> None:
        """Delete the device, and with it every route through it; never raises."""
        if self.routes:
            log.info("withdrawn: %s", ", ".join(str(v) for v in self.routes))
        close_tun(self.fds)
        self.fds = []
        self.routes = []
