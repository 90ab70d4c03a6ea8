"""Per-VIP digests of the published Maglev tables, to compare gateways.

Several gateways behind ECMP keep a connection only if they pick the same backend for it, that
is if their tables are identical (same backends in the same order, same weights, same seed and
ring size). The digest is a SHA-256 over the VIP's inputs and its whole ring, built by the same
C routine the data plane's publish uses (lb_maglev_populate through ``_core.maglev_ring``), so
two gateways with equal digests send every flow of that VIP to the same backend.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from . import _core

DIGEST_CHARS = 16      # hex digits shown: 64 bits tell tables apart well enough


def vip_key(address: Any, port: int, proto: str) -> str:
    """How a VIP is named in the digest map: ``ADDR:PORT/PROTO`` (IPv6 in brackets)."""
    a = str(address)
    return f"[{a}]:{port}/{proto}" if ":" in a else f"{a}:{port}/{proto}"


def table_digests(spec: Sequence[tuple], seed: int) -> dict[str, str]:
    """VIP key -> digest, for a table spec in Dataplane.publish()'s format (a draining
    backend has weight 0 in the ring, as in the data plane). The VIP's settings are part of
    it: persistence changes what the ring is indexed with."""
    out = {}
    for address, port, proto, _stat, ring_size, backends, *rest in spec:
        settings = sorted((rest[0] or {}).items()) if rest else []
        bes = [(str(a), p, 0 if draining else w) for a, p, w, _s, draining in backends]
        h = hashlib.sha256()
        h.update(f"{vip_key(address, port, proto)} {ring_size} {seed} {bes} {settings}"
                 .encode())
        if bes:
            h.update(bytes(_core.maglev_ring(bes, ring_size, seed)))
        out[vip_key(address, port, proto)] = h.hexdigest()[:DIGEST_CHARS]
    return out
