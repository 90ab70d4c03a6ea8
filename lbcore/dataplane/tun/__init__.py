"""Mode "tun": VIP routes into a TUN device; the C worker reads and writes IP packets on it.

The device (one queue per worker) is in :mod:`.device`, the kernel set-up around it (VIP
routes, the reply path, sysctls) in :mod:`.routes`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..replies import IPAddress, ReplyPath
from .device import close_tun, open_tun
from .routes import TunRoutes

log = logging.getLogger("lbcore.tun")


class TunPlane:
    """Mode tun's data-plane back end (a :class:`lbcore.dataplane.Plane`)."""

    def __init__(self, config: Any, dp: Any, vips: Sequence[IPAddress],
                 replies: Sequence[ReplyPath]) -> None:
        self.config, self.dp = config, dp
        self.fds: list[int] = []
        self.routes = TunRoutes(config.tun_name, list(vips), list(replies))

    def setup(self) -> None:
        cfg = self.config
        self.fds, offload = open_tun(cfg.tun_name, cfg.workers, vnet_hdr=True)
        log.info("TUN %s: %d queue(s), offloads 0x%x", cfg.tun_name, len(self.fds), offload)
        try:
            self.routes.setup()
        except BaseException:
            close_tun(self.fds)
            self.fds = []
            raise

    def run_worker(self, i: int) -> None:
        self.dp.run_worker(i, self.fds[i], True, on_start=lambda path, why: log.info(
            "worker %d: TUN I/O %s%s", i, path, f" ({why})" if why else ""))

    def update(self, vips: Sequence[IPAddress], replies: Sequence[ReplyPath]) -> None:
        self.routes.set_vips(vips)
        self.routes.set_replies(replies)

    def undo(self) -> None:
        self.routes.undo()
        close_tun(self.fds)
        self.fds = []
