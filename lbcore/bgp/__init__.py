"""Announcing the VIPs to the rack's router over BGP (``[bgp]``), through lbcore's own BIRD.

What is announced, and when: a VIP address (its /32 or /128) while this gateway's data plane
runs and at least one VIP on that address has a usable backend (up, not draining, weight > 0).
It is withdrawn when its last backend goes, on ``lbcore drain-gateway``, and first thing on
SIGTERM: the daemon withdraws, keeps forwarding for ``withdraw_grace`` seconds while the
router moves the flows elsewhere, and only then stops its workers. If the process dies, the
anchor device (lbcore.bgp.anchor) dies with it and BIRD withdraws within tens of ms.

The pieces: :mod:`.bird` (BIRD's config, process and control socket), :mod:`.anchor` (the
device and the announce table). :class:`Announcer` is what the daemon drives.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from ..config import BgpConfig
from ..dataplane.replies import IPAddress
from .anchor import Anchor
from .bird import ANNOUNCE_TABLE, Bird, BirdError

__all__ = ["ANNOUNCE_TABLE", "Announcer", "BirdError", "usable_addresses"]

log = logging.getLogger("lbcore.bgp")


def usable_addresses(vips: Iterable[Any]) -> dict[IPAddress, bool]:
    """VIP address -> whether any VIP on it has a usable backend (balancer VipStates)."""
    out: dict[IPAddress, bool] = {}
    for v in vips:
        ok = any(b.up and not b.draining and b.current_weight > 0
                 for b in v.backends.values())
        out[v.address] = out.get(v.address, False) or ok
    return out


class Announcer:
    """The announcements of one lbcore process; runs on the daemon's event loop.

    state: "starting" (before start() returned), "running", "drained" (drain-gateway: nothing
    announced, the anchor closed, forwarding goes on), "stopping" (SIGTERM: the same, then the
    grace period and the end)."""

    def __init__(self, bgp: BgpConfig) -> None:
        self.bgp = bgp
        self.bird = Bird(bgp)
        self.anchor = Anchor(bgp.anchor_device)
        self.state = "starting"
        self.usable: dict[IPAddress, bool] = {}

    def start(self) -> None:
        """The anchor device, then BIRD (started or adopted). Blocking: run it in a thread.
        On failure the anchor is closed again and the error raised."""
        try:
            self.anchor.create()
            self.bird.start()
        except BaseException:
            self.anchor.close()
            raise
        self.state = "running"

    def update(self, usable: dict[IPAddress, bool]) -> None:
        """Announce exactly the usable addresses (while running)."""
        self.usable = dict(usable)
        if self.state == "running":
            self.anchor.set(a for a, ok in usable.items() if ok)

    def drain(self, why: str = "drained") -> list[str]:
        """Withdraw everything and close the anchor; forwarding goes on. Returns what was
        withdrawn."""
        gone = [str(a) for a in self.anchor.routes]
        if self.state in ("running", "starting"):
            self.state = why
        try:
            self.anchor.set([])
        except OSError as e:   # the device is closed next anyway, and its routes with it
            log.warning("withdrawing routes: %s", e)
        self.anchor.close()
        log.info("gateway %s: withdrew %s", why, ", ".join(gone) or "nothing")
        return gone

    async def leave(self) -> None:
        """SIGTERM: withdraw, then keep forwarding for the grace period."""
        self.drain("stopping")
        if self.bgp.withdraw_grace > 0:
            log.info("forwarding for %.1f s more while the router moves the flows",
                     self.bgp.withdraw_grace)
            await asyncio.sleep(self.bgp.withdraw_grace)

    def stop(self) -> None:
        """The anchor (if still open), then BIRD; never raises."""
        self.anchor.close()
        try:
            self.bird.stop()
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log.warning("stopping BIRD: %s", e)

    def why(self, address: IPAddress) -> tuple[bool, str]:
        """(announced, reason) for a VIP address."""
        if address in self.anchor.routes:
            return True, "announced"
        if self.state != "running":
            return False, {"starting": "the data plane is starting",
                           "drained": "the gateway is drained (lbcore drain-gateway)",
                           "stopping": "the balancer is stopping"}.get(self.state, self.state)
        if not self.usable.get(address, False):
            return False, "no usable backend"
        return False, "not announced yet"

    def status(self) -> dict[str, Any]:
        """BGP's part of `lbcore status`: sessions (state, since, BFD) and announcements."""
        return {
            "state": self.state, "local_as": self.bgp.local_as,
            "router_id": str(self.bgp.router_id), "bfd": self.bgp.bfd,
            "anchor": self.bgp.anchor_device if self.anchor.open else None,
            "bird_pid": self.bird.pid, "bird_socket": str(self.bird.paths.socket),
            "announced": [str(a) for a in self.anchor.routes],
            "sessions": self.bird.sessions(),
        }
