"""Maglev tables (ext/lb_maglev.c, NSDI 2016 section 3.4): the C ring equals
the Python reference slot for slot, and both have the properties the balancer
relies on: balance, weights, order independence, bounded disruption."""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbcore import _core
from lbcore.reference import maglev as ref

M = 65537
Backend = tuple[str, int, int]
RingFn = Callable[..., list[int]]


def _core_ring(backends: Sequence[Backend], m: int = M, seed: int = 0) -> list[int]:
    return list(_core.maglev_ring(backends, m, seed))


IMPLS: dict[str, RingFn] = {"core": _core_ring, "reference": ref.populate}


@pytest.fixture(params=sorted(IMPLS))
def ring_of(request: pytest.FixtureRequest) -> RingFn:
    """The ring builder under test: the C core or the Python reference."""
    return IMPLS[request.param]


def pool(n: int, weight: int = 1, port: int = 8080) -> list[Backend]:
    """n distinct IPv4 backends in 198.18.0.0/15."""
    return [(f"198.18.{i // 250}.{i % 250 + 1}", port, weight) for i in range(n)]


def by_identity(ring: Sequence[int], backends: Sequence[Backend]) -> list:
    """The ring with indexes replaced by (address, port): comparable across
    different orders of the same set."""
    return [None if v == ref.RING_EMPTY else backends[v][:2] for v in ring]


# -- primes -------------------------------------------------------------------

def _sieve(n: int) -> list[bool]:
    s = [True] * (n + 1)
    s[0] = s[1] = False
    for i in range(2, int(n**0.5) + 1):
        if s[i]:
            s[i * i::i] = [False] * len(s[i * i::i])
    return s


def test_is_prime_matches_sieve() -> None:
    s = _sieve(200_000)
    assert [_core.is_prime(i) for i in range(len(s))] == s
    assert [ref.is_prime(i) for i in range(20_000)] == s[:20_000]


@pytest.mark.parametrize("n, prime", [
    (65537, True), (655373, True), (16777213, True), (4294967291, True),
    (4294967295, False), (4294967279, True), (4294967277, False),
    (561, False), (41041, False), (2047, False), (3215031751, False),  # pseudoprimes
    (1373653, False), (25326001, False), (3825123056546413051 % 2**32, False),
])
def test_is_prime_large(n: int, prime: bool) -> None:
    """Miller-Rabin bases 2, 7, 61 are exact for uint32, including strong
    pseudoprimes to small bases and numbers near 2**32."""
    assert _core.is_prime(n) is prime
    assert ref.is_prime(n) is prime


def test_is_prime_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        _core.is_prime(2**32)
    with pytest.raises(ValueError):
        _core.is_prime(-1)


# -- errors and degenerate sets -------------------------------------------------

@pytest.mark.parametrize("m", [0, 1, 4, 65536, 65535, ref.RING_SIZE_MAX + 2, 2**32 + 15])
def test_non_prime_or_out_of_range_ring_size_rejected(ring_of: RingFn, m: int) -> None:
    with pytest.raises(ValueError, match="ring size must be a prime"):
        ring_of(pool(3), m, 0)


def test_too_many_backends_rejected(ring_of: RingFn) -> None:
    too_many = [("198.18.0.1", 1, 1)] * (ref.MAX_BACKENDS + 1)
    with pytest.raises(ValueError, match="too many backends"):
        ring_of(too_many, M, 0)


@pytest.mark.parametrize("backends, msg", [
    ([("198.18.0.1", 80, -1)], "weight"),
    ([("198.18.0.1", 80, 2**32)], "weight"),
    ([("198.18.0.999", 80, 1)], "not an IPv4 or IPv6 address"),
    ([("backend-1", 80, 1)], "not an IPv4 or IPv6 address"),
    ([("198.18.0.1", 65536, 1)], "port"),
])
def test_bad_backend_rejected(ring_of: RingFn, backends: list, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ring_of(backends, M, 0)


def test_bad_backend_shape_and_seed_rejected() -> None:
    with pytest.raises(ValueError, match=r"backend 1: expected \(address, port, weight\)"):
        _core.maglev_ring([("198.18.0.1", 80, 1), ("198.18.0.2", 80)])
    with pytest.raises(ValueError, match="seed"):
        _core.maglev_ring(pool(2), M, -1)
    with pytest.raises(ValueError, match="ring size"):
        _core.MaglevTable(pool(2), 100)


def test_no_backends_every_slot_empty(ring_of: RingFn) -> None:
    assert ring_of([], 251, 0) == [ref.RING_EMPTY] * 251
    assert ring_of(pool(5, weight=0), M, 0) == [ref.RING_EMPTY] * M
    t = _core.MaglevTable([])
    assert t.pick("198.18.0.1", "198.19.0.1", 1, 80, 6) is None
    assert t.counts() == []


def test_one_backend_owns_everything(ring_of: RingFn) -> None:
    assert ring_of(pool(1), M, 0) == [0] * M
    # one of positive weight among zeros: every slot is its index
    bs = pool(5, weight=0)
    bs[3] = (bs[3][0], bs[3][1], 7)
    assert ring_of(bs, 251, 3) == [3] * 251


def test_weight_zero_takes_no_slot(ring_of: RingFn) -> None:
    bs = pool(10)
    bs[4] = (bs[4][0], bs[4][1], 0)
    counts = Counter(ring_of(bs, M, 0))
    assert 4 not in counts
    assert sorted(counts) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert set(counts.values()) <= {M // 9, M // 9 + 1}


def test_smallest_ring(ring_of: RingFn) -> None:
    """M = 2 (skip is always 1): both slots taken, by two different backends."""
    assert sorted(ring_of(pool(2), 2, 0)) == [0, 1]
    assert sorted(ring_of(pool(3), 3, 5)) == [0, 1, 2]


# -- balance and weights ----------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_equal_weights_balance_exactly(ring_of: RingFn, n: int) -> None:
    """Every round gives each backend one slot and only the last round is
    partial, so each owns floor(M/N) or ceil(M/N) slots."""
    counts = Counter(ring_of(pool(n, weight=3), M, 11))
    assert sorted(counts) == list(range(n))
    assert set(counts.values()) <= {M // n, -(-M // n)}


WEIGHT_SETS = [
    [1, 2],
    [1, 2, 3, 4],
    [5, 1, 1, 1, 1, 1],
    [1, 10, 100],
    [100, 200, 300, 400, 500],
    [7, 13, 255, 256, 1, 2, 3],
    [random.Random(3).randint(1, 50) for _ in range(40)],
]


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}w-{sum(w)}")
def test_unequal_weights_proportional(ring_of: RingFn, weights: list[int]) -> None:
    """Backend i's share is M * w_i / sum(w) within 1% of M; with weights
    that need no scaling (gcd-reduced max <= 256 and sum <= M) it is even
    within w_i/gcd slots, the documented bound of one partial round."""
    bs = [(f"198.18.1.{i + 1}", 80, w) for i, w in enumerate(weights)]
    counts = Counter(ring_of(bs, M, 2))
    total = sum(weights)
    g = 0
    for w in weights:
        g = _gcd(g, w)
    for i, w in enumerate(weights):
        exact = M * w / total
        assert abs(counts[i] - exact) <= 0.01 * M
        assert abs(counts[i] - exact) <= w // g
    assert sum(counts.values()) == M


def test_huge_weights_are_scaled_not_overflowed(ring_of: RingFn) -> None:
    """A weight of 2**32-1 beside small ones: the ring is still full and the
    light backends keep at least their round's one slot each."""
    bs = [("198.18.0.1", 80, 2**32 - 1), ("198.18.0.2", 80, 1), ("198.18.0.3", 80, 1000)]
    counts = Counter(ring_of(bs, M, 0))
    assert sum(counts.values()) == M
    assert counts[0] > 0.99 * M
    assert counts[1] >= 1 and counts[2] >= 1


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def test_many_weighted_backends_round_capped() -> None:
    """1000 backends with weights up to 256: one round would be ~128k turns,
    longer than M; weights are scaled so a round fits, and shares stay
    within 1% of M of proportional."""
    rnd = random.Random(4)
    weights = [rnd.randint(1, 256) for _ in range(1000)]
    bs = [(f"198.18.{i // 250}.{i % 250 + 1}", 80, w) for i, w in enumerate(weights)]
    ring = _core_ring(bs)
    assert ring == ref.populate(bs, M, 0)
    counts = Counter(ring)
    total = sum(weights)
    assert sum(counts.values()) == M
    worst = max(abs(counts[i] - M * w / total) for i, w in enumerate(weights))
    assert worst <= 0.01 * M


# -- determinism ---------------------------------------------------------------------

def test_same_set_any_order_same_ring(ring_of: RingFn) -> None:
    """Offsets and skips come from identities, not positions: every order of
    the same set gives the same ring, after mapping indexes to identities."""
    bs = pool(50) + [("2001:db8::1", 443, 3), ("2001:db8::2", 443, 0)]
    base = by_identity(ring_of(bs, M, 9), bs)
    rnd = random.Random(5)
    for _ in range(3):
        shuffled = bs[:]
        rnd.shuffle(shuffled)
        assert by_identity(ring_of(shuffled, M, 9), shuffled) == base
    assert by_identity(ring_of(bs, M, 9), bs) == base


def test_duplicate_identities_are_deterministic(ring_of: RingFn) -> None:
    """Two entries for the same (address, port) with the same weight are
    indistinguishable, so the ring by identity does not depend on their order;
    with different weights the (identity, weight) order still fixes it."""
    bs = [("198.18.0.1", 80, 1), ("198.18.0.2", 80, 1), ("198.18.0.1", 80, 1),
          ("198.18.0.3", 80, 2), ("198.18.0.3", 80, 1)]
    base = [None if v == ref.RING_EMPTY else bs[v] for v in ring_of(bs, 251, 1)]
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        sh = [bs[i] for i in perm]
        assert [sh[v] for v in ring_of(sh, 251, 1)] == base


def test_seed_changes_the_ring() -> None:
    bs = pool(10)
    a, b = _core_ring(bs, M, 1), _core_ring(bs, M, 2)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > M // 2


def test_table_matches_ring_and_is_read_only() -> None:
    bs = pool(7)
    t = _core.MaglevTable(bs, 251, 77)
    assert list(t.ring) == _core_ring(bs, 251, 77)
    assert t.ring_size == len(t) == 251 and t.n_backends == 7 and t.seed == 77
    assert t.ring.readonly
    assert sum(t.counts()) == 251
    assert t.counts() == [Counter(t.ring)[i] for i in range(7)]


# -- C == reference --------------------------------------------------------------------

REF_SETS = {
    "3-equal": pool(3),
    "10-weighted": [(f"198.18.0.{i + 1}", 80, i % 4 + 1) for i in range(10)],
    "ipv6-mixed-ports": [(f"2001:db8::{i:x}", 443 + i % 3, 1 + i % 2) for i in range(1, 20)],
    "ties-and-zeros": [("198.18.0.1", 80, 2), ("198.18.0.1", 80, 2), ("198.18.0.1", 81, 1),
                       ("198.18.0.2", 80, 0), ("2001:db8::1", 80, 5)],
    "200-equal": pool(200),
}


@pytest.mark.parametrize("name", sorted(REF_SETS))
@pytest.mark.parametrize("m", [M, 251, 13])
def test_core_equals_reference_slot_for_slot(name: str, m: int) -> None:
    bs = REF_SETS[name]
    for seed in (0, 0xFEEDFACECAFEBEEF):
        assert _core_ring(bs, m, seed) == ref.populate(bs, m, seed)


@st.composite
def backend_sets(draw: st.DrawFn) -> list[Backend]:
    addrs = ["198.18.0.1", "198.18.0.2", "198.19.255.254", "2001:db8::1", "2001:db8::a"]
    n = draw(st.integers(0, 12))
    return [(draw(st.sampled_from(addrs)), draw(st.sampled_from([80, 443, 8080])),
             draw(st.integers(0, 6))) for _ in range(n)]


@settings(max_examples=200, deadline=None)
@given(bs=backend_sets(), m=st.sampled_from([2, 3, 5, 7, 11, 13, 101, 251, 1021]),
       seed=st.integers(0, 2**64 - 1))
def test_core_equals_reference_property(bs: list[Backend], m: int, seed: int) -> None:
    assert _core_ring(bs, m, seed) == ref.populate(bs, m, seed)


def test_pick_core_equals_reference() -> None:
    """MaglevTable.pick (lb_maglev_pick in C) == ring[slot(hash_flow)] in
    Python, for IPv4 and IPv6 flows."""
    rnd = random.Random(6)
    bs = pool(30) + [(f"2001:db8::{i + 1:x}", 80, 2) for i in range(5)]
    seed = rnd.getrandbits(64)
    t = _core.MaglevTable(bs, M, seed)
    ring = list(t.ring)
    for i in range(2000):
        if i % 2:
            src = f"2001:db8:1::{rnd.getrandbits(16):x}"
            dst = "2001:db8:ffff::1"
        else:
            src = f"198.18.{rnd.randrange(256)}.{rnd.randrange(256)}"
            dst = "198.19.0.1"
        args = (src, dst, rnd.randrange(65536), 80, rnd.choice([6, 17]))
        got = t.pick(*args)
        assert got == ref.pick(ring, *args, seed=seed)
        assert got == ring[ref.slot(_core.hash_flow(*args, seed), M)]


def test_pick_spreads_flows_like_the_ring() -> None:
    """20000 flows over 4 equal backends: each gets about a quarter (the slot
    map is uniform; allowed +-5% absolute)."""
    t = _core.MaglevTable(pool(4))
    c = Counter(t.pick("198.18.9.9", "198.19.0.1", p, 80, 6) for p in range(20000))
    assert all(abs(v / 20000 - 0.25) < 0.05 for v in c.values()) and len(c) == 4


# -- disruption ---------------------------------------------------------------------------

REMOVE_BOUND = 0.015  # of M, see test_remove_one_backend_disruption


def _moved(before: list[int], after: list[int], skip: int | None = None) -> int:
    return sum(1 for x, y in zip(before, after, strict=True) if x != y and x != skip)


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_remove_one_backend_disruption(n: int) -> None:
    """Removing 1 of N backends at M = 65537.

    All of its slots move, to survivors, and survivors stay balanced
    (floor/ceil of M/(N-1)). Ideal consistent hashing would move nothing
    else; Maglev (NSDI 2016, section 3.4) trades a little extra churn for
    perfect balance and says so: disruption is small but not zero. The churn
    comes from the round-robin fill: with the removed backend's slots free,
    some survivor's walk along its preference list stops earlier in some
    round, which shifts that survivor's later claims, and those displace a
    few others in turn. These cascades happen where walks are long, in the
    last rounds when the table is nearly full; measured, their count grows
    with M (sublinearly) and is roughly flat in N once N >= 100, so the
    bound is a fraction of M (for contrast, hash-mod-N moves (N-1)/N of all).

    Measured with this test (seed 0, 3 removed backends per N; slots moved
    between survivors): N=10 127-145 (0.19-0.22% of M), N=100 344-400
    (0.52-0.61%), N=1000 358-398 (0.55-0.61%); the worst in a wider sweep
    (seeds 0..3, 10 removals each) was 0.63% of M.
    (At M=655373 it is smaller, 0.06-0.34%: a larger table ends with fewer
    contested slots relative to M.) Asserted: <= 1.5% of M, ~2.4x the worst
    measured: room for seed-to-seed variation, yet an order- or
    position-dependent permutation (which moves most slots) fails at once.
    The figures are printed, for quoting (pytest -s).
    """
    bs = pool(n)
    before = _core_ring(bs, M, 0)
    worst = 0
    for k in random.Random(n).sample(range(n), 3):
        rest = bs[:k] + bs[k + 1:]
        after = [v if v < k else v + 1 for v in _core_ring(rest, M, 0)]
        own = before.count(k)
        assert k not in after
        counts = Counter(after)
        assert set(counts.values()) <= {M // (n - 1), -(-M // (n - 1))}
        moved = _moved(before, after, skip=k)
        worst = max(worst, moved)
        print(f"maglev remove 1 of N={n} M={M}: its {own} slots moved; "
              f"{moved} slots ({100 * moved / M:.2f}% of M) moved between survivors")
    assert worst <= REMOVE_BOUND * M


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_add_one_backend_disruption(n: int) -> None:
    """Adding a backend: it takes floor/ceil(M/(N+1)) slots, and the churn
    among the old backends has the same cause and bound as for a removal
    (measured at seed 0: 0.2-0.6% of M)."""
    bs = pool(n)
    before = _core_ring(bs, M, 0)
    after = _core_ring(bs + [("198.19.200.1", 8080, 1)], M, 0)
    new = after.count(n)
    assert new in (M // (n + 1), -(-M // (n + 1)))
    moved = sum(1 for x, y in zip(before, after, strict=True) if y != n and x != y)
    print(f"maglev add 1 to N={n} M={M}: new backend takes {new} slots; "
          f"{moved} slots ({100 * moved / M:.2f}% of M) moved between old backends")
    assert moved <= REMOVE_BOUND * M


def test_draining_is_weight_zero_and_keeps_others() -> None:
    """The caller drains by passing weight 0: same effect as removal (the
    identity of the others and their order are unchanged)."""
    bs = pool(20)
    drained = bs[:]
    drained[7] = (bs[7][0], bs[7][1], 0)
    removed = bs[:7] + bs[8:]
    a = by_identity(_core_ring(drained), drained)
    b = by_identity(_core_ring(removed), removed)
    assert a == b
