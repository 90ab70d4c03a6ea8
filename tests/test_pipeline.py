"""The whole per-packet path (parse -> flow -> Maglev -> NAT) through
Dataplane.process(), exactly the C function the workers run; scapy builds the
packets and checks what comes out, checksums included."""
from __future__ import annotations

import threading

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from lbcore import _core, _testing

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


def test_new_flow_is_dnated_to_a_backend_with_valid_checksums(dp):
    [(v, reason, out)] = dp.process([syn()])
    assert (v, reason) == (TX, "none")
    p = checked(out)
    assert p[IP].src == CLIENT and p[IP].dst in BACKENDS
    assert p[TCP].sport == 40000 and p[TCP].dport == 8080
    s = dp.stats(vip_stats=[7], backend_stats=[100, 101, 102])
    assert s["flow_new"] == 1 and s["vips"][7][2] == 1


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


def test_unknown_destination_and_empty_pool_are_dropped(dp):
    [(v, reason, _)] = dp.process([syn(dst="198.18.100.9")])
    assert (v, reason) == (DROP, "no_vip")
    dp.publish(table(backends=[]), seed=42)
    [(v, reason, _)] = dp.process([syn(sport=5)])
    assert (v, reason) == (DROP, "no_backend")
    assert dp.stats()["drops"]["no_backend"] == 1


def test_stateless_reply_without_flow_is_snated():
    d = _core.Dataplane(flow_capacity=64, flow_seed=1)
    d.publish(table(), seed=1)
    reply = bytes(IP(src=BACKENDS[1], dst=CLIENT) / TCP(sport=8080, dport=5555, flags="A"))
    [(v, _, out)] = d.process([reply])
    p = checked(out)
    assert v == TX and p[IP].src == VIP and p[TCP].sport == 80


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


def test_udp_and_ipv6():
    d = _core.Dataplane(flow_capacity=256, flow_seed=3)
    d.publish(table(BACKENDS6, vip=VIP6, port=5300, bport=5300, proto="udp"), seed=9)
    q = bytes(IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=3333, dport=5300) / b"query")
    [(v, _, out)] = d.process([q])
    p = IPv6(out)
    assert v == TX and p.dst in BACKENDS6 and p[UDP].dport == 5300
    assert p[UDP].chksum == IPv6(bytes(IPv6(out)[IPv6].copy()))[UDP].chksum
    again = IPv6(out)
    del again[UDP].chksum
    assert IPv6(bytes(again))[UDP].chksum == p[UDP].chksum
    r = bytes(IPv6(src=p.dst, dst=CLIENT6) / UDP(sport=5300, dport=3333) / b"be1\n")
    [(v, _, out)] = d.process([r])
    assert v == TX and IPv6(out).src == VIP6


def test_icmp_frag_needed_toward_vip_reaches_the_flows_backend(dp):
    """PMTU: an ICMP error quoting the VIP's reply is sent to the backend
    that owns the flow, rewritten inside and out."""
    be = IP(dp.process([syn(sport=45000)])[0][2]).dst
    quoted = IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=45000, flags="A")
    err = bytes(IP(src="198.18.0.254", dst=VIP) / ICMP(type=3, code=4, nexthopmtu=1400)
                / bytes(quoted)[:28])
    [(v, reason, out)] = dp.process([err])
    assert (v, reason) == (TX, "none")
    p = checked(out)
    assert p[IP].dst == be
    assert p["IPerror"].src == be and p["IPerror"].dst == CLIENT
    assert p["TCPerror"].sport == 8080 and p["TCPerror"].dport == 45000


def test_icmp_error_for_unknown_flow_is_dropped(dp):
    quoted = IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=1, flags="A")
    err = bytes(IP(src="198.18.0.254", dst=VIP) / ICMP(type=3, code=4) / bytes(quoted)[:28])
    [(v, reason, _)] = dp.process([err])
    assert (v, reason) == (DROP, "icmp_no_flow")


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
