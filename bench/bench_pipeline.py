"""The full per-packet path (ext/lb_pipeline.c lb_pipeline_run): parse -> VIP
lookup -> flow lookup (hit) or Maglev pick + flow insert (miss) -> NAT, on
64-byte packets, with the flow table holding 1M flows; and the packets of
each case of the pipeline case table (tests/pipeline_cases.py).

Each call runs _testing.process_repeat: the packets are copied into one C
buffer once, then every round re-copies the pristine packets (as a device
read would) and runs lb_process_batch over them with the GIL released,
which hands lb_pipeline_run LB_BATCH (64) packets at a time (the TUN worker
hands it up to LB_TUN_BATCH, 32). The per-packet figure is the call's median
divided by packets x rounds.

    .venv/bin/python -m pytest bench/bench_pipeline.py --benchmark-only -q -s

Goal: >= 5 M packets/s on one core (<= 200 ns a packet).
"""
from __future__ import annotations

import socket
import struct

import pytest
from scapy.all import IP, TCP, UDP, Raw

from lbcore import _core, _testing
from tests.pipeline_cases import NOW, PIPELINE_CASES, PipelineCase
from tests.pipeline_cases import dataplane as case_dataplane

BATCH = 1024          # packets per batch of the new-flow benchmark
HOT = 1 << 16         # distinct flows the hit benchmark cycles through
ROUNDS = 4
FLOWS = 1 << 20       # flows in the table
VIP = "198.18.100.1"


def backends(n: int):
    return [(f"198.19.{i // 250}.{i % 250 + 1}", 8080, 1, 100 + i, False) for i in range(n)]


def packets(proto: str, flags: str = "A", base: int = 0, n: int = BATCH) -> list[bytes]:
    """n 64-byte packets of n different flows: a scapy-built template with
    the client address and port patched in (fast enough to make 1M)."""
    tmpl = bytearray(_template(proto, flags))
    out = []
    for i in range(base, base + n):
        struct.pack_into("!4s", tmpl, 12, socket.inet_aton(f"198.18.{i // 60000 % 200 + 1}."
                                                          f"{i % 250 + 1}"))
        struct.pack_into("!H", tmpl, 20, 1024 + i % 60000)
        out.append(bytes(tmpl))
    return out


def _template(proto: str, flags: str) -> bytes:
    l4 = TCP(sport=1024, dport=80, flags=flags) if proto == "tcp" else UDP(sport=1024, dport=80)
    p = IP(src="198.18.1.1", dst=VIP) / l4
    return bytes(p / Raw(bytes(64 - len(p))))


RESULTS: dict[str, float] = {}


def _dataplane(proto: str, n_backends: int = 100):
    dp = _core.Dataplane(workers=1, flow_capacity=FLOWS, flow_seed=1)
    dp.publish([(VIP, 80, proto, 1, 65537, backends(n_backends))], seed=7)
    return dp


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_full_path_flow_hit(benchmark, proto: str) -> None:
    """Steady state: every packet belongs to a tracked flow; the table also
    holds ~1M other flows (so lookups miss the CPU caches like in production)."""
    dp = _dataplane(proto)
    for base in range(0, FLOWS - HOT, 1 << 16):
        _testing.process_repeat(dp, packets(proto, "S", HOT + base, 1 << 16), 1)
    pk = packets(proto, "A", 0, HOT)
    _testing.process_repeat(dp, pk, 1)
    assert len(dp.flow_table) >= FLOWS - HOT
    sent = benchmark(_testing.process_repeat, dp, pk, ROUNDS)
    assert sent == HOT * ROUNDS
    ns = benchmark.stats.stats.median / (HOT * ROUNDS) * 1e9
    benchmark.extra_info["ns_per_packet"] = ns
    benchmark.extra_info["mpps"] = 1e3 / ns
    RESULTS[f"hit {proto}"] = ns


def test_full_path_new_flows(benchmark) -> None:
    """Every packet a new flow (SYN): Maglev pick + insert + NAT."""
    state = {"base": 0}

    def setup():
        state["base"] += BATCH * ROUNDS
        return (_dataplane("tcp"), [packets("tcp", "S", state["base"] + r * BATCH)
                                    for r in range(4)]), {}

    def run(dp, batches):
        return sum(_testing.process_repeat(dp, b, 1) for b in batches)

    sent = benchmark.pedantic(run, setup=setup, rounds=5)
    assert sent == 4 * BATCH
    ns = benchmark.stats.stats.median / (4 * BATCH) * 1e9
    benchmark.extra_info["ns_per_packet"] = ns
    RESULTS["new flow tcp"] = ns


CASE_ROUNDS = 20_000


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: c.description)
def test_pipeline_case(benchmark, case: PipelineCase) -> None:
    """The packets of one case of tests/pipeline_cases.py, replayed with the
    state the case builds in place (its flows inserted): each round runs all
    of the case's packets through one lb_process_batch call, so a stateful
    case's later packets are flow hits, as in steady state."""
    dp = case_dataplane()
    for step in case.steps:
        # the step's own packet first, then any extras it sent (released fragments, ICMP
        # errors)
        (v, reason, _) = dp.process([step.packet], now=NOW)[0]
        assert (v, reason) == (step.verdict, step.reason)
    pkts = [step.packet for step in case.steps]
    sent = benchmark.pedantic(_testing.process_repeat, args=(dp, pkts, CASE_ROUNDS, NOW),
                              rounds=5, iterations=1, warmup_rounds=1)
    # what leaves: forwarded packets and answers (an echo reply goes back out too)
    forwarded = sum(step.verdict in (_core.VERDICT_TX, _core.VERDICT_REPLY)
                    for step in case.steps)
    if not any(step.extras or step.verdict == _core.VERDICT_REPLY for step in case.steps):
        assert sent == CASE_ROUNDS * forwarded
    else:
        # generated packets (RSTs, ICMP errors, echo replies) are rate-limited and the clock
        # stands still here, and fragments are held or released by what came before: a bound
        extras = sum(len(step.extras) for step in case.steps)
        assert sent <= CASE_ROUNDS * (forwarded + extras)
    ns = benchmark.stats.stats.median / (len(pkts) * CASE_ROUNDS) * 1e9
    benchmark.extra_info["ns_per_packet"] = ns
    RESULTS[f"case '{case.description}'"] = ns


def teardown_module(module) -> None:
    for k, ns in RESULTS.items():
        print(f"\nfull path, {k}: {ns:.1f} ns/packet = {1e3 / ns:.2f} M packets/s")
