"""Parse + NAT rewrite cost per packet (ext/lb_parse.c + ext/lb_nat.c).

Each benchmark call runs _testing.parse_rewrite_batch: BATCH packets copied
once into one C buffer, then lb_parse + lb_nat_rewrite over all of them
ROUNDS times with the GIL released. The per-packet figure is the call's
median time divided by BATCH * ROUNDS; it is stored in extra_info
["ns_per_packet"] (see --benchmark-json) and printed at the end.

    .venv/bin/python -m pytest bench/bench_packet.py --benchmark-only -q -s
"""
from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPv6, Raw

from lbcore import _core, _testing

BATCH = 64
ROUNDS = 2000
PKT_LEN = 64          # bytes of IP packet
ICMP_LEN = 68         # the smallest ICMP error that quotes a whole IP+TCP header

V4 = ("198.18.0.10", "198.18.1.1", "198.18.2.7")
V6 = ("2001:db8::10", "2001:db8:1::1", "2001:db8:2::7")


def _pad(p, n: int = PKT_LEN) -> bytes:
    b = bytes(p)
    return bytes(p / Raw(bytes(n - len(b))))


def _packets(kind: str) -> tuple[list[bytes], tuple]:
    """BATCH client -> VIP packets of PKT_LEN bytes (client ports differ; the
    ICMP errors quote VIP -> client), and the flow entry to rewrite them with."""
    fam_addrs = V6 if kind.startswith("v6") else V4
    client, vip, backend = fam_addrs
    proto = 17 if "udp" in kind else 6
    ipl = (lambda: IPv6(src=client, dst=vip)) if fam_addrs is V6 else (
        lambda: IP(src=client, dst=vip))
    pkts = []
    for i in range(BATCH):
        l4 = (TCP(sport=40000 + i, dport=80, flags="A") if proto == 6
              else UDP(sport=40000 + i, dport=80))
        if kind == "v4_icmp_frag_needed":
            quote = bytes(IP(src=vip, dst=client) / TCP(sport=80, dport=40000 + i))
            pkts.append(_pad(IP(src="198.18.0.254", dst=vip) / ICMP(type=3, code=4)
                             / Raw(quote), ICMP_LEN))
        else:
            pkts.append(_pad(ipl() / l4))
    entry = (client, 40000, vip, 80, backend, 8080, proto)
    assert all(len(p) in (PKT_LEN, ICMP_LEN) for p in pkts)
    return pkts, entry


RESULTS: dict[str, float] = {}


@pytest.mark.parametrize("csum_partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("kind", ["v4_tcp", "v4_udp", "v6_tcp", "v4_icmp_frag_needed"])
def test_parse_rewrite(benchmark, kind: str, csum_partial: bool) -> None:
    if csum_partial and kind.endswith("needed"):
        pytest.skip("CHECKSUM_PARTIAL does not apply to ICMP")
    pkts, entry = _packets(kind)
    n = benchmark.pedantic(_testing.parse_rewrite_batch,
                           args=(pkts, entry, _core.DIR_FWD, ROUNDS, csum_partial),
                           rounds=15, iterations=1, warmup_rounds=2)
    assert n == BATCH * ROUNDS
    ns = benchmark.stats.stats.median * 1e9 / (BATCH * ROUNDS)
    benchmark.extra_info["ns_per_packet"] = round(ns, 2)
    RESULTS[f"{kind}/{'partial' if csum_partial else 'full'}"] = ns


def teardown_module() -> None:
    for name, ns in RESULTS.items():
        print(f"\nparse+rewrite {name:28s} {ns:6.1f} ns/packet (median)", end="")
    print()
