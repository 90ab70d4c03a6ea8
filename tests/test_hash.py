"""The seeded flow hash (ext/lb_hash.c) against its Python mirror, and the
properties the rest of the balancer relies on: seeds matter, bits avalanche,
flow keys of both families are laid out as lb_types.h says."""
from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbcore import _core
from lbcore.reference import hash as ref

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)
PORTS = st.integers(min_value=0, max_value=0xFFFF)
PROTOS = st.sampled_from([6, 17, 1, 58, 0, 255])
V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)


@st.composite
def five_tuples(draw: st.DrawFn) -> tuple[str, str, int, int, int]:
    addrs = draw(st.sampled_from([V4, V6]))
    return draw(addrs), draw(addrs), draw(PORTS), draw(PORTS), draw(PROTOS)


def _popcount(x: int) -> int:
    return bin(x).count("1")


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=200), seed=SEEDS)
def test_hash_bytes_matches_reference(data: bytes, seed: int) -> None:
    """C and Python agree bit for bit on every length (full blocks, tails)."""
    assert _core.hash_bytes(data, seed) == ref.hash_bytes(data, seed)


@pytest.mark.parametrize("n", range(0, 50))
def test_hash_bytes_every_tail_length(n: int) -> None:
    """Each tail length 0..15 over a few block counts, with a fixed seed."""
    data = bytes((i * 37 + 11) & 0xFF for i in range(n))
    for seed in (0, 1, 2**63, 2**64 - 1):
        assert _core.hash_bytes(data, seed) == ref.hash_bytes(data, seed)


@settings(max_examples=300, deadline=None)
@given(t=five_tuples(), seed=SEEDS)
def test_hash_flow_matches_reference(t: tuple[str, str, int, int, int], seed: int) -> None:
    """The unrolled 40-byte lb_hash_flow equals the generic lb_hash_bytes on
    the same key, and both equal the reference; the key bytes agree too."""
    key = _core.flow_key(*t)
    assert key == ref.flow_key(*t)
    h = _core.hash_flow(*t, seed)
    assert h == _core.hash_bytes(key, seed)
    assert h == ref.hash_flow(*t, seed)


def test_flow_key_layout_ipv4() -> None:
    """IPv4: address in the first 4 of 16 bytes, rest zero; ports big-endian;
    proto, family, then two zero pad bytes (struct lb_flow_key)."""
    key = _core.flow_key("198.18.0.1", "198.19.2.3", 0x1234, 80, 6)
    assert len(key) == 40
    assert key[0:16] == bytes([198, 18, 0, 1]) + bytes(12)
    assert key[16:32] == bytes([198, 19, 2, 3]) + bytes(12)
    assert key[32:36] == bytes([0x12, 0x34, 0x00, 80])
    assert key[36:40] == bytes([6, 4, 0, 0])


def test_flow_key_layout_ipv6() -> None:
    key = _core.flow_key("2001:db8::1", "2001:db8::ff", 443, 0xABCD, 17)
    assert key[0:16] == ipaddress.IPv6Address("2001:db8::1").packed
    assert key[16:32] == ipaddress.IPv6Address("2001:db8::ff").packed
    assert key[32:36] == bytes([0x01, 0xBB, 0xAB, 0xCD])
    assert key[36:40] == bytes([17, 6, 0, 0])


def test_family_is_part_of_the_key() -> None:
    """An IPv6 address whose first 4 bytes equal an IPv4 address (and the
    rest zero) is a different flow: the family byte tells them apart."""
    v4 = ("198.18.0.1", "198.19.0.1", 1000, 80, 6)
    v6 = ("c612:1::", "c613:1::", 1000, 80, 6)
    assert _core.flow_key(*v4)[:36] == _core.flow_key(*v6)[:36]
    assert _core.hash_flow(*v4, 0) != _core.hash_flow(*v6, 0)


@pytest.mark.parametrize("args, msg", [
    (("198.18.0.1", "2001:db8::1", 1, 2, 6), "families differ"),
    (("198.18.0.300", "198.18.0.1", 1, 2, 6), "not an IPv4 or IPv6 address"),
    (("not-an-ip", "198.18.0.1", 1, 2, 6), "not an IPv4 or IPv6 address"),
    (("198.18.0.1", "198.18.0.2", 65536, 2, 6), "sport out of range"),
    (("198.18.0.1", "198.18.0.2", 1, -1, 6), "dport out of range"),
    (("198.18.0.1", "198.18.0.2", 1, 2, 256), "proto out of range"),
])
def test_hash_flow_rejects_bad_tuples(args: tuple, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        _core.hash_flow(*args, 0)
    with pytest.raises(ValueError, match=msg):
        ref.hash_flow(*args, 0)


@pytest.mark.parametrize("addr, ok", [
    ("fe80::1%eth0", False), ("01.2.3.4", False), ("1.2.3", False), (" 1.2.3.4", False),
    ("1.2.3.4\n", False), ("1.2.3.04", False), ("\uff11.2.3.4", False), ("", False),
    ("::ffff:198.18.0.1", True), ("::", True), ("0.0.0.0", True), ("2001:DB8::1", True),
])
def test_address_parsing_agrees(addr: str, ok: bool) -> None:
    """The C core (inet_pton) and the reference (ipaddress) accept the same
    address strings and build the same key bytes."""
    if ok:
        assert _core.flow_key(addr, addr, 1, 2, 6) == ref.flow_key(addr, addr, 1, 2, 6)
        return
    for f in (_core.flow_key, ref.flow_key):
        with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
            f(addr, addr, 1, 2, 6)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_seed_out_of_range(seed: int) -> None:
    with pytest.raises(ValueError, match="seed"):
        _core.hash_bytes(b"x", seed)
    with pytest.raises(ValueError, match="seed"):
        ref.hash_bytes(b"x", seed)


def test_different_seeds_give_different_hashes() -> None:
    """2000 seeds (consecutive and random) on the same flow: no two equal;
    and the difference between two seeds is not a constant xor pattern."""
    rnd = random.Random(1)
    key = _core.flow_key("198.18.0.1", "198.19.0.1", 40000, 443, 6)
    seeds = list(range(1000)) + [rnd.getrandbits(64) for _ in range(1000)]
    assert len({_core.hash_bytes(key, s) for s in seeds}) == len(set(seeds))
    diffs = {_core.hash_flow("198.18.0.1", "198.19.0.1", p, 443, 6, 5)
             ^ _core.hash_flow("198.18.0.1", "198.19.0.1", p, 443, 6, 4)
             for p in range(100)}
    assert len(diffs) == 100


def test_avalanche() -> None:
    """Flipping one input bit flips about half of the 64 output bits.

    Over 100 random 40-byte keys x 320 bit flips: the mean number of output
    bits flipped is 32 +- 1 (its standard error is ~0.02), each input bit's
    mean is within 32 +- 4 (standard error ~0.4), and each output bit flips
    with probability 0.5 +- 0.05 (standard error ~0.003)."""
    rnd = random.Random(7)
    seed = rnd.getrandbits(64)
    per_in = [0] * 320
    per_out = [0] * 64
    samples = 100
    for _ in range(samples):
        key = bytearray(rnd.randbytes(40))
        h = _core.hash_bytes(bytes(key), seed)
        for bit in range(320):
            key[bit >> 3] ^= 1 << (bit & 7)
            d = h ^ _core.hash_bytes(bytes(key), seed)
            key[bit >> 3] ^= 1 << (bit & 7)
            per_in[bit] += _popcount(d)
            for ob in range(64):
                per_out[ob] += (d >> ob) & 1
    total = samples * 320
    assert 31.0 < sum(per_in) / total < 33.0
    assert all(28.0 < c / samples < 36.0 for c in per_in), (min(per_in), max(per_in))
    assert all(0.45 < c / total < 0.55 for c in per_out)


def test_seed_avalanche() -> None:
    """Flipping one seed bit also changes about half of the output bits."""
    rnd = random.Random(8)
    key = rnd.randbytes(40)
    flipped = []
    for _ in range(50):
        seed = rnd.getrandbits(64)
        h = _core.hash_bytes(key, seed)
        flipped += [_popcount(h ^ _core.hash_bytes(key, seed ^ (1 << b))) for b in range(64)]
    assert 30.0 < sum(flipped) / len(flipped) < 34.0
    assert min(flipped) > 8


def test_no_seed_independent_blinding() -> None:
    """A multiply-mix hash keyed only by public constants collapses when an
    input word cancels the constant (the product becomes 0 for any seed).
    Here every factor is keyed by the seed: keys whose first word equals any
    of the public constants, varying only in the second word, still all hash
    apart, and for two seeds differently."""
    rnd = random.Random(9)
    for const in (ref.K0, ref.K1, ref.K2, ref.K3, 0):
        head = const.to_bytes(8, "little")
        keys = [head + rnd.randbytes(8) + bytes(24) for _ in range(500)]
        for seed in (0, 0xDEADBEEF):
            assert len({_core.hash_bytes(k, seed) for k in keys}) == len(set(keys))


def test_low_and_high_bits_are_uniform_over_sequential_ports() -> None:
    """The flow table indexes by low bits, Maglev by the top of the low 32:
    65536 flows differing only in the source port fill 256 buckets of either
    evenly (expected 256 each, sd 16; allowed +-6 sd)."""
    lo = [0] * 256
    hi = [0] * 256
    for port in range(65536):
        h = _core.hash_flow("198.18.0.1", "198.19.0.1", port, 80, 6, 12345)
        lo[h & 0xFF] += 1
        hi[(h >> 24) & 0xFF] += 1
    assert 160 < min(lo) and max(lo) < 352
    assert 160 < min(hi) and max(hi) < 352


def test_empty_input_depends_on_seed() -> None:
    assert _core.hash_bytes(b"", 1) == ref.hash_bytes(b"", 1)
    assert _core.hash_bytes(b"", 1) != _core.hash_bytes(b"", 2)
    assert _core.hash_bytes(b"", 1) != _core.hash_bytes(b"\0", 1)
