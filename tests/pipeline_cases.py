"""The whole pipeline as a table: packets in, verdicts, drop reasons and the
exact bytes out (in the style of katran's test fixtures).

Each case runs its steps in order, one Dataplane.process() call per step, on
a fresh data plane that has published TABLE; so a case can depend on state an
earlier step created (a SYN inserts the flow its ACK then hits). Every VIP
has one backend, so the expected output does not depend on Maglev: it is the
input packet built again by scapy with the translated addresses and ports,
checksums computed from scratch, and the data plane's incrementally updated
packet must equal it byte for byte. A dropped packet must come out unchanged.

Used by tests/test_pipeline.py (correctness) and bench/bench_pipeline.py
(the cost of each case's packets, with the flows in place).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from lbcore import _core

CLIENT, VIP, BACKEND = "198.18.0.2", "198.18.100.1", "198.19.0.11"
VIP_EMPTY = "198.18.100.2"          # a VIP whose pool is empty
ROUTER = "198.18.0.254"             # sends ICMP errors about the VIP's replies
CLIENT6, VIP6, BACKEND6 = "2001:db8::2", "2001:db8:100::1", "2001:db8:1::11"
CPORT = 40000
SEED = 42                            # selection seed of the published table
NOW = 1000                           # the data plane's clock, ms

# (address, port, proto, stat id, ring size, [(address, port, weight, stat id, draining)])
TABLE = [
    (VIP, 80, "tcp", 1, 65537, [(BACKEND, 8080, 1, 101, False)]),
    (VIP_EMPTY, 80, "tcp", 2, 65537, []),
    (VIP6, 53, "udp", 3, 65537, [(BACKEND6, 5353, 1, 103, False)]),
]

TX, DROP = _core.VERDICT_TX, _core.VERDICT_DROP


@dataclass(frozen=True)
class Step:
    """One packet in: the verdict, the drop reason and the bytes out."""
    packet: bytes
    verdict: int
    reason: str
    expected: bytes


@dataclass(frozen=True)
class PipelineCase:
    description: str
    steps: tuple[Step, ...]
    # a subset of Dataplane.stats() after the last step (drops by reason
    # under "drops")
    counters: dict = field(default_factory=dict)


def tx(packet, expected) -> Step:
    return Step(bytes(packet), TX, "none", bytes(expected))


def drop(packet, reason: str) -> Step:
    return Step(bytes(packet), DROP, reason, bytes(packet))


def tcp4(src: str, dst: str, sport: int, dport: int, flags: str = "S", payload: bytes = b""):
    return IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / Raw(payload)


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes):
    return IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload)


def frag_needed(to: str, quoted):
    """ICMP fragmentation needed from ROUTER, quoting the first 28 bytes (IP
    header + 8 bytes of TCP, the RFC 792 minimum) of `quoted`."""
    return (IP(src=ROUTER, dst=to) / ICMP(type=3, code=4, nexthopmtu=1400)
            / Raw(bytes(quoted)[:28]))


# the forward packets of the one TCP flow, before and after the DNAT
SYN = tcp4(CLIENT, VIP, CPORT, 80, "S")
SYN_OUT = tcp4(CLIENT, BACKEND, CPORT, 8080, "S")
ACK = tcp4(CLIENT, VIP, CPORT, 80, "A", b"GET / HTTP/1.0\r\n\r\n")
ACK_OUT = tcp4(CLIENT, BACKEND, CPORT, 8080, "A", b"GET / HTTP/1.0\r\n\r\n")
# the backend's reply, before and after the SNAT
SYNACK = tcp4(BACKEND, CLIENT, 8080, CPORT, "SA")
SYNACK_OUT = tcp4(VIP, CLIENT, 80, CPORT, "SA")

PIPELINE_CASES = [
    PipelineCase(
        "tcp syn to the vip is dnated to its backend",
        (tx(SYN, SYN_OUT),),
        {"flow_miss": 1, "flow_new": 1, "tx": 1, "vips": {1: (1, len(SYN), 1)}}),
    PipelineCase(
        "syn then ack: the ack hits the flow",
        (tx(SYN, SYN_OUT), tx(ACK, ACK_OUT)),
        {"flow_new": 1, "flow_hit": 1, "tx": 2}),
    PipelineCase(
        "backend reply of a flow is translated back to the vip",
        (tx(SYN, SYN_OUT), tx(SYNACK, SYNACK_OUT), tx(ACK, ACK_OUT)),
        {"flow_new": 1, "flow_hit": 2, "backends": {101: (3, len(SYN) + len(SYNACK)
                                                          + len(ACK), 1)}}),
    PipelineCase(
        "backend reply without a flow takes the stateless path",
        (tx(SYNACK, SYNACK_OUT),),
        {"flow_miss": 1, "flow_new": 0, "tx": 1}),
    PipelineCase(
        "mid-stream packet without a flow is picked up, not dropped",
        (tx(ACK, ACK_OUT),),
        {"flow_new": 1}),
    PipelineCase(
        "unknown vip address is dropped as no_vip",
        (drop(tcp4(CLIENT, "198.18.100.9", CPORT, 80), "no_vip"),),
        {"drops": {"no_vip": 1}, "tx": 0}),
    PipelineCase(
        "vip address on a port it does not serve is dropped as no_vip",
        (drop(tcp4(CLIENT, VIP, CPORT, 81), "no_vip"),),
        {"drops": {"no_vip": 1}}),
    PipelineCase(
        "vip with an empty pool drops new flows as no_backend",
        (drop(tcp4(CLIENT, VIP_EMPTY, CPORT, 80), "no_backend"),),
        {"drops": {"no_backend": 1}, "flow_new": 0}),
    PipelineCase(
        "icmp frag-needed quoting a flow goes to its backend, translated inside and out",
        (tx(SYN, SYN_OUT),
         tx(frag_needed(VIP, SYNACK_OUT), frag_needed(BACKEND, SYNACK))),
        {"flow_hit": 1, "tx": 2}),
    PipelineCase(
        "icmp error quoting no tracked flow is dropped",
        (drop(frag_needed(VIP, SYNACK_OUT), "icmp_no_flow"),),
        {"drops": {"icmp_no_flow": 1}}),
    PipelineCase(
        "udp over ipv6: query dnated, answer snated back to the vip",
        (tx(udp6(CLIENT6, VIP6, 3333, 53, b"query"), udp6(CLIENT6, BACKEND6, 3333, 5353,
                                                          b"query")),
         tx(udp6(BACKEND6, CLIENT6, 5353, 3333, b"answer"), udp6(VIP6, CLIENT6, 53, 3333,
                                                                 b"answer"))),
        {"flow_new": 1, "flow_hit": 1, "vips": {3: (2, 2 * 40 + 2 * 8 + 5 + 6, 1)}}),
    PipelineCase(
        "ip fragment is dropped: it has no ports to balance on",
        (drop(IP(src=CLIENT, dst=VIP, flags="MF") / UDP(sport=CPORT, dport=80) / Raw(b"x" * 20),
              "fragment"),),
        {"drops": {"fragment": 1}}),
]


def dataplane() -> _core.Dataplane:
    """A fresh data plane with TABLE published."""
    dp = _core.Dataplane(workers=1, flow_capacity=4096, flow_seed=1)
    dp.publish(TABLE, seed=SEED)
    return dp
