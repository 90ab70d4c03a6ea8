"""Pure-Python mirror of ext/lb_maglev.c (Maglev, NSDI 2016, section 3.4).

populate() returns the same ring as lb_maglev_populate, slot for slot, and
pick() the same backend index as lb_maglev_pick; tests/test_maglev.py checks
both. The algorithm and the choices (identity hashing, sorting, weights) are
explained in the header of ext/lb_maglev.c; the constants must match it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from lbcore.reference.hash import MASK64, addr16, hash_bytes, hash_flow

SEED_OFFSET = 0x6D61676C65762D6F  # "maglev-o", LB_MAGLEV_SEED_OFFSET
SEED_SKIP = 0x6D61676C65762D73  # "maglev-s", LB_MAGLEV_SEED_SKIP
TURNS_MAX = 256  # LB_MAGLEV_TURNS_MAX
RING_SIZE = 65537  # LB_RING_SIZE
RING_SIZE_MAX = 16777213  # LB_RING_SIZE_MAX
MAX_BACKENDS = 65534  # LB_MAX_BACKENDS
RING_EMPTY = 0xFFFF  # LB_RING_EMPTY

Backend = tuple[str, int, int]  # (address, port, weight)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for 0 <= n < 2**32 (bases 2, 7, 61)."""
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0:
        return False
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in (2, 7, 61):
        a %= n
        if a == 0:
            continue
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def identity(addr: str, port: int) -> bytes:
    """The 19 bytes a backend is known by: family, 16 address bytes, port (BE)."""
    family, a16 = addr16(addr)
    return bytes([family]) + a16 + port.to_bytes(2, "big")


def permutation(ident: bytes, m: int, seed: int) -> tuple[int, int]:
    """(offset, skip) of a backend's preference list over m slots."""
    offset = hash_bytes(ident, seed ^ SEED_OFFSET) % m
    skip = hash_bytes(ident, seed ^ SEED_SKIP) % (m - 1) + 1
    return offset, skip


def _turns(t: int, s: int) -> int:
    v = (t + (1 << (s - 1))) >> s if s else t
    return v or 1


def turns(weights: Sequence[int], m: int) -> list[int]:
    """Turns per round for positive weights: gcd-reduced, then scaled down
    until the largest is <= TURNS_MAX and a round is <= m turns."""
    g = 0
    for w in weights:
        g = math.gcd(g, w)
    t = [w // g for w in weights]
    s = 0
    while s < 33:
        tt = [_turns(x, s) for x in t]
        if max(tt) <= 1 or (max(tt) <= TURNS_MAX and sum(tt) <= m):
            break
        s += 1
    return [_turns(x, s) for x in t]


def _validate(backends: Sequence[Backend], m: int, seed: int) -> None:
    if not (2 <= m <= RING_SIZE_MAX and is_prime(m)):
        raise ValueError(f"ring size must be a prime in [2, {RING_SIZE_MAX}]: {m}")
    if len(backends) > MAX_BACKENDS:
        raise ValueError(f"too many backends: {len(backends)} > {MAX_BACKENDS}")
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be in [0, 2**64): {seed!r}")
    for addr, port, weight in backends:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port!r}")
        if not 0 <= weight <= 0xFFFFFFFF:
            raise ValueError(f"weight must be in [0, 2**32): {weight!r}")
        addr16(addr)


def populate(backends: Sequence[Backend], m: int = RING_SIZE, seed: int = 0) -> list[int]:
    """The Maglev ring: m slots of indexes into backends, RING_EMPTY if none."""
    _validate(backends, m, seed)
    pos = [(identity(a, p), w, i) for i, (a, p, w) in enumerate(backends) if w > 0]
    if not pos:
        return [RING_EMPTY] * m
    if len(pos) == 1:
        return [pos[0][2]] * m
    pos.sort()
    tn = turns([w for _, w, _ in pos], m)
    nxt: list[int] = []
    skips: list[int] = []
    for ident, _, _ in pos:
        off, skip = permutation(ident, m, seed)
        nxt.append(off)
        skips.append(skip)
    ring = [RING_EMPTY] * m
    taken = bytearray(m)
    filled = 0
    while True:
        for j, (_, _, index) in enumerate(pos):
            c, skip = nxt[j], skips[j]
            for _ in range(tn[j]):
                while taken[c]:
                    c += skip
                    if c >= m:
                        c -= m
                taken[c] = 1
                ring[c] = index
                c += skip
                if c >= m:
                    c -= m
                filled += 1
                if filled == m:
                    return ring
            nxt[j] = c


def slot(h: int, m: int) -> int:
    """lb_maglev_slot: Lemire multiply-shift of the hash's low 32 bits."""
    return ((h & 0xFFFFFFFF) * m) >> 32


def pick(ring: Sequence[int], src: str, dst: str, sport: int, dport: int, proto: int,
         seed: int = 0) -> int | None:
    """Backend index for a flow (as lb_maglev_pick), None for an empty slot."""
    v = ring[slot(hash_flow(src, dst, sport, dport, proto, seed), len(ring))]
    return None if v == RING_EMPTY else v
