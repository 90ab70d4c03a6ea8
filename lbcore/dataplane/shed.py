"""Shedding a SYN flood in the kernel, before the TUN queue: an eBPF filter on the TUN device.

Why here: one tun worker forwards about 110-120k packets/s on the 2-core lab machine. A flood
faster than that fills the TUN's queue, and the kernel then drops whatever comes next - the
flood and the packets of established connections alike - before the data plane's per-VIP
guard (``new_flow_rate``) ever sees them. The guard makes a refused packet cheap; it cannot
make the queue longer. So the flood must be thinned before it is queued.

What: a BPF_PROG_TYPE_SOCKET_FILTER program attached with TUNSETFILTEREBPF. The kernel runs
it in tun_net_xmit, before the packet goes into the queue's ring; a return of 0 drops the
packet there (counted in the device's tx_dropped). It matches only a TCP segment with SYN and
without ACK (a connection's first packet), not a later fragment, to a VIP address and port
that has ``new_flow_rate`` set; every other packet - and so every packet of an established
connection, which always carries ACK - is accepted untouched. Of the matching SYNs it drops a
share, chosen per VIP with the kernel's random number (bpf_get_prandom_u32 below a threshold).
Classic BPF (TUNATTACHFILTER, with SKF_AD_RANDOM) would do the same, but the kernel accepts it
on TAP devices only; TUNSETFILTEREBPF works on a TUN too, and an eBPF program can count and
remember.

Retries pass. A random share alone gives a real client's SYN the same poor odds as the
flood's, try after try (at a share of 0.9, a third of new connections still fail after three
tries, ~7 s). But a real client retransmits its SYN - same addresses, ports and sequence
number - after about 1 s, and a spoofed flood does not repeat itself. So the filter sets a bit
(a hash of source address, ports and sequence number) for every SYN it drops, and lets a SYN
whose bit is set pass. The bits are two generations of 2^25 (4 MiB each, mapped into this
process); the control loop clears the older one every MARK_GENERATION_S seconds, so a mark
lives 2-4 s. A flood SYN that hits a stale bit by chance passes too; those "retries" are
counted and taken out of the budget the lottery shares. A flood that sends each SYN twice
gets through this way - it then costs the sender twice as much, and the data plane's guard
still caps what passes.

The program reads its thresholds from an array map and counts, per VIP, the SYNs it saw, those
it dropped and those it passed as retries (atomic adds in the same map). The control loop
(:meth:`SynShed.run`, five times a second) reads the counters, so it knows the *offered* SYN
rate exactly - also the part the filter already dropped - and sets each VIP's share so that
what passes is about ``HEADROOM`` times its ``new_flow_rate``: share = 1 - (HEADROOM * rate -
retries) / (offered - retries), at most ``MAX_SHARE``, never below 0. The data plane's guard
then does the exact limiting on a stream the worker can read. When the flood ends the share
follows the offered rate down, at most halving per tick, so a flood that pauses for a moment
does not get a full queue on its return.

UDP VIPs with ``new_flow_rate`` are guarded too. A datagram carries no SYN; what tells a going
UDP flow from a new one is that a backend answered it, and the answers pass this filter on
their way into the TUN (a backend's reply, before translation). So every UDP packet into the
TUN that is not to a guarded VIP sets the bit of its destination (address, port: the client)
in the marks, and a datagram to a guarded VIP whose source has its bit passes; the others are
the new-flow candidates the share applies to (see ``_udp``).

What it cannot do: tell a spoofed SYN from a real one on its first try, or a new UDP flow's
first datagram from a flood's; a UDP flow the backends never answer is shed like a new one
while a flood lasts. Why not more workers instead: the lab gateway has
two cores and the flood's sender (or, in a rack, the NIC's interrupts) needs one; the filter's
drop happens in the sending context before the queue, at a fraction of a worker's per-packet
cost (a read, a parse, a write), so it scales with the flood where a worker cannot. Measured
in tests/test_flood_lab.py.

The program is written in eBPF instructions by :class:`_Prog` (no compiler at run time) and
loaded with the bpf(2) system call through ctypes.
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import ipaddress
import logging
import mmap
import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("lbcore.shed")

TUNSETFILTEREBPF = 0x800454E1          # _IOR('T', 225, int)
TUNGETIFF = 0x800454D2                 # _IOR('T', 210, unsigned int)
SYS_BPF = 321                          # x86_64
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_PROG_LOAD = 0, 1, 2, 5
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_FUNC_map_lookup_elem, BPF_FUNC_get_prandom_u32 = 1, 7

HEADROOM = 1.2        # what passes the filter: this many times the VIP's new_flow_rate
MAX_SHARE = 0.98      # a real client's SYN passes at least 1 try in 50
TICK_S = 0.2          # how often the control loop looks
MIN_SYNS = 200        # per second: below this offered rate a VIP is never shed
MARK_WORDS = 1 << 19  # per generation: 2^25 bits (4 MiB) for the hashes of dropped SYNs
MARK_GENERATION_S = 2.0   # a mark lives 2-4 s: a client's first SYN retry comes after 1 s
BPF_F_MMAPABLE = 1 << 10


# --------------------------------------------------------------------------- eBPF, by hand

# instruction classes and fields (linux/bpf.h, bpf_common.h)
_LD, _LDX, _ST, _STX, _ALU, _JMP, _JMP32, _ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
_W, _H, _B, _DW = 0x00, 0x08, 0x10, 0x18
_IMM, _ABS, _IND, _MEM, _ATOMIC = 0x00, 0x20, 0x40, 0x60, 0xC0
_K, _X = 0x00, 0x08
_ADD, _MUL, _OR, _LSH, _RSH, _AND, _XOR, _MOV = 0x00, 0x20, 0x40, 0x60, 0x70, 0x50, 0xA0, 0xB0
_JA, _JEQ, _JGE, _JNE, _JSET, _CALL, _EXIT, _JLT = 0x00, 0x10, 0x30, 0x50, 0x40, 0x80, 0x90, 0xA0
BPF_PSEUDO_MAP_FD = 1
R0, R1, R2, R6, R7, R8, R9, R10 = 0, 1, 2, 6, 7, 8, 9, 10

IPPROTO_TCP, IPPROTO_UDP = 6, 17
TCP_SYN, TCP_ACK = 0x02, 0x10
UDP_SALT = 0x2545F491     # a UDP client's hash starts here, a SYN's at 0: apart by design


class _Prog:
    """A tiny eBPF assembler: jumps name labels, resolved by :meth:`assemble`."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int, int, int, Any]] = []   # code, dst, src, off, imm
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def op(self, code: int, dst: int = 0, src: int = 0, off: Any = 0, imm: int = 0) -> None:
        self.insns.append((code, dst, src, off, imm))

    # packet loads (legacy LD_ABS/LD_IND: the value lands in r0 in host order; a load past
    # the packet ends the program with 0, i.e. a drop - only a truncated TCP header can
    # get there, which the data plane would drop too)
    def ld_abs(self, size: int, off: int) -> None:
        self.op(_LD | _ABS | size, imm=off)

    def ld_ind(self, size: int, reg: int, off: int) -> None:
        self.op(_LD | _IND | size, src=reg, imm=off)

    def mov(self, dst: int, imm: int) -> None:
        self.op(_ALU64 | _MOV | _K, dst, imm=imm)

    def movr(self, dst: int, src: int) -> None:
        self.op(_ALU64 | _MOV | _X, dst, src)

    def jmp32(self, cond: int, reg: int, imm: int, target: str) -> None:
        """32-bit compare (so an address above 2^31 compares as the u32 it is)."""
        self.op(_JMP32 | cond | _K, reg, off=target, imm=imm)

    def jnull(self, reg: int, target: str) -> None:
        """64-bit: the verifier knows a map value's NULL check only in this form."""
        self.op(_JMP | _JEQ | _K, reg, off=target, imm=0)

    def ja(self, target: str) -> None:
        self.op(_JMP | _JA, off=target)

    def ld_map(self, dst: int, fd: int) -> None:
        self.op(_LD | _IMM | _DW, dst, BPF_PSEUDO_MAP_FD, imm=fd)
        self.op(0, 0, 0, 0, 0)

    def lookup(self, map_fd: int, key_reg: int) -> None:
        """r0 = &map[key_reg] (or NULL); clobbers r1-r5, uses the stack's last 4 bytes."""
        self.op(_STX | _MEM | _W, R10, key_reg, off=-4)
        self.ld_map(R1, map_fd)
        self.movr(R2, R10)
        self.op(_ALU64 | _ADD | _K, R2, imm=-4)
        self.op(_JMP | _CALL, imm=BPF_FUNC_map_lookup_elem)

    def assemble(self) -> bytes:
        out = []
        for pc, (code, dst, src, off, imm) in enumerate(self.insns):
            if isinstance(off, str):
                off = self.labels[off] - pc - 1
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, off,
                                   imm - (1 << 32) if imm >= 1 << 31 else imm))
        return b"".join(out)


@dataclass(frozen=True)
class GuardedVip:
    """A VIP (address, port, protocol) with new_flow_rate set: TCP, the SYNs the filter may
    shed; UDP, the datagrams of clients the backends have not answered lately."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    rate: int
    name: str = ""
    proto: int = IPPROTO_TCP


Load = tuple[int, int | None, int]      # (size, offset register or None, offset): a packet load


class _ShedProg(_Prog):
    """The filter's building blocks over its two maps (see :func:`build_program`): ``n`` VIPs,
    the counters and thresholds in ``map_fd``, the marks in ``marks_fd``."""

    def __init__(self, n: int, map_fd: int, marks_fd: int) -> None:
        super().__init__()
        self.n, self.map_fd, self.marks_fd = n, map_fd, marks_fd

    def load(self, ld: Load) -> None:
        size, reg, off = ld
        if reg is None:
            self.ld_abs(size, off)
        else:
            self.ld_ind(size, reg, off)

    def hash(self, salt: int, xored: Sequence[Load], added: Load) -> None:
        """fp-8 = a 32-bit multiply-xor hash: ``salt`` xor the ``xored`` loads, times a
        constant, plus the ``added`` load, times another, folded (a bit index, not a secret)."""
        self.mov(R7, salt)
        for ld in xored:
            self.load(ld)
            self.op(_ALU | _XOR | _X, R7, R0)
        self.op(_ALU | _MUL | _K, R7, imm=0x9E3779B1)
        self.load(added)
        self.op(_ALU | _ADD | _X, R7, R0)
        self.op(_ALU | _MUL | _K, R7, imm=0x85EBCA6B)
        self.movr(R1, R7)
        self.op(_ALU | _RSH | _K, R1, imm=15)
        self.op(_ALU | _XOR | _X, R7, R1)
        self.op(_STX | _MEM | _W, R10, R7, off=-8)

    def vip_slot(self) -> None:
        """For the VIP of index r8: r9 = its threshold, r7 = n + 3i (its counters); no
        threshold (cannot happen: the map has every slot): accept."""
        self.lookup(self.map_fd, R8)
        self.jnull(R0, "accept")
        self.op(_LDX | _MEM | _DW, R9, R0, off=0)
        self.movr(R7, R8)
        self.op(_ALU64 | _ADD | _X, R7, R8)
        self.op(_ALU64 | _ADD | _X, R7, R8)
        self.op(_ALU64 | _ADD | _K, R7, imm=self.n)

    def count(self, key: int, skip: str) -> None:
        """map[r7 + key] += 1 (r7 = n + 3i); r1-r5 and r0 clobbered."""
        self.movr(R1, R7)
        self.op(_ALU64 | _ADD | _K, R1, imm=key)
        self.op(_STX | _MEM | _W, R10, R1, off=-4)
        self.ld_map(R1, self.map_fd)
        self.movr(R2, R10)
        self.op(_ALU64 | _ADD | _K, R2, imm=-4)
        self.op(_JMP | _CALL, imm=BPF_FUNC_map_lookup_elem)
        self.jnull(R0, skip)
        self.mov(R1, 1)
        self.op(_STX | _ATOMIC | _DW, R0, R1, off=0, imm=_ADD)

    def mark_key(self, gen_reg: int | None, gen: int = 0) -> None:
        """fp-4 = generation * MARK_WORDS + word of the hash; r2 = fp-4; r1 = the marks."""
        self.op(_LDX | _MEM | _W, R1, R10, off=-8)
        self.op(_ALU | _RSH | _K, R1, imm=6)
        self.op(_ALU | _AND | _K, R1, imm=MARK_WORDS - 1)
        if gen_reg is None:
            self.op(_ALU | _ADD | _K, R1, imm=gen * MARK_WORDS)
        else:
            self.op(_ALU | _ADD | _X, R1, gen_reg)
        self.op(_STX | _MEM | _W, R10, R1, off=-4)
        self.ld_map(R1, self.marks_fd)
        self.movr(R2, R10)
        self.op(_ALU64 | _ADD | _K, R2, imm=-4)

    def bit(self, dst: int) -> None:
        """dst = 1 << (hash & 63); clobbers r1."""
        self.op(_LDX | _MEM | _W, R1, R10, off=-8)
        self.op(_ALU64 | _AND | _K, R1, imm=63)
        self.mov(dst, 1)
        self.op(_ALU64 | _LSH | _X, dst, R1)

    def test_marks(self, hit: str, tag: str) -> None:
        """Jump to ``hit`` if the hash's bit is set in either generation; clobbers r8."""
        for g in (0, 1):
            self.mark_key(None, g)
            self.op(_JMP | _CALL, imm=BPF_FUNC_map_lookup_elem)
            self.jnull(R0, f"{tag}{g}")
            self.op(_LDX | _MEM | _DW, R8, R0, off=0)
            self.bit(R2)
            self.op(_JMP | _JSET | _X, R8, R2, off=hit)
            self.label(f"{tag}{g}")

    def set_mark(self, out: str, only_if_clear: bool = False) -> None:
        """Set the hash's bit in the current generation, then go on (or to ``out`` if a map
        lookup fails). Not atomic: a bit lost to a race is set again by the next packet that
        sets it. ``only_if_clear``: a bit already set is not written again (to ``out``),
        which keeps its cache line clean for a stream of packets that all set it."""
        self.mov(R1, 4 * self.n)
        self.op(_STX | _MEM | _W, R10, R1, off=-4)
        self.ld_map(R1, self.map_fd)
        self.movr(R2, R10)
        self.op(_ALU64 | _ADD | _K, R2, imm=-4)
        self.op(_JMP | _CALL, imm=BPF_FUNC_map_lookup_elem)
        self.jnull(R0, out)
        self.op(_LDX | _MEM | _DW, R8, R0, off=0)
        self.op(_ALU64 | _AND | _K, R8, imm=1)
        self.op(_ALU64 | _MUL | _K, R8, imm=MARK_WORDS)
        self.mark_key(R8)
        self.op(_JMP | _CALL, imm=BPF_FUNC_map_lookup_elem)
        self.jnull(R0, out)
        self.bit(R2)
        self.op(_LDX | _MEM | _DW, R1, R0, off=0)
        if only_if_clear:
            self.op(_JMP | _JSET | _X, R1, R2, off=out)
        self.op(_ALU64 | _OR | _X, R1, R2)
        self.op(_STX | _MEM | _DW, R0, R1, off=0)


def _udp(p: _ShedProg, udp: Sequence[tuple[int, GuardedVip]]) -> None:
    """The UDP part of the filter. UDP has no SYN: what tells a new flow from a going one is
    whether a backend answered it. Every UDP packet into the TUN that is not to a guarded VIP
    - a backend's reply, on its way to be translated - sets the bit of its destination (the
    client's address and port) in the current generation of the marks. A datagram to a
    guarded VIP whose source has its bit set (in either generation: answered within the
    last 2-4 s) is a going flow's and passes, counted as "passed anyway" while shedding; any
    other is a new-flow candidate, counted as seen, and shed by the VIP's share as a SYN is.
    So a flow the backend answers keeps its packets through a flood; one it never answers
    (syslog, one-way) takes the lottery while the flood lasts. The hash of (address, port)
    is the same for a request's source and its reply's destination."""

    def key(addr_offs: Sequence[int], port: Load) -> None:
        p.hash(UDP_SALT, [(_W, None, off) for off in addr_offs], port)

    p.label("v4udp")
    p.ld_abs(_H, 6)
    p.jmp32(_JSET, R0, 0x1FFF, "accept")             # a later fragment: no UDP header
    p.ld_abs(_B, 0)
    p.op(_ALU64 | _AND | _K, R0, imm=0x0F)
    p.op(_ALU64 | _LSH | _K, R0, imm=2)
    p.movr(R8, R0)                                   # IPv4 header length
    p.ld_ind(_H, R8, 2)
    p.movr(R9, R0)                                   # destination port
    p.ld_abs(_W, 16)
    for i, v in udp:
        if v.address.version == 4:
            p.jmp32(_JNE, R0, int(v.address), f"u4next{i}")
            p.jmp32(_JNE, R9, v.port, f"u4next{i}")
            p.mov(R9, i)
            p.ja("u4req")
            p.label(f"u4next{i}")
    key([16], (_H, R8, 2))                           # not to a guarded VIP: a reply, maybe
    p.ja("umark")
    if any(v.address.version == 4 for _, v in udp):
        p.label("u4req")
        key([12], (_H, R8, 0))
        p.movr(R8, R9)
        p.ja("ushed")

    p.label("v6udp")                                 # no extension headers: UDP right away
    p.ld_abs(_H, 40 + 2)
    p.movr(R9, R0)
    for i, v in udp:
        if v.address.version == 6:
            words = struct.unpack("!4I", v.address.packed)
            for j, w in enumerate(words):
                p.ld_abs(_W, 24 + 4 * j)
                p.jmp32(_JNE, R0, w, f"u6next{i}")
            p.jmp32(_JNE, R9, v.port, f"u6next{i}")
            p.mov(R9, i)
            p.ja("u6req")
            p.label(f"u6next{i}")
    key([24, 28, 32, 36], (_H, None, 40 + 2))
    p.ja("umark")
    if any(v.address.version == 6 for _, v in udp):
        p.label("u6req")
        key([8, 12, 16, 20], (_H, None, 40))
        p.movr(R8, R9)
        p.ja("ushed")

    p.label("umark")                                 # a reply: its client is answered
    p.set_mark("accept", only_if_clear=True)
    p.ja("accept")

    p.label("ushed")                                 # r8 = the VIP's index, fp-8 the client
    p.vip_slot()
    p.test_marks("uknown", "unomark")                # answered lately?
    p.count(0, "useen")                              # new-flow datagrams seen
    p.label("useen")
    p.jmp32(_JEQ, R9, 0, "accept")                   # not shedding
    p.op(_JMP | _CALL, imm=BPF_FUNC_get_prandom_u32)
    p.op(_JMP32 | _JGE | _X, R0, R9, off="accept")   # random >= threshold: it passes
    p.count(1, "drop")                               # dropped
    p.ja("drop")
    p.label("uknown")                                # a going flow's: passes
    p.jmp32(_JEQ, R9, 0, "accept")
    p.count(2, "accept")                             # counted while shedding
    p.ja("accept")


def build_program(vips: Sequence[GuardedVip], map_fd: int, marks_fd: int) -> bytes:
    """The TUN filter for ``vips``. Map ``map_fd``: slot i is VIP i's threshold (a new-flow
    packet is a candidate for dropping when the random u32 is below it); slots n + 3i,
    n + 3i + 1 and n + 3i + 2 count its new-flow packets seen, dropped, and passed anyway (TCP:
    as the retry of a dropped SYN; UDP: while shedding, from a known client); slot 4n is the
    current generation of the marks. Map ``marks_fd``: two generations of MARK_WORDS words,
    one bit per hash of a dropped SYN's (source address, ports, sequence number) and one per
    hash of a UDP client (address, port) a backend answered (see :func:`_udp`)."""
    tcp = [(i, v) for i, v in enumerate(vips) if v.proto == IPPROTO_TCP]
    udp = [(i, v) for i, v in enumerate(vips) if v.proto == IPPROTO_UDP]
    p = _ShedProg(len(vips), map_fd, marks_fd)
    p.movr(R6, R1)                                   # LD_ABS wants the skb in r6
    p.ld_abs(_B, 0)
    p.op(_ALU64 | _AND | _K, R0, imm=0xF0)
    p.jmp32(_JEQ, R0, 0x40, "v4")
    p.jmp32(_JEQ, R0, 0x60, "v6")
    p.ja("accept")

    # a SYN's hash: (source address, sequence number, ports); a spoofed SYN would need the
    # same sequence number to pass as a retry
    p.label("v4")
    p.ld_abs(_B, 9)
    if udp:
        p.jmp32(_JEQ, R0, IPPROTO_UDP, "v4udp")
    p.jmp32(_JNE, R0, IPPROTO_TCP, "accept")
    p.ld_abs(_H, 6)
    p.jmp32(_JSET, R0, 0x1FFF, "accept")             # a later fragment: no TCP header
    p.ld_abs(_B, 0)
    p.op(_ALU64 | _AND | _K, R0, imm=0x0F)
    p.op(_ALU64 | _LSH | _K, R0, imm=2)
    p.movr(R8, R0)                                   # IPv4 header length
    p.ld_ind(_B, R8, 13)                             # TCP flags
    p.op(_ALU64 | _AND | _K, R0, imm=TCP_SYN | TCP_ACK)
    p.jmp32(_JNE, R0, TCP_SYN, "accept")
    p.hash(0, [(_W, None, 12), (_W, R8, 4)], (_W, R8, 0))
    p.ld_ind(_H, R8, 2)
    p.movr(R9, R0)                                   # destination port
    p.ld_abs(_W, 16)                                 # destination address
    for i, v in tcp:
        if v.address.version == 4:
            p.jmp32(_JNE, R0, int(v.address), f"v4next{i}")
            p.jmp32(_JEQ, R9, v.port, f"vip{i}")
            p.label(f"v4next{i}")
    p.ja("accept")

    p.label("v6")                                    # no extension headers: TCP right away
    p.ld_abs(_B, 6)
    if udp:
        p.jmp32(_JEQ, R0, IPPROTO_UDP, "v6udp")
    p.jmp32(_JNE, R0, IPPROTO_TCP, "accept")
    p.ld_abs(_B, 40 + 13)
    p.op(_ALU64 | _AND | _K, R0, imm=TCP_SYN | TCP_ACK)
    p.jmp32(_JNE, R0, TCP_SYN, "accept")
    p.hash(0, [(_W, None, off) for off in (8, 12, 16, 20, 44)], (_W, None, 40))
    p.ld_abs(_H, 40 + 2)
    p.movr(R9, R0)
    for i, v in tcp:
        if v.address.version == 6:
            words = struct.unpack("!4I", v.address.packed)
            for j, w in enumerate(words):
                p.ld_abs(_W, 24 + 4 * j)
                p.jmp32(_JNE, R0, w, f"v6next{i}")
            p.jmp32(_JEQ, R9, v.port, f"vip{i}")
            p.label(f"v6next{i}")
    p.ja("accept")

    for i, _ in tcp:
        p.label(f"vip{i}")
        p.mov(R8, i)
        p.ja("shed")

    if udp:
        _udp(p, udp)

    if tcp:                                          # (the verifier refuses dead code)
        p.label("shed")                              # r8 = the VIP's index
        p.vip_slot()
        p.count(0, "seen")                           # SYNs seen
        p.label("seen")
        p.jmp32(_JEQ, R9, 0, "accept")               # not shedding: no marks either
        p.test_marks("retry", "nomark")              # a retry of a SYN dropped lately?
        p.op(_JMP | _CALL, imm=BPF_FUNC_get_prandom_u32)
        p.op(_JMP32 | _JGE | _X, R0, R9, off="accept")   # random >= threshold: it passes
        p.count(1, "counted")                        # SYNs dropped
        p.label("counted")
        p.set_mark("drop")                           # so that its retry passes
    p.label("drop")
    p.mov(R0, 0)
    p.op(_JMP | _EXIT)
    if tcp:
        p.label("retry")
        p.count(2, "accept")                         # a retry: passes, and is counted
    p.label("accept")
    p.mov(R0, -1)                                    # keep the whole packet
    p.op(_JMP | _EXIT)
    return p.assemble()


# --------------------------------------------------------------------------- bpf(2)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: bytes | bytearray) -> int:
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    r = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), buf, ctypes.c_uint(128))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return int(r)


def _map_create(entries: int, flags: int = 0) -> int:
    return _bpf(BPF_MAP_CREATE, struct.pack("=IIIII", BPF_MAP_TYPE_ARRAY, 4, 8, entries, flags))


def _map_get(fd: int, key: int) -> int:
    k, v = ctypes.c_uint32(key), ctypes.c_uint64(0)
    _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IxxxxQQQ", fd, ctypes.addressof(k),
                                          ctypes.addressof(v), 0))
    return int(v.value)


def _map_set(fd: int, key: int, value: int) -> None:
    k, v = ctypes.c_uint32(key), ctypes.c_uint64(value)
    _bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IxxxxQQQ", fd, ctypes.addressof(k),
                                          ctypes.addressof(v), 0))


def _prog_load(code: bytes) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")   # the helpers used are not GPL-only either
    logbuf = ctypes.create_string_buffer(65536)
    attr = struct.pack("=IIQQIIQ", BPF_PROG_TYPE_SOCKET_FILTER, len(code) // 8,
                       ctypes.addressof(insns), ctypes.addressof(lic), 1, len(logbuf),
                       ctypes.addressof(logbuf))
    try:
        return _bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        raise OSError(e.errno, f"loading the SYN shed filter: {e.strerror}: "
                      f"{logbuf.value.decode(errors='replace')[-2000:]}") from e


# --------------------------------------------------------------------------- the shed

@dataclass
class VipShed:
    """One guarded VIP's share and counters, as `status` shows them."""

    vip: GuardedVip
    share: float = 0.0
    syns: int = 0            # SYNs the filter saw (offered, shed or not)
    shed: int = 0            # of them dropped by the filter
    retried: int = 0         # of them passed as the retry of a dropped one
    syn_rate: float | None = None
    last_active: float | None = None   # wall-clock time the share was last above 0


@dataclass
class _Loaded:
    """One loaded filter: its maps (the marks mapped into this process too) and program."""

    map_fd: int
    marks_fd: int
    marks: mmap.mmap
    prog_fd: int

    @classmethod
    def load(cls, vips: Sequence[GuardedVip]) -> _Loaded:
        fds: list[int] = []
        try:
            fds.append(_map_create(4 * len(vips) + 1))
            fds.append(_map_create(2 * MARK_WORDS, BPF_F_MMAPABLE))
            marks = mmap.mmap(fds[1], 2 * MARK_WORDS * 8)
            try:
                prog = _prog_load(build_program(vips, fds[0], fds[1]))
            except OSError:
                marks.close()
                raise
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return cls(fds[0], fds[1], marks, prog)

    def close(self) -> None:
        self.marks.close()
        for fd in (self.prog_fd, self.map_fd, self.marks_fd):
            os.close(fd)


@dataclass
class SynShed:
    """The TUN's SYN shed filter and its control loop (see the module docstring)."""

    vips: list[VipShed]
    loaded: _Loaded | None = None
    tun_fd: int = -1
    tun_index: int = 0
    last_tun_dropped: int | None = None  # the TUN's tx_dropped as last read (run())
    since: float | None = None          # wall-clock time the current shedding began
    generation: int = 0                 # of the marks: the one the filter sets now
    _rotated: float = 0.0
    _last: tuple[float, list[int]] | None = field(default=None, repr=False)

    @classmethod
    def for_tun(cls, tun_fd: int, vips: Iterable[GuardedVip]) -> SynShed | None:
        """Attach the filter for ``vips`` to the TUN of queue ``tun_fd`` (the program is the
        device's, for every queue). With no VIP guarded the filter stays idle (no program)
        until a reload guards one. None when the kernel refuses the program (no bpf(2), too
        old): logged, the TUN is left as it was, and the data plane's guard still works, just
        behind the queue."""
        self = cls([])
        self.tun_fd = tun_fd
        self.tun_index = _tun_index(tun_fd)
        # the TUN outlives the process, and so would a program a last run attached (with that
        # run's shares): start from none
        try:
            fcntl.ioctl(tun_fd, TUNSETFILTEREBPF, struct.pack("i", -1))
        except OSError:
            pass                      # no program, or a kernel without the ioctl
        vips = list(vips)
        if not vips:
            return self
        try:
            self._attach(vips)
        except OSError as e:
            log.warning("no SYN shedding before the TUN queue (%s); new_flow_rate still "
                        "acts in the data plane", e)
            return None
        log.info("SYN shed filter on the TUN for %d VIP(s): %s", len(vips),
                 ", ".join(f"{v.address}:{v.port}" for v in vips))
        return self

    def _attach(self, vips: list[GuardedVip]) -> None:
        """Load a program for ``vips`` and swap it in with one ioctl (the kernel replaces the
        old program atomically); ``vips=[]`` takes the program away. On OSError nothing has
        changed."""
        new = _Loaded.load(vips) if vips else None
        try:
            fcntl.ioctl(self.tun_fd, TUNSETFILTEREBPF,
                        struct.pack("i", new.prog_fd if new is not None else -1))
        except OSError:
            if new is not None:
                new.close()
            raise
        self.close()
        self.loaded = new
        self.vips = [VipShed(v) for v in vips]
        self._last = None
        self.since = None
        self.generation = 0
        self._rotated = 0.0

    def reconfigure(self, vips: Iterable[GuardedVip]) -> None:
        """A reload: new rates apply at the next tick; a changed set of guarded VIPs gets a
        new program and maps (or none, when no VIP is guarded any more). A kernel that
        refuses the new program leaves the old one in place (logged, never raised: the
        reload itself has been applied)."""
        vips = list(vips)
        if [(v.address, v.port, v.proto) for v in vips] == [
                (v.vip.address, v.vip.port, v.vip.proto) for v in self.vips]:
            self.vips = [VipShed(v, o.share, o.syns, o.shed, o.retried, o.syn_rate,
                                 o.last_active) for v, o in zip(vips, self.vips, strict=True)]
            return
        try:
            self._attach(vips)
        except OSError as e:
            log.error("SYN shed: the reload's VIPs get no new filter (%s)", e)
            return
        log.info("SYN shed filter on the TUN now for %d VIP(s)%s", len(vips),
                 ": " + ", ".join(f"{v.address}:{v.port}" for v in vips) if vips else "")

    def tun_dropped(self) -> int | None:
        """The TUN's tx_dropped: packets the kernel dropped on their way into a queue, this
        filter's and a full queue's together (the kernel counts both there). None if the
        device cannot be read. Blocking: not on the event loop."""
        try:
            from pyroute2 import IPRoute
            with IPRoute() as ipr:
                links = ipr.get_links(self.tun_index) if self.tun_index else []
                stats = links[0].get_attr("IFLA_STATS64") if links else None
                return int(stats["tx_dropped"]) if stats else None
        except Exception as e:  # noqa: BLE001 - a status field; never fatal
            log.warning("reading the TUN's counters: %s", e)
            return None

    def close(self) -> None:
        """Close our descriptors and mapping (the TUN holds the program while it exists)."""
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    def counters(self) -> list[int]:
        """Per VIP: SYNs seen, dropped, passed as retries (3 values each)."""
        assert self.loaded is not None
        n = len(self.vips)
        return [_map_get(self.loaded.map_fd, n + k) for k in range(3 * n)]

    def set_share(self, i: int, share: float) -> None:
        assert self.loaded is not None
        share = min(max(share, 0.0), MAX_SHARE)
        self.vips[i].share = share
        _map_set(self.loaded.map_fd, i, int(share * 0xFFFFFFFF))

    def rotate(self, now: float) -> None:
        """Every MARK_GENERATION_S: clear the older generation of marks and make it the one
        the filter sets (the filter looks in both), so a mark lives 1-2 generations."""
        if now - self._rotated < MARK_GENERATION_S or self.loaded is None:
            return
        self._rotated = now
        gen = 1 - self.generation
        half = MARK_WORDS * 8
        self.loaded.marks[gen * half:(gen + 1) * half] = bytes(half)
        _map_set(self.loaded.map_fd, 4 * len(self.vips), gen)
        self.generation = gen

    def tick(self, now: float) -> None:
        """Read the counters, set every VIP's share for the next tick."""
        if not self.vips:                   # idle: no program to read
            return
        self.rotate(now)
        c = self.counters()
        for i, vs in enumerate(self.vips):
            vs.syns, vs.shed, vs.retried = c[3 * i], c[3 * i + 1], c[3 * i + 2]
        last, self._last = self._last, (now, c)
        if last is None or now <= last[0]:
            return
        dt = now - last[0]
        wall = time.time()
        for i, vs in enumerate(self.vips):
            offered = (c[3 * i] - last[1][3 * i]) / dt
            # a known UDP client's datagram is no new flow: it takes nothing of the budget
            retries = ((c[3 * i + 2] - last[1][3 * i + 2]) / dt
                       if vs.vip.proto == IPPROTO_TCP else 0.0)
            vs.syn_rate = offered
            want = 0.0
            if offered >= MIN_SYNS:
                # the retries pass anyway: the lottery shares what is left of the budget
                budget = max(0.0, HEADROOM * vs.vip.rate - retries)
                want = 1.0 - budget / max(1.0, offered - retries)
            share = max(want, vs.share / 2 if vs.share > 0.01 else 0.0)
            self.set_share(i, share)
            if vs.share > 0:
                vs.last_active = wall
        active = any(v.share > 0 for v in self.vips)
        if active and self.since is None:
            self.since = wall
            log.warning("SYN flood: shedding %s before the TUN queue", self._describe())
        elif not active and self.since is not None:
            self.since = None
            log.warning("SYN flood over: no more shedding")

    def _describe(self) -> str:
        return ", ".join(f"{v.share:.0%} of {v.syn_rate or 0:.0f}/s to "
                         f"{v.vip.address}:{v.vip.port}" for v in self.vips if v.share > 0)

    async def run(self) -> None:
        """The control loop, until cancelled; the TUN's drop counter is read once a second,
        in a thread (pyroute2's synchronous socket cannot run on the event loop)."""
        n = 0
        while True:
            try:
                self.tick(time.monotonic())
            except OSError as e:        # never fatal: the guard in the data plane remains
                log.error("SYN shed: %s", e)
            if n % round(1.0 / TICK_S) == 0:
                self.last_tun_dropped = await asyncio.to_thread(self.tun_dropped)
            n += 1
            await asyncio.sleep(TICK_S)

    def status(self) -> dict[str, Any]:
        """For `lbcore status`: whether shedding, since when, and per VIP."""
        return {"filter": "tun-ebpf" if self.loaded is not None else "idle",
                "tun_dropped": self.last_tun_dropped,
                "active": self.since is not None, "since": self.since,
                "max_share": MAX_SHARE, "headroom": HEADROOM,
                "vips": [{"address": str(v.vip.address), "port": v.vip.port,
                          "protocol": "tcp" if v.vip.proto == IPPROTO_TCP else "udp",
                          "name": v.vip.name, "new_flow_rate": v.vip.rate,
                          "share": v.share, "syns": v.syns, "shed": v.shed,
                          "retried": v.retried,
                          "syn_rate": v.syn_rate, "last_active": v.last_active}
                         for v in self.vips]}


def _tun_index(tun_fd: int) -> int:
    """The ifindex of the TUN of queue ``tun_fd`` (TUNGETIFF gives its name); 0 if unknown."""
    try:
        ifr = fcntl.ioctl(tun_fd, TUNGETIFF, bytes(40))
        return socket.if_nametoindex(ifr[:16].rstrip(b"\0").decode())
    except OSError:
        return 0


def guarded_vips(config: Any) -> list[GuardedVip]:
    """The TCP and UDP VIPs of ``config`` with new_flow_rate set."""
    out = []
    for v in config.vips:
        rate = int(getattr(v, "new_flow_rate", 0) or 0)
        if v.protocol in ("tcp", "udp") and rate > 0:
            out.append(GuardedVip(ipaddress.ip_address(v.address), v.port, rate, v.name,
                                  IPPROTO_TCP if v.protocol == "tcp" else IPPROTO_UDP))
    return out


__all__ = ["GuardedVip", "SynShed", "build_program", "guarded_vips"]
