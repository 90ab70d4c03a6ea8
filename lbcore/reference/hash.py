"""Pure-Python mirror of ext/lb_hash.c, bit for bit.

The C core is tested against this (tests/test_hash.py), and the control plane
can use it to answer "which backend would this flow go to?" without the
compiled module. The algorithm and why it is seeded are explained in the
header of ext/lb_hash.c; the constants below must stay identical to it.
"""
from __future__ import annotations

import ipaddress

MASK64 = (1 << 64) - 1

K0 = 0x9E3779B97F4A7C15
K1 = 0xBF58476D1CE4E5B9
K2 = 0x94D049BB133111EB
K3 = 0xC2B2AE3D27D4EB4F

AF_INET = 4  # LB_AF_INET
AF_INET6 = 6  # LB_AF_INET6

FLOW_KEY_LEN = 40  # sizeof(struct lb_flow_key)


def mix(a: int, b: int) -> int:
    """lo64(a*b) ^ hi64(a*b) of the 128-bit product (lb_hash_mix)."""
    r = a * b
    return (r & MASK64) ^ (r >> 64)


def _check_seed(seed: int) -> int:
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be in [0, 2**64): {seed!r}")
    return seed


def hash_bytes(data: bytes, seed: int) -> int:
    """lb_hash_bytes(data, len(data), seed): a seeded 64-bit hash."""
    seed = _check_seed(seed)
    n = len(data)
    k0 = mix(seed ^ K0, K1)
    h = mix(seed ^ K2, K3) ^ n
    full = n - n % 16
    for i in range(0, full, 16):
        a = int.from_bytes(data[i:i + 8], "little")
        b = int.from_bytes(data[i + 8:i + 16], "little")
        h = mix(a ^ k0, b ^ h)
    if full < n:
        tail = bytes(data[full:]).ljust(16, b"\0")
        a = int.from_bytes(tail[:8], "little")
        b = int.from_bytes(tail[8:], "little")
        h = mix(a ^ k0, b ^ h)
    return mix(h ^ K1, k0 ^ K2)


def addr16(addr: str) -> tuple[int, bytes]:
    """(family, 16 bytes) of an address string; IPv4 fills the first 4 bytes.

    Raises ValueError for anything that is not an IPv4 or IPv6 address.
    """
    try:
        if "%" in addr:  # a scope id names an interface, not a flow's address
            raise ValueError(addr)
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {addr!r}") from None
    if ip.version == 4:
        return AF_INET, ip.packed + bytes(12)
    return AF_INET6, ip.packed


def flow_key(src: str, dst: str, sport: int, dport: int, proto: int) -> bytes:
    """The 40 bytes of struct lb_flow_key for a 5-tuple (ports big-endian)."""
    fs, s = addr16(src)
    fd, d = addr16(dst)
    if fs != fd:
        raise ValueError(f"address families differ: {src!r}, {dst!r}")
    for name, port in (("sport", sport), ("dport", dport)):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} out of range: {port!r}")
    if not 0 <= proto <= 0xFF:
        raise ValueError(f"proto out of range: {proto!r}")
    return (s + d + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
            + bytes([proto, fs, 0, 0]))


def hash_flow_key(key: bytes, seed: int) -> int:
    """lb_hash_flow: the hash of a 40-byte flow key."""
    if len(key) != FLOW_KEY_LEN:
        raise ValueError(f"a flow key is {FLOW_KEY_LEN} bytes, not {len(key)}")
    return hash_bytes(key, seed)


def hash_flow(src: str, dst: str, sport: int, dport: int, proto: int, seed: int) -> int:
    """Same as lbcore._core.hash_flow: the seeded hash of a 5-tuple."""
    return hash_bytes(flow_key(src, dst, sport, dport, proto), seed)
