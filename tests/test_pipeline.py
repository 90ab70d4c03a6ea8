"""The whole per-packet path (parse -> flow -> Maglev -> NAT) through
Dataplane.process(), exactly the C function the workers run; scapy builds the
packets and checks what comes out, checksums included.

The case table tests/pipeline_cases.py pins single packets and short
stateful sequences byte for byte; the scenarios below are what a table of
single-backend cases cannot say (spread over backends, reloads, draining,
purges, concurrent publishes)."""
from __future__ import annotations

import threading

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from lbcore import _core, _testing
from tests.pipeline_cases import NOW, PIPELINE_CASES, PipelineCase
from tests.pipeline_cases import dataplane as case_dataplane

VIP = "198.18.100.1"
CLIENT = "198.18.0.2"
BACKENDS = ["198.19.0.11", "198.19.0.12", "198.19.0.13"]
VIP6 = "2001:db8:100::1"
CLIENT6 = "2001:db8::2"
BACKENDS6 = ["2001:db8:1::11", "2001:db8:1::12", "2001:db8:1::13"]
TX, DROP = _core.VERDICT_TX, _core.VERDICT_DROP


def table(backends=BACKENDS, vip=VIP, port=80, bport=8080, proto="tcp", draining=(),
          weights=None):
    bes = [(b, bport, (weights or {}).get(b, 1), 100 + i, b in draining)
           for i, b in enumerate(backends)]
    return [(vip, port, proto, 7, 65537, bes)]


@pytest.fixture
def dp():
    d = _core.Dataplane(workers=1, flow_capacity=4096, flow_seed=1)
    d.publish(table(), seed=42)
    return d


def checked(raw: bytes):
    """Parse with scapy and assert every checksum it recomputes matches."""
    pkt = IP(raw) if raw[0] >> 4 == 4 else IPv6(raw)
    again = pkt.__class__(raw)
    for layer in (IP, TCP, UDP, ICMP):
        if layer in again and hasattr(again[layer], "chksum"):
            del again[layer].chksum
    rebuilt = again.__class__(bytes(again))
    for layer in (IP, TCP, UDP, ICMP):
        if layer in pkt and layer in rebuilt and hasattr(pkt[layer], "chksum"):
            assert pkt[layer].chksum == rebuilt[layer].chksum, f"{layer.__name__} checksum"
    return pkt


def syn(sport=40000, src=CLIENT, dst=VIP, flags="S", payload=b""):
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=80, flags=flags) / payload)


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=lambda c: c.description)
def test_pipeline_case(case: PipelineCase):
    dp = case_dataplane()
    for i, step in enumerate(case.steps):
        [(v, reason, out), *extras] = dp.process([step.packet], now=NOW)
        assert sorted(x[2] for x in extras) == sorted(step.extras), f"step {i}: extras"
        got = (_core.VERDICT_NAMES[v], reason)
        assert got == (_core.VERDICT_NAMES[step.verdict], step.reason), f"step {i}"
        if out != step.expected:
            want = IP(step.expected) if step.expected[0] >> 4 == 4 else IPv6(step.expected)
            assert out == step.expected, (f"step {i}:\n got {checked(out).summary()}"
                                          f"\nwant {want.summary()}")
    stats = dp.stats(vip_stats=[1, 2, 3, 4, 5], backend_stats=[101, 103, 104, 105])
    for key, want in case.counters.items():
        got = stats[key]
        if isinstance(want, dict):
            got = {k: got[k] for k in want}
        assert got == want, key


def test_pipeline_cases_cover_the_pipeline_drop_reasons():
    """The table has a sent packet and each drop that a Dataplane.process
    call can get from the pipeline's own stages (parse drops are tabled in
    test_packet.py; bad_vnet, no_neigh, bad_l2, no_route and ttl_exceeded come from the
    worker loops; flow_full is counted but the packet is still sent)."""
    reasons = {s.reason for c in PIPELINE_CASES for s in c.steps}
    assert {"none", "no_vip", "no_backend", "icmp_no_flow", "closed_port"} <= reasons


def test_one_flow_stays_on_one_backend_and_replies_come_from_the_vip(dp):
    first = checked(dp.process([syn()])[0][2])
    be = first[IP].dst
    for flags in ("A", "PA", "A"):
        p = checked(dp.process([syn(flags=flags, payload=b"x" * 100)])[0][2])
        assert p[IP].dst == be
    reply = bytes(IP(src=be, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA"))
    [(v, _, out)] = dp.process([reply])
    p = checked(out)
    assert v == TX and p[IP].src == VIP and p[TCP].sport == 80 and p[IP].dst == CLIENT
    assert dp.stats()["flow_hit"] >= 4
    flows = dp.flow_table.walk()
    assert len(flows) == 1 and flows[0]["backend"] == be and flows[0]["client"] == CLIENT


def test_flows_spread_over_backends(dp):
    outs = dp.process([syn(sport=20000 + i) for i in range(600)])
    seen = {}
    for v, _, out in outs:
        assert v == TX
        d = IP(out).dst
        seen[d] = seen.get(d, 0) + 1
    assert set(seen) == set(BACKENDS)
    for n in seen.values():
        assert 100 <= n <= 300      # 200 expected each; Maglev + hash spread


def test_same_seed_same_backend_on_another_gateway():
    """ECMP safety: two balancers with the same config pick alike."""
    a = _core.Dataplane(flow_capacity=4096, flow_seed=1)
    b = _core.Dataplane(flow_capacity=4096, flow_seed=999)
    a.publish(table(), seed=42)
    b.publish(table(backends=list(reversed(BACKENDS))), seed=42)
    pkts = [syn(sport=30000 + i) for i in range(200)]
    assert [IP(o).dst for _, _, o in a.process(pkts)] == [IP(o).dst for _, _, o in b.process(pkts)]


def test_non_syn_without_flow_still_follows_maglev():
    """After a restart (empty flow table) a mid-stream packet reaches the
    backend a SYN would have: established connections survive."""
    a = _core.Dataplane(flow_capacity=4096, flow_seed=1)
    a.publish(table(), seed=42)
    b = _core.Dataplane(flow_capacity=4096, flow_seed=2)
    b.publish(table(), seed=42)
    for sport in range(41000, 41050):
        first = IP(a.process([syn(sport=sport)])[0][2]).dst
        mid = IP(b.process([syn(sport=sport, flags="A", payload=b"data")])[0][2]).dst
        assert first == mid


def test_draining_backend_keeps_its_flows_gets_no_new_ones(dp):
    pinned = {}
    for sport in range(42000, 42060):
        pinned[sport] = IP(dp.process([syn(sport=sport)])[0][2]).dst
    drained = BACKENDS[0]
    dp.publish(table(draining=(drained,)), seed=42)
    for sport, be in pinned.items():
        assert IP(dp.process([syn(sport=sport, flags="A")])[0][2]).dst == be
    news = {IP(o).dst for _, _, o in dp.process([syn(sport=43000 + i) for i in range(200)])}
    assert drained not in news and news


def test_failed_backend_flows_are_repicked_after_purge(dp):
    pinned = {s: IP(dp.process([syn(sport=s)])[0][2]).dst for s in range(44000, 44100)}
    dead = BACKENDS[2]
    dp.publish(table(backends=BACKENDS[:2]), seed=42)
    n = dp.flow_table.purge_backend(dead, 8080, "tcp")
    assert n == sum(1 for b in pinned.values() if b == dead) > 0
    for s, be in pinned.items():
        now = IP(dp.process([syn(sport=s, flags="A")])[0][2]).dst
        assert now != dead
        if be != dead:
            assert now == be


def test_malformed_packets_get_a_reason_not_a_crash(dp):
    bad = [b"", b"\x45", b"\x60" + b"\x00" * 10, bytes(IP(src=CLIENT, dst=VIP, ihl=15) / TCP()),
           bytes(IP(src=CLIENT, dst=VIP, flags="MF") / UDP() / Raw(b"x" * 20))]
    for v, reason, _ in dp.process(bad):
        assert v == DROP and reason != "none"
    assert len(dp.flow_table) == 0


def test_table_swaps_under_a_running_worker_are_safe(dp):
    """Publish 200 tables while another thread runs the pipeline in C
    (GIL released); every packet gets a verdict, nothing crashes, and the
    old tables are freed only after the worker's quiescent point."""
    pkts = [syn(sport=46000 + i) for i in range(64)]
    done = threading.Event()
    result = {}

    def run():
        result["sent"] = _testing.process_repeat(dp, pkts, 3000)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    n = 0
    while not done.is_set() and n < 200:
        dp.publish(table(backends=BACKENDS[: 1 + n % 3]), seed=42)
        n += 1
    t.join(timeout=120)
    assert not t.is_alive()
    assert result["sent"] == 64 * 3000
    assert n > 0
