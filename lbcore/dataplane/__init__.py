"""The data planes: how packets reach the C workers and leave them, one module per mode.

Both modes run the same C pipeline (parse, flow lookup, Maglev pick, NAT) over packets that
arrive differently: mode ``tun`` (:mod:`.tun`) routes VIP traffic into a TUN device; mode
``rawsock`` (:mod:`.rawsock`) reads frames from AF_PACKET rings and keeps the kernel out with
blackhole routes. What they share - the reply-path policy rules - is :mod:`.replies`.

The daemon drives either through the :class:`Plane` protocol.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from .replies import IPAddress, ReplyPath


class Plane(Protocol):
    """A mode's back end, as the daemon drives it.

    ``setup()`` makes the devices, routes, rules and sysctls (or undoes what it did and
    raises); ``run_worker(i)`` runs worker ``i``'s C loop in the calling thread until the data
    plane is stopped; ``update()`` applies a reload's VIPs and reply paths; ``undo()`` reverts
    everything and never raises (the workers have stopped by then).
    """

    def setup(self) -> None: ...

    def run_worker(self, i: int) -> None: ...

    def update(self, vips: Sequence[IPAddress], replies: Sequence[ReplyPath]) -> None: ...

    def undo(self) -> None: ...


def make_plane(config: Any, dp: Any, vips: Sequence[IPAddress],
               replies: Sequence[ReplyPath]) -> Plane:
    """The back end of ``config.mode``; rawsock's module is imported only in that mode."""
    if config.mode == "rawsock":
        from .rawsock import RawsockPlane
        return RawsockPlane(config, dp, vips, replies)
    from .tun import TunPlane
    return TunPlane(config, dp, vips, replies)
