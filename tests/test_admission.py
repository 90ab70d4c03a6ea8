"""New-flow admission, source persistence and the reject rate, through Dataplane.process:
the per-VIP overload guard (new_flow_rate), max_flows, the per-client rate, limit_action,
persistence "source" (the same backend for every flow of a client, and the same on another
gateway with the same seed), and the token bucket that limits RSTs / ICMP unreachables."""
from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP

from lbcore import _core

VIP = "198.18.100.1"
BACKENDS = [(f"198.19.0.{10 + i}", 8080, 1, 100 + i, False) for i in range(3)]
NOW = 5000


def dp_with(settings: dict, **kw) -> _core.Dataplane:
    dp = _core.Dataplane(workers=1, flow_capacity=4096, flow_seed=1, **kw)
    dp.publish([(VIP, 80, "tcp", 1, 65537, BACKENDS, settings)], seed=42)
    return dp


def syn(src: str, sport: int, dport: int = 80) -> bytes:
    return bytes(IP(src=src, dst=VIP) / TCP(sport=sport, dport=dport, flags="S"))


def verdicts(out) -> list[str]:
    return [_core.VERDICT_NAMES[v] for v, _r, _b in out]


def test_max_flows_refuses_new_flows_over_the_limit():
    dp = dp_with({"max_flows": 10})
    out = dp.process([syn(f"198.18.0.{i}", 1000) for i in range(2, 17)], now=NOW)
    assert verdicts(out).count("tx") == 10
    assert [r for _v, r, _b in out].count("limit_flows") == 5
    st = dp.stats(vip_stats=[1])
    assert st["vip_limits"][1] == {"limit_flows": 5, "limit_rate": 0, "shed": 0}
    assert st["drops"]["limit_flows"] == 5


def test_max_flows_lets_packets_of_tracked_flows_through():
    dp = dp_with({"max_flows": 1})
    assert verdicts(dp.process([syn("198.18.0.2", 1000)], now=NOW)) == ["tx"]
    ack = bytes(IP(src="198.18.0.2", dst=VIP) / TCP(sport=1000, dport=80, flags="A"))
    assert verdicts(dp.process([ack, syn("198.18.0.3", 1000)], now=NOW)) == ["tx", "drop"]


def test_client_rate_is_a_token_bucket_per_client_address():
    dp = dp_with({"client_rate": 5, "client_burst": 5})
    out = dp.process([syn("198.18.0.2", 1000 + i) for i in range(8)], now=NOW)
    assert verdicts(out) == ["tx"] * 5 + ["drop"] * 3
    # another client has its own bucket
    assert verdicts(dp.process([syn("198.18.0.3", 1000)], now=NOW)) == ["tx"]
    # a second later the bucket holds 5 again
    out = dp.process([syn("198.18.0.2", 2000 + i) for i in range(6)], now=NOW + 1000)
    assert verdicts(out) == ["tx"] * 5 + ["drop"]
    assert dp.stats(vip_stats=[1])["vip_limits"][1]["limit_rate"] == 4


def test_limit_action_reject_answers_with_an_rst():
    dp = dp_with({"client_rate": 1, "limit_action": "reject"})
    out = dp.process([syn("198.18.0.2", 1000), syn("198.18.0.2", 1001)], now=NOW)
    assert verdicts(out) == ["tx", "reply"]
    rst = IP(out[1][2])
    assert rst[TCP].flags == "RA" and rst.src == VIP and rst.dst == "198.18.0.2"
    assert dp.stats()["resets"] == 1


def test_limit_action_reject_udp_gets_admin_prohibited():
    dp = _core.Dataplane(workers=1, flow_capacity=64, flow_seed=1)
    dp.publish([(VIP, 53, "udp", 1, 65537, BACKENDS, {"max_flows": 1,
                                                      "limit_action": "reject"})], seed=42)
    pk = [bytes(IP(src="198.18.0.2", dst=VIP) / UDP(sport=1000 + i, dport=53) / b"q")
          for i in range(2)]
    out = dp.process(pk, now=NOW)
    assert verdicts(out) == ["tx", "drop", "reply"]
    err = IP(out[2][2])
    assert (err[ICMP].type, err[ICMP].code) == (3, 13)


def test_new_flow_rate_guard_sheds_silently():
    dp = dp_with({"new_flow_rate": 10, "new_flow_burst": 10, "limit_action": "reject"})
    out = dp.process([syn(f"198.18.{i // 200}.{i % 200 + 2}", 1000) for i in range(30)],
                     now=NOW)
    assert verdicts(out).count("tx") == 10
    assert verdicts(out).count("drop") == 20       # never answered: a flood
    assert dp.stats(vip_stats=[1])["vip_limits"][1]["shed"] == 20


def test_persistence_source_sends_every_flow_of_a_client_to_one_backend():
    dp = dp_with({"persistence": "source", "persist_ms": 60000})
    seen: dict[str, set[str]] = {}
    for c in range(2, 22):
        src = f"198.18.0.{c}"
        out = dp.process([syn(src, 1000 + p) for p in range(20)], now=NOW)
        seen[src] = {IP(b).dst for _v, _r, b in out}
    assert all(len(b) == 1 for b in seen.values())
    assert len({b for s in seen.values() for b in s}) == 3     # clients still spread


def test_persistence_is_the_same_on_another_gateway_and_outlives_a_pool_change():
    a = dp_with({"persistence": "source", "persist_ms": 60000})
    b = dp_with({"persistence": "source", "persist_ms": 60000})
    picks = {}
    for c in range(2, 40):
        src = f"198.18.1.{c}"
        pa = IP(a.process([syn(src, 1111)], now=NOW)[0][2]).dst
        pb = IP(b.process([syn(src, 2222)], now=NOW)[0][2]).dst
        assert pa == pb
        picks[src] = pa
    # a fourth backend: clients with a record keep theirs
    a.publish([(VIP, 80, "tcp", 1, 65537, [*BACKENDS, ("198.19.0.20", 8080, 1, 110, False)],
                {"persistence": "source", "persist_ms": 60000})], seed=42)
    for src, be in picks.items():
        assert IP(a.process([syn(src, 3333)], now=NOW + 10)[0][2]).dst == be


def test_reject_rate_limits_rsts_and_counts_the_rest():
    dp = _core.Dataplane(workers=1, flow_capacity=64, flow_seed=1, reject_rate=100,
                         reject_burst=20)
    dp.publish([(VIP, 80, "tcp", 1, 65537, BACKENDS, {"closed_port": "reject"})], seed=42)
    out = dp.process([syn("198.18.0.2", 1000 + i, dport=81) for i in range(30)], now=NOW)
    assert verdicts(out).count("reply") == 20
    st = dp.stats()
    assert st["resets"] == 20 and st["rejects_limited"] == 10
    assert st["drops"]["closed_port"] == 30


def test_echo_and_closed_ports_never_answer_a_broadcast_or_multicast_source():
    dp = dp_with({"closed_port": "reject"})
    out = dp.process([bytes(IP(src="224.0.0.1", dst=VIP) / ICMP()),
                      syn("0.0.0.0", 1000, dport=81)], now=NOW)
    assert verdicts(out) == ["drop", "drop"]
