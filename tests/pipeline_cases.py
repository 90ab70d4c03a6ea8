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

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
    fragment6,
)
from scapy.packet import Raw

from lbcore import _core

CLIENT, VIP, BACKEND = "198.18.0.2", "198.18.100.1", "198.19.0.11"
VIP_EMPTY = "198.18.100.2"          # a VIP whose pool is empty
VIP_REJECT = "198.18.100.3"         # closed_port = "reject"
ROUTER = "198.18.0.254"             # sends ICMP errors about the VIP's replies
CLIENT6, VIP6, BACKEND6 = "2001:db8::2", "2001:db8:100::1", "2001:db8:1::11"
CPORT = 40000
SEED = 42                            # selection seed of the published table
NOW = 1000                           # the data plane's clock, ms

# (address, port, proto, stat id, ring size, [(address, port, weight, stat id, draining)])
TABLE = [
    (VIP, 80, "tcp", 1, 65537, [(BACKEND, 8080, 1, 101, False)]),
    (VIP_EMPTY, 80, "tcp", 2, 65537, []),
    (VIP6, 53, "udp", 3, 65537, [(BACKEND6, 5353, 1, 103, False)], {"closed_port": "reject"}),
    (VIP, 5300, "udp", 4, 65537, [(BACKEND, 5301, 1, 104, False)]),
    (VIP_REJECT, 80, "tcp", 5, 65537, [(BACKEND, 8081, 1, 105, False)],
     {"closed_port": "reject"}),
]

TX, DROP = _core.VERDICT_TX, _core.VERDICT_DROP
REPLY, HOLD, PASS = _core.VERDICT_REPLY, _core.VERDICT_HOLD, _core.VERDICT_PASS


@dataclass(frozen=True)
class Step:
    """One packet in: the verdict, the drop reason and the bytes out."""
    packet: bytes
    verdict: int
    reason: str
    expected: bytes
    # extra packets the step sends (released fragments, ICMP errors), in any order
    extras: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class PipelineCase:
    description: str
    steps: tuple[Step, ...]
    # a subset of Dataplane.stats() after the last step (drops by reason
    # under "drops")
    counters: dict = field(default_factory=dict)


def tx(packet, expected) -> Step:
    return Step(bytes(packet), TX, "none", bytes(expected))


def drop(packet, reason: str, extras=()) -> Step:
    return Step(bytes(packet), DROP, reason, bytes(packet), tuple(bytes(x) for x in extras))


def reply(packet, expected, reason: str = "none") -> Step:
    return Step(bytes(packet), REPLY, reason, bytes(expected))


def hold(packet) -> Step:
    return Step(bytes(packet), HOLD, "none", bytes(packet))


def passed(packet) -> Step:
    return Step(bytes(packet), PASS, "none", bytes(packet))


def tx_with(packet, expected, extras) -> Step:
    return Step(bytes(packet), TX, "none", bytes(expected), tuple(bytes(x) for x in extras))


# A 3000-byte UDP datagram to VIP:5300 in three fragments, and the same datagram as the
# backend gets it (NAT by the first fragment's checksum alone: scapy computes it over the
# whole datagram, so the bytes must match exactly)
DGRAM = b"".join(bytes([i % 251]) for i in range(3000))
FRAGS = fragment(IP(src=CLIENT, dst=VIP, id=4242) / UDP(sport=CPORT, dport=5300) / DGRAM,
                 fragsize=1200)
FRAGS_OUT = fragment(IP(src=CLIENT, dst=BACKEND, id=4242) / UDP(sport=CPORT, dport=5301)
                     / DGRAM, fragsize=1200)
FRAG6 = IPv6ExtHdrFragment(id=0xABCDEF)
FRAGS6 = fragment6(IPv6(src=CLIENT6, dst=VIP6) / FRAG6 / UDP(sport=3333, dport=53) / DGRAM,
                   1280)
FRAGS6_OUT = fragment6(IPv6(src=CLIENT6, dst=BACKEND6) / FRAG6 / UDP(sport=3333, dport=5353)
                       / DGRAM, 1280)


# a backend's TCP reply of the flow SYN opens, cut in fragments by the backend (DF off), and
# as the client gets it; the backend's own UDP datagram to a client-side address, fragmented
TCP_FRAGS = fragment(IP(src=BACKEND, dst=CLIENT, id=777, flags=0)
                     / TCP(sport=8080, dport=CPORT, flags="PA") / DGRAM, fragsize=1200)
TCP_FRAGS_OUT = fragment(IP(src=VIP, dst=CLIENT, id=777, flags=0)
                         / TCP(sport=80, dport=CPORT, flags="PA") / DGRAM, fragsize=1200)
OWN_FRAGS = fragment(IP(src=BACKEND, dst=CLIENT, id=778) / UDP(sport=9999, dport=7071)
                     / DGRAM, fragsize=1200)
OWN_FRAGS6 = fragment6(IPv6(src=BACKEND6, dst=CLIENT6) / IPv6ExtHdrFragment(id=779)
                       / UDP(sport=12345, dport=7071) / DGRAM, 1280)
OWN_TCP_FRAGS6 = fragment6(IPv6(src=BACKEND6, dst=CLIENT6) / IPv6ExtHdrFragment(id=780)
                           / TCP(sport=12345, dport=7070, flags="PA") / DGRAM, 1280)


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
        "vip address on a port it does not serve is dropped as closed_port",
        (drop(tcp4(CLIENT, VIP, CPORT, 81), "closed_port"),),
        {"drops": {"closed_port": 1}, "resets": 0}),
    PipelineCase(
        "closed_port reject: a syn to a closed port gets an rst",
        (reply(tcp4(CLIENT, VIP_REJECT, CPORT, 81),
               IP(src=VIP_REJECT, dst=CLIENT, flags="DF", id=0)
               / TCP(sport=81, dport=CPORT, flags="RA", seq=0, ack=1, window=0),
               "closed_port"),),
        {"drops": {"closed_port": 1}, "resets": 1, "tx": 1}),
    PipelineCase(
        "closed_port reject: an ack to a closed port gets an rst with its ack as seq",
        (reply(IP(src=CLIENT, dst=VIP_REJECT) / TCP(sport=CPORT, dport=81, flags="A",
                                                    seq=5, ack=777) / Raw(b"data"),
               IP(src=VIP_REJECT, dst=CLIENT, flags="DF", id=0)
               / TCP(sport=81, dport=CPORT, flags="R", seq=777, ack=0, window=0),
               "closed_port"),),
        {"resets": 1}),
    PipelineCase(
        "closed_port reject over ipv6 udp: icmpv6 port unreachable quoting the packet",
        (drop(udp6(CLIENT6, VIP6, 3333, 54, b"query"), "closed_port",
              (IPv6(src=VIP6, dst=CLIENT6) / ICMPv6DestUnreach(code=4)
               / udp6(CLIENT6, VIP6, 3333, 54, b"query"),)),),
        {"drops": {"closed_port": 1}, "unreachables": 1}),
    PipelineCase(
        "an rst to a closed port is never answered",
        (drop(tcp4(CLIENT, VIP_REJECT, CPORT, 81, "R"), "closed_port"),),
        {"resets": 0}),
    PipelineCase(
        "icmp echo to a vip address is answered",
        (reply(IP(src=CLIENT, dst=VIP) / ICMP(id=7, seq=1) / Raw(b"ping"),
               IP(src=VIP, dst=CLIENT) / ICMP(type=0, id=7, seq=1) / Raw(b"ping")),),
        {"echo_replies": 1, "tx": 1}),
    PipelineCase(
        "icmpv6 echo to a vip address is answered",
        (reply(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoRequest(id=7, seq=1, data=b"ping"),
               IPv6(src=VIP6, dst=CLIENT6) / ICMPv6EchoReply(id=7, seq=1, data=b"ping")),),
        {"echo_replies": 1}),
    PipelineCase(
        "icmp echo to another address is not ours",
        (drop(IP(src=CLIENT, dst="198.18.100.9") / ICMP(id=7, seq=1), "unsupported"),),
        {"echo_replies": 0}),
    PipelineCase(
        "udp fragments in order: the first is balanced, the others follow its decision",
        tuple(tx(f, g) for f, g in zip(FRAGS, FRAGS_OUT, strict=True)),
        {"tx": 3, "flow_new": 1}),
    PipelineCase(
        "udp fragments in reverse order: held until the first, then released translated",
        (hold(FRAGS[2]), hold(FRAGS[1]),
         tx_with(FRAGS[0], FRAGS_OUT[0], (FRAGS_OUT[1], FRAGS_OUT[2]))),
        {"tx": 3, "flow_new": 1}),
    PipelineCase(
        "ipv6 udp fragments, last first",
        (hold(FRAGS6[-1]),
         tx_with(FRAGS6[0], FRAGS6_OUT[0], (FRAGS6_OUT[-1],)),
         *(tx(f, g) for f, g in zip(FRAGS6[1:-1], FRAGS6_OUT[1:-1], strict=True))),
        {"flow_new": 1}),
    PipelineCase(
        "fragments of a datagram to a closed port: the first refused, the rest follow",
        (drop(fragment(IP(src=CLIENT, dst=VIP, id=9) / UDP(sport=CPORT, dport=81) / DGRAM,
                       fragsize=1200)[0], "closed_port"),
         drop(fragment(IP(src=CLIENT, dst=VIP, id=9) / UDP(sport=CPORT, dport=81) / DGRAM,
                       fragsize=1200)[1], "closed_port")),
        {"drops": {"closed_port": 2}}),
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
        "a later fragment to no vip address and from no backend is not ours",
        (drop(IP(src=CLIENT, dst="198.18.100.9", frag=100, proto=17) / Raw(b"x" * 24),
              "no_vip"),),
        {"drops": {"no_vip": 1}}),
    PipelineCase(
        "a backend's fragmented tcp reply of a flow is translated, every fragment",
        (tx(SYN, SYN_OUT),) + tuple(tx(f, o) for f, o in zip(TCP_FRAGS, TCP_FRAGS_OUT,
                                                                  strict=True)),
        {"flow_hit": 1, "passed": 0}),
    PipelineCase(
        "a backend's own tcp, no reply of any flow, is passed unchanged",
        (passed(tcp4(BACKEND, CLIENT, 12345, 7070, "S")),),
        {"passed": 1, "tx": 0, "drops": {"no_vip": 0}}),
    PipelineCase(
        "a backend's own fragmented udp is passed, its later fragments too",
        tuple(passed(f) for f in OWN_FRAGS),
        {"passed": len(OWN_FRAGS), "drops": {"no_vip": 0, "fragment": 0}}),
    PipelineCase(
        "a backend's own fragmented udp over ipv6 is passed",
        tuple(passed(f) for f in OWN_FRAGS6),
        {"passed": len(OWN_FRAGS6)}),
    PipelineCase(
        # BACKEND6 serves UDP only: the reply path has no TCP rule for it, its TCP is the
        # kernel's (a coarse rawsock filter may still let a copy through)
        "a backend's own tcp of a protocol none of its vips has is not passed",
        (drop(OWN_TCP_FRAGS6[0], "no_vip"),),
        {"passed": 0, "drops": {"no_vip": 1}}),
    PipelineCase(
        "a later fragment of a backend's own datagram held before its first is dropped",
        (hold(OWN_FRAGS[1]), passed(OWN_FRAGS[0]), passed(OWN_FRAGS[2])),
        {"passed": 2}),
    PipelineCase(
        "from no backend's address nothing is passed",
        (drop(tcp4(CLIENT, "198.18.0.9", 12345, 7070, "S"), "no_vip"),),
        {"passed": 0, "drops": {"no_vip": 1}}),
    PipelineCase(
        "a backend's packet to a vip address is no pass: the vip's closed port",
        (drop(tcp4(BACKEND, VIP, 12345, 81, "S"), "closed_port"),),
        {"passed": 0}),
]


def dataplane() -> _core.Dataplane:
    """A fresh data plane with TABLE published."""
    dp = _core.Dataplane(workers=1, flow_capacity=4096, flow_seed=1)
    dp.publish(TABLE, seed=SEED)
    return dp
