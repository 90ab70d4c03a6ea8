"""Write the seed corpus of tests/fuzz/fuzz_pipeline.c into tests/fuzz/corpus/.

Each seed is one batch in the harness's record format ([length: 2 bytes][clock step: 1
byte][packet]), built with scapy for the harness's table: flows to each VIP and their
replies, echo requests, closed ports, ICMP errors, fragments in and out of order.
Run it again after changing the harness's table: ``.venv/bin/python tests/fuzz/make_corpus.py``.
"""
from __future__ import annotations

import hashlib
import pathlib

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrFragment,
    fragment6,
)
from scapy.packet import Raw

C4, V4, B4 = "198.18.0.2", "198.18.100.1", "198.19.0.11"
C6, V6, B6 = "2001:db8::2", "2001:db8:100::1", "2001:db8:1::11"


def batch(*pkts, step: int = 1) -> bytes:
    out = b""
    for p in pkts:
        b = bytes(p)
        out += len(b).to_bytes(2, "big") + bytes([step]) + b
    return out


def seeds() -> list[bytes]:
    big = bytes(range(256)) * 12
    f4 = fragment(IP(src=C4, dst=V4, id=7) / UDP(sport=1000, dport=5300) / big, fragsize=1000)
    r4 = fragment(IP(src=B4, dst=C4, id=8) / UDP(sport=5300, dport=1000) / big, fragsize=1000)
    f6 = fragment6(IPv6(src=C6, dst=V6) / IPv6ExtHdrFragment(id=9) / UDP(sport=1000, dport=53)
                   / big, 1280)
    syn = IP(src=C4, dst=V4) / TCP(sport=1234, dport=80, flags="S")
    synack = IP(src=B4, dst=C4) / TCP(sport=8080, dport=1234, flags="SA")
    return [
        batch(syn, synack, IP(src=C4, dst=V4) / TCP(sport=1234, dport=80, flags="A")),
        batch(*(IP(src=f"198.18.0.{i}", dst=V4) / TCP(sport=i, dport=80, flags="S")
                for i in range(2, 30))),
        batch(IP(src=C4, dst=V4) / TCP(sport=1, dport=81, flags="S"),
              IP(src=C4, dst=V4) / UDP(sport=1, dport=81) / b"x",
              IPv6(src=C6, dst=V6) / UDP(sport=1, dport=54) / b"x"),
        batch(IP(src=C4, dst=V4) / ICMP(id=1, seq=1) / b"ping",
              IPv6(src=C6, dst=V6) / ICMPv6EchoRequest(id=1, seq=1, data=b"ping")),
        batch(syn, IP(src="198.18.0.254", dst=V4) / ICMP(type=3, code=4, nexthopmtu=1400)
              / Raw(bytes(IP(src=V4, dst=C4) / TCP(sport=80, dport=1234))[:28])),
        batch(IPv6(src=C6, dst=V6) / UDP(sport=2, dport=53) / b"q",
              IPv6(src="2001:db8::fe", dst=V6) / ICMPv6PacketTooBig(mtu=1280)
              / Raw(bytes(IPv6(src=V6, dst=C6) / UDP(sport=53, dport=2) / b"a"))),
        batch(*f4),
        batch(*reversed(f4)),
        batch(*r4),
        batch(*reversed(f6)),
        batch(*f4[1:], step=200) + batch(f4[0], step=250),
        batch(*(IP(src=C4, dst=V4, id=i, frag=100, proto=17) / Raw(bytes(64))
                for i in range(40))),
        batch(*(IP(src=C4, dst=V4) / UDP(sport=i, dport=5300) / b"u" for i in range(20))),
    ]


def main() -> None:
    d = pathlib.Path(__file__).parent / "corpus"
    d.mkdir(exist_ok=True)
    for s in seeds():
        (d / hashlib.sha1(s).hexdigest()).write_bytes(s)


if __name__ == "__main__":
    main()
