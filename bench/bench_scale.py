"""How the per-packet cost of the core grows: with the flows in the table (1k, 1M, 16M) and
with the backends behind a VIP (10, 100, 1000).

The packet path is the one of bench_pipeline.py (_testing.process_repeat: lb_process_batch over
prebuilt 64-byte TCP packets, one nogil call, each round re-copying the pristine packets as a
device read would). What changes is the state around it:

* flows: the table is sized for the flow count at ~95 % load (capacity = the next power of
  two, 2^24 = LB_FLOW_MAX for 16M; at 88.6 bytes a flow that is ~1.5 GB), and filled with
  synthetic established flows by _testing.fill, one C loop (16M inserts take seconds, not the
  minutes per-flow Python would). The measured packets belong to min(flows, 64k) flows of
  that table (inserted by their own SYNs), so at 1M and 16M every packet's lookup lands
  somewhere in a table far bigger than the caches, as in production; at 1k everything is hot.
* backends: one VIP with 10, 100 or 1000 backends (Maglev, M = 65537): the flow-hit path with
  1M flows in the table, and the new-flow path (Maglev pick + insert + NAT) into a 1M table
  already half full (so the figure is an insert among other flows, not first-touch page
  faults of an empty table).

The per-packet figure is the call's median divided by packets x rounds (extra_info
"ns_per_packet"); quote medians.

    .venv/bin/python -m pytest bench/bench_scale.py --benchmark-only -q -s
"""
from __future__ import annotations

import gc

import pytest

from bench.bench_pipeline import VIP, backends, packets
from lbcore import _core, _testing

NOW = 1000                  # ms: one clock for the fill and the packets (nothing expires)
HOT_MAX = 1 << 16           # flows the measured packets cycle through
PACKETS_PER_CALL = 1 << 18  # packets per timed call (HOT x rounds)
ROUNDS = 11                 # timed calls per figure
LOAD = 0.95                 # flows / capacity
FLOW_COUNTS = {"1k": 1_000, "1M": 1_000_000, "16M": 16_000_000}
BACKEND_COUNTS = (10, 100, 1000)
NEW_BATCH = 1024            # packets per batch of the new-flow figure
NEW_BATCHES = 16            # batches per timed new-flow round
NEW_BACKGROUND = 1 << 19    # flows already in the 1M table when the new ones arrive

RESULTS: dict[str, float] = {}


def capacity_for(flows: int) -> int:
    """The power-of-two capacity that holds ``flows`` at no more than LOAD, at most
    LB_FLOW_MAX (2^24, which 16M flows fill to 95 %)."""
    cap = 1
    while cap * LOAD < flows:
        cap <<= 1
    return min(cap, 1 << 24)


def dataplane(flows: int, n_backends: int = 100) -> tuple[_core.Dataplane, list[bytes]]:
    """A data plane with one TCP VIP over ``n_backends`` and ``flows`` flows in its table, and
    the ACK packets of the measured (already tracked) flows."""
    cap = capacity_for(flows)
    dp = _core.Dataplane(workers=1, flow_capacity=cap, flow_seed=1)
    dp.publish([(VIP, 80, "tcp", 1, 65537, backends(n_backends))], seed=7)
    hot = min(flows, HOT_MAX)
    # the measured flows first, by their own SYNs (so they are the VIP's, with a backend
    # picked by Maglev), in batches of 64k to keep the Python side small
    for base in range(0, hot, 1 << 16):
        n = min(1 << 16, hot - base)
        assert _testing.process_repeat(dp, packets("tcp", "S", base, n), 1, NOW) == n
    background = flows - hot
    if background:
        # synthetic flows (another VIP's: never matched by the packets) fill the rest
        assert _testing.fill(dp.flow_table, background, now=NOW,
                             state="established") == background
    assert len(dp.flow_table) == flows
    return dp, packets("tcp", "A", 0, hot)


def _measure(benchmark, dp: _core.Dataplane, pk: list[bytes], key: str) -> None:
    rounds = max(1, PACKETS_PER_CALL // len(pk))
    _testing.process_repeat(dp, pk, 1, NOW)       # warm: every flow touched once
    sent = benchmark.pedantic(_testing.process_repeat, args=(dp, pk, rounds, NOW),
                              rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert sent == len(pk) * rounds            # every packet a flow hit, forwarded
    ns = benchmark.stats.stats.median / (len(pk) * rounds) * 1e9
    benchmark.extra_info["ns_per_packet"] = round(ns, 1)
    benchmark.extra_info["mpps"] = round(1e3 / ns, 2)
    benchmark.extra_info["flows"] = len(dp.flow_table)
    benchmark.extra_info["capacity"] = dp.flow_table.capacity
    benchmark.extra_info["table_mib"] = round(dp.flow_table.memory / 2**20, 1)
    RESULTS[key] = ns


@pytest.mark.parametrize("flows", list(FLOW_COUNTS), ids=list(FLOW_COUNTS))
def test_flow_hit_vs_flows_in_table(benchmark, flows: str) -> None:
    """The steady-state packet (a tracked flow) with 1k, 1M, 16M flows in the table."""
    dp, pk = dataplane(FLOW_COUNTS[flows])
    try:
        _measure(benchmark, dp, pk, f"flow hit, {flows} flows")
    finally:
        del dp
        gc.collect()


@pytest.mark.parametrize("n_backends", BACKEND_COUNTS)
def test_flow_hit_vs_backends(benchmark, n_backends: int) -> None:
    """The steady-state packet with 10, 100, 1000 backends behind the VIP (1M flows)."""
    dp, pk = dataplane(FLOW_COUNTS["1M"], n_backends)
    try:
        _measure(benchmark, dp, pk, f"flow hit, {n_backends} backends")
    finally:
        del dp
        gc.collect()


@pytest.mark.parametrize("n_backends", BACKEND_COUNTS)
def test_new_flow_vs_backends(benchmark, n_backends: int) -> None:
    """A new flow (SYN: Maglev pick + flow insert + NAT) with 10, 100, 1000 backends behind the
    VIP, into a 1M table holding 512k other flows (a fresh one each round, made and filled
    outside the timing)."""
    state = {"base": 0}

    def setup() -> tuple[tuple, dict]:
        state["base"] += NEW_BATCHES * NEW_BATCH
        dp = _core.Dataplane(workers=1, flow_capacity=1 << 20, flow_seed=1)
        dp.publish([(VIP, 80, "tcp", 1, 65537, backends(n_backends))], seed=7)
        assert _testing.fill(dp.flow_table, NEW_BACKGROUND, now=NOW) == NEW_BACKGROUND
        return (dp, [packets("tcp", "S", state["base"] + r * NEW_BATCH, NEW_BATCH)
                     for r in range(NEW_BATCHES)]), {}

    def run(dp: _core.Dataplane, batches: list[list[bytes]]) -> int:
        return sum(_testing.process_repeat(dp, b, 1, NOW) for b in batches)

    sent = benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    assert sent == NEW_BATCHES * NEW_BATCH
    ns = benchmark.stats.stats.median / (NEW_BATCHES * NEW_BATCH) * 1e9
    benchmark.extra_info["ns_per_packet"] = round(ns, 1)
    RESULTS[f"new flow, {n_backends} backends"] = ns


def teardown_module(module: object) -> None:
    for k, ns in RESULTS.items():
        print(f"\nscale, {k}: {ns:.1f} ns/packet = {1e3 / ns:.2f} M packets/s")
