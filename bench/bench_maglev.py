"""Maglev build time and pick rate (pytest-benchmark).

    pytest bench/bench_maglev.py --benchmark-only --benchmark-columns=min,median,max

Goals (NSDI 2016 section 5.3 reports 1.8 ms to build M=65537 for 1000
backends): build at M=65537, N=1000 within 2x of that; picks (hash + index,
as on the packet path, in a C loop) >= 50 M/s. Medians are what to quote;
the picks/s figure is in extra_info (--benchmark-json, or the printed line).
"""
from __future__ import annotations

import pytest

from lbcore import _core, _testing

PICKS = 2_000_000  # per round of the pick loop


def pool(n: int) -> list[tuple[str, int, int]]:
    return [(f"198.18.{i // 250}.{i % 250 + 1}", 8080, 1) for i in range(n)]


@pytest.mark.parametrize("m", [65537, 655373])
@pytest.mark.parametrize("n", [10, 100, 1000])
def test_build(benchmark, m: int, n: int) -> None:
    """lb_maglev_populate of N equal backends into M slots (control side)."""
    backends = pool(n)
    ring = benchmark.pedantic(_core.maglev_ring, args=(backends, m, 1),
                              rounds=30 if m < 100_000 else 10, iterations=1,
                              warmup_rounds=1)
    assert len(ring) == m
    if benchmark.stats:
        benchmark.extra_info["build_ms_median"] = benchmark.stats.stats.median * 1e3


@pytest.mark.parametrize("m", [65537, 655373])
@pytest.mark.parametrize("n", [10, 1000])
def test_pick_batch(benchmark, m: int, n: int) -> None:
    """PICKS picks of distinct IPv4 flows in a nogil C loop: lb_hash_flow +
    lb_maglev_slot + ring load, i.e. lb_maglev_pick as the data plane runs it."""
    table = _core.MaglevTable(pool(n), m, 0x5EED)
    total = benchmark.pedantic(_testing.pick_batch, args=(table, PICKS), rounds=15, iterations=1,
                               warmup_rounds=1)
    assert 0 <= total < PICKS * n
    if benchmark.stats:
        rate = PICKS / benchmark.stats.stats.median
        benchmark.extra_info["picks_per_s_median"] = rate
        print(f"\nmaglev pick M={m} N={n}: {rate / 1e6:.1f} M picks/s "
              f"({1e9 / rate:.2f} ns/pick, median)")


def test_pick_from_python(benchmark) -> None:
    """One pick through the Python API (address parsing dominates): the cost
    for the control plane's `lbcore pick`, not the data plane."""
    table = _core.MaglevTable(pool(100))
    benchmark(table.pick, "198.18.7.7", "198.19.0.1", 40000, 80, 6)
