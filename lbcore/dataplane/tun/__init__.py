"""Mode "tun": VIP routes into a TUN device; the C worker reads and writes IP packets on it.

The device (one queue per worker) is in :mod:`.device`, the kernel set-up around it (VIP
routes, the reply path, sysctls) in :mod:`.routes`. The device is persistent: a stop keeps it
with its routes so that the next run attaches to it (:meth:`TunPlane.open_queues`) and forwards
before it has made a single netlink change; only a clean-up removes it.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..replies import IPAddress, ReplyPath
from ..shed import SynShed, guarded_vips
from .device import attach_tun, close_tun
from .routes import TunRoutes

log = logging.getLogger("lbcore.tun")


class TunPlane:
    """Mode tun's data-plane back end (a :class:`lbcore.dataplane.Plane`)."""

    def __init__(self, config: Any, dp: Any, vips: Sequence[IPAddress],
                 replies: Sequence[ReplyPath]) -> None:
        self.config, self.dp = config, dp
        self.fds: list[int] = []
        self.adopted = False          # attached to the device a previous run left
        self.ifindex = 0
        self.shed: SynShed | None = None
        self.remove_device = False    # undo() deletes the device (clean-up, failed first start)
        self.routes = TunRoutes(config.tun_name, list(vips), list(replies))

    def open_queues(self) -> bool:
        """Attach the workers' queues (creating the device if there is none); True if the
        device was adopted, its routes and rules in place: the workers may run before
        setup()."""
        cfg = self.config
        q = attach_tun(cfg.tun_name, cfg.workers)
        self.fds, self.adopted, self.ifindex = q.fds, q.adopted, q.ifindex
        log.info("TUN %s (ifindex %d): %s, %d queue(s), offloads 0x%x", cfg.tun_name,
                 q.ifindex, "adopted" if q.adopted else "created", len(q.fds), q.offload)
        self.shed = SynShed.for_tun(self.fds[0], guarded_vips(cfg))   # before the queue
        return q.adopted

    def setup(self) -> None:
        if not self.fds:
            self.open_queues()
        try:
            self.routes.setup(adopted=self.adopted)
        except BaseException:
            self.remove_device = self.remove_device or not self.adopted
            self.undo()
            raise

    def run_worker(self, i: int) -> None:
        self.dp.run_worker(i, self.fds[i], True, on_start=lambda path, why: log.info(
            "worker %d: TUN I/O %s%s", i, path, f" ({why})" if why else ""))

    def update(self, vips: Sequence[IPAddress], replies: Sequence[ReplyPath]) -> None:
        self.routes.set_vips(vips)
        self.routes.set_replies(replies)

    def undo(self) -> None:
        """Close the queues. The device stays, with its routes and sysctls, for the next run
        (no queue attached, it drops what is routed into it: lbcore.dataplane.tun.device),
        unless remove_device: then every change is undone and the device deleted."""
        self.routes.undo(keep=not self.remove_device)
        close_tun(self.fds, remove=self.remove_device)
        self.fds = []
