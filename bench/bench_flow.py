"""Flow-table speed: lookups (hit / miss, batched / one by one), inserts,
evicting inserts under a SYN flood, and expiry, at 1M tracked flows.

Every figure times a C loop run by one call with the GIL released
(_testing.fill, _testing.lookup_batch, FlowTable.expire), so it is the
table's work and not Python call overhead; ops/s = OPS / median round time
is put in extra_info ("Mops_s").

    python -m pytest bench/bench_flow.py --benchmark-only \
        --benchmark-columns=min,median,max,rounds
"""
from __future__ import annotations

from collections.abc import Callable

import pytest

from lbcore import _core, _testing

FLOWS = 1 << 20          # tracked flows (and capacity)
OPS = 1_000_000          # lookups per timed round
ROUNDS = 5
FWD, REV = _core.DIR_FWD, _core.DIR_REV


@pytest.fixture(scope="module")
def full_table() -> _core.FlowTable:
    """1M established flows, capacity 1M: hash chains at their longest."""
    ft = _core.FlowTable(FLOWS, seed=0xBE4C)
    assert _testing.fill(ft, FLOWS, now=1, state="established") == FLOWS
    return ft


def _rate(benchmark, ops: int) -> None:
    median = benchmark.stats.stats.median
    benchmark.extra_info["Mops_s"] = round(ops / median / 1e6, 2)


def _lookups(benchmark, ft: _core.FlowTable, *, hit: bool, batched: bool, direction: int):
    n = benchmark.pedantic(_testing.lookup_batch, args=(ft, OPS, FLOWS),
                           kwargs={"hit": hit, "batched": batched, "dir": direction, "now": 2},
                           rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert n == (OPS if hit else 0)
    _rate(benchmark, OPS)
    benchmark.extra_info["bytes_per_flow"] = round(ft.memory / ft.capacity, 2)


@pytest.mark.parametrize("direction", [FWD, REV], ids=["fwd", "rev"])
def test_lookup_hit_batched(benchmark, full_table, direction):
    """The data plane's way: LB_BATCH keys per lb_flow_lookup_batch call."""
    _lookups(benchmark, full_table, hit=True, batched=True, direction=direction)


def test_lookup_miss_batched(benchmark, full_table):
    _lookups(benchmark, full_table, hit=False, batched=True, direction=FWD)


def test_lookup_hit_single(benchmark, full_table):
    """One lb_flow_lookup per key: bound by DRAM latency, for comparison."""
    _lookups(benchmark, full_table, hit=True, batched=False, direction=FWD)


def test_lookup_miss_single(benchmark, full_table):
    _lookups(benchmark, full_table, hit=False, batched=False, direction=FWD)


def _fresh(fill: int, state: str = "established") -> Callable[[], tuple]:
    def setup() -> tuple:
        ft = _core.FlowTable(FLOWS, seed=0xF1E5)
        if fill:
            assert _testing.fill(ft, fill, now=1, state=state) == fill
        return (ft,), {}
    return setup


def test_insert(benchmark):
    """1M inserts into an empty 1M table (free list / fresh slots)."""
    def run(ft: _core.FlowTable) -> None:
        assert _testing.fill(ft, FLOWS, now=1) == FLOWS
    benchmark.pedantic(run, setup=_fresh(0), rounds=ROUNDS, iterations=1)
    _rate(benchmark, FLOWS)


def test_insert_evicting_half_open(benchmark):
    """SYN flood on a full table (half established, half half-open): every
    insert has to find and evict a half-open entry."""
    n = 200_000

    def setup() -> tuple:
        ft = _core.FlowTable(FLOWS, seed=0xF1E5)
        assert _testing.fill(ft, FLOWS // 2, now=1, state="established") == FLOWS // 2
        assert _testing.fill(ft, FLOWS // 2, now=1, start=FLOWS // 2, state="syn") == FLOWS // 2
        return (ft,), {}

    def run(ft: _core.FlowTable) -> None:
        assert _testing.fill(ft, n, now=2, start=FLOWS, state="syn") == n
        assert ft.counters()["evicted_halfopen"] == n
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    _rate(benchmark, n)


def test_expire(benchmark):
    """lb_flow_expire removing all of 1M idle flows in one call."""
    def run(ft: _core.FlowTable) -> None:
        assert ft.expire(10**8) == FLOWS
    benchmark.pedantic(run, setup=_fresh(FLOWS), rounds=ROUNDS, iterations=1)
    _rate(benchmark, FLOWS)


def test_expire_scan_nothing_due(benchmark, full_table):
    """The periodic sweep over 1M flows of which none is due: pure scan."""
    def run() -> None:
        assert full_table.expire(3) == 0
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    _rate(benchmark, FLOWS)
