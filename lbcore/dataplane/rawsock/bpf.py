"""The rawsock sockets' classic-BPF filters: a tiny assembler and the filter generator.

On the client link a socket takes only frames to a VIP (and ARP for them); on the backend
link what the reply path's policy rules keep from the kernel - everything of the protocol from
a backend's address (its replies, whole or in fragments, and its own traffic through the
gateway), or for a port path without such a rule the replies from a (backend, protocol, port)
of the config - unless addressed to the gateway itself (its own health checks) or to a
multicast or broadcast address. lbcore.reference.bpf runs these programs in Python for the
tests.
"""
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from typing import Any

from ..replies import FRAGMENTS, IPAddress, ReplyPath

# opcodes (linux/filter.h, bpf_common.h)
BPF_LD_W_ABS = 0x20     # A = word at k
BPF_LD_H_ABS = 0x28     # A = half at k
BPF_LD_B_ABS = 0x30     # A = byte at k
BPF_LD_H_IND = 0x48     # A = half at X + k
BPF_LDX_B_MSH = 0xB1    # X = 4 * (byte at k & 0xf): the IPv4 header length
BPF_JA = 0x05           # pc += k
BPF_JEQ_K = 0x15        # pc += (A == k) ? jt : jf
BPF_JGE_K = 0x35        # pc += (A >= k) ? jt : jf
BPF_JSET_K = 0x45       # pc += (A & k) ? jt : jf
BPF_RET_K = 0x06        # return k (bytes to keep; 0 = drop)
ACCEPT = 0xFFFFFFFF
REJECT = 0

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
IPPROTO_FRAGMENT = 44

Insn = tuple[int, int, int, int]


class _Asm:
    """A tiny classic-BPF assembler: jumps may name labels; a conditional jump further than 255
    instructions is an error (the programs below only jump over their own short blocks, and
    use the 32-bit BPF_JA for the long ones)."""

    def __init__(self) -> None:
        self.code: list[tuple[int, Any, Any, Any]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def op(self, code: int, k: Any = 0, jt: Any = 0, jf: Any = 0) -> None:
        self.code.append((code, jt, jf, k))

    def assemble(self) -> list[Insn]:
        out = []
        for pc, (code, jt, jf, k) in enumerate(self.code):
            def rel(t: Any, pc: int = pc) -> int:
                return self.labels[t] - pc - 1 if isinstance(t, str) else t
            if code == BPF_JA:
                k = rel(k)
            else:
                jt, jf = rel(jt), rel(jf)
                if not (0 <= jt <= 255 and 0 <= jf <= 255):
                    raise ValueError(f"BPF jump out of range at {pc}: {jt}/{jf}")
            out.append((code, jt, jf, k & 0xFFFFFFFF))
        return out


def _words(a: ipaddress.IPv6Address) -> tuple[int, ...]:
    return struct.unpack("!4I", a.packed)


def _v6_equal(a: _Asm, off: int, addr: ipaddress.IPv6Address, ret: int | str) -> None:
    """if the 16 bytes at off == addr: return ret (a number), or jump to ret (a label); else
    fall through (9 instructions)."""
    w = _words(addr)
    for i in range(4):
        a.op(BPF_LD_W_ABS, off + 4 * i)
        a.op(BPF_JEQ_K, w[i], 0, 7 - 2 * i)
    if isinstance(ret, str):
        a.op(BPF_JA, ret)
    else:
        a.op(BPF_RET_K, ret)


BPF_MAXINSNS = 4096


def build_filter(vips: Iterable[IPAddress], replies: Iterable[ReplyPath],
                 local: Iterable[IPAddress] = ()) -> list[Insn]:
    """The socket filter of one link, as (code, jt, jf, k) instructions.

    Accepted: Ethernet frames (no VLAN tag) carrying IPv4/IPv6 packets to one of ``vips`` (any
    protocol: the pipeline also translates ICMP errors for a VIP), ARP requests for an IPv4 VIP
    (the data plane answers them), or a TCP/UDP packet from one of ``replies`` to an address
    that is not in ``local`` (the gateway's own, its subnets' broadcast addresses: its health
    checks are the kernel's) and is no multicast or broadcast (IPv4) / multicast or link-local
    (IPv6) address, which the kernel never forwards. A FRAGMENTS reply path (port 0) takes
    every packet of its protocol from its address - whole, or a fragment (IPv4: the
    protocol field; IPv6: the next header, or a Fragment header first and the protocol
    behind it) - as the port-less rule blackholes all of them in the kernel: the replies of
    a flow, translated, and the backend's own traffic, which the worker forwards itself
    (passed). A port path (backend address, protocol, source port; IPv6 without extension
    headers) takes the unfragmented packets and first fragments of its replies; one that a
    FRAGMENTS path of its address and protocol covers costs no instructions. A client-side
    socket gets only VIPs, a backend-side one only what its reply paths name, one socket on a
    shared link both.
    Everything else stays with the kernel alone.

    A config too big for one program (BPF_MAXINSNS) gets a coarser test, whatever the
    source address: protocol (and source port for a port path) only. Frames from other
    addresses then reach the pipeline too, which drops what is no reply of a tracked flow and
    not from a backend's address serving that protocol (``no_vip``): the kernel, whose rules
    do not blackhole them, forwards those itself as before. A passed packet is always one the
    kernel blackholes, so nothing is forwarded twice.
    """
    vips = list(dict.fromkeys(vips))
    replies = list(dict.fromkeys(replies))
    local = list(dict.fromkeys(local))
    prog = _build(vips, replies, local, coarse=False)
    if len(prog) > BPF_MAXINSNS:
        prog = _build(vips, replies, local, coarse=True)
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"socket filter of {len(prog)} instructions (max {BPF_MAXINSNS}): "
                         "too many VIPs for mode rawsock")
    return prog


# tc verdicts of a direct-action filter (linux/pkt_cls.h)
TC_ACT_SHOT = 2
TC_ACT_UNSPEC = 0xFFFFFFFF      # -1: the next filter, then the stack
IPPROTO_ICMPV6 = 58


def build_kernel_drop(vips: Iterable[IPAddress], replies: Iterable[ReplyPath],
                      local: Iterable[IPAddress] = ()) -> list[Insn] | None:
    """The tc ingress program of one link that drops the kernel's own copy of what the
    link's socket filter (:func:`build_filter`, same arguments) takes: TC_ACT_SHOT for those
    frames, TC_ACT_UNSPEC for the rest. The kernel would drop each of them anyway (a VIP's
    blackhole route, the reply rules' blackhole table), but only after an input route lookup
    through the policy rules and a route allocated and freed per packet, on the CPU that
    received the frame; the filter runs before IP, after the packet sockets got their copy.
    Left with the kernel although the socket takes them: ARP requests (the kernel learns the
    asker's MAC from them) and ICMPv6 to an IPv6 VIP (neighbour solicitations, which proxy
    NDP answers). None when the exact program does not fit in BPF_MAXINSNS (the socket filter
    is coarse then, and takes frames the kernel still forwards itself: no tc drop at all)."""
    prog = _build(list(dict.fromkeys(vips)), list(dict.fromkeys(replies)),
                  list(dict.fromkeys(local)), coarse=False, take=TC_ACT_SHOT,
                  leave=TC_ACT_UNSPEC, kernel=True)
    return prog if len(prog) <= BPF_MAXINSNS else None


def _split(replies: list[ReplyPath]) -> tuple[dict[IPAddress, list[int]], list[ReplyPath]]:
    """The addresses whose protocols are taken whole (their FRAGMENTS paths: address ->
    protocols), and the port paths those do not cover."""
    whole: dict[IPAddress, list[int]] = {}
    for r in replies:
        if r.port == FRAGMENTS and r.proto not in whole.setdefault(r.address, []):
            whole[r.address].append(r.proto)
    ported = [r for r in replies
              if r.port != FRAGMENTS and r.proto not in whole.get(r.address, ())]
    return whole, ported


def _build(vips: list[IPAddress], replies: list[ReplyPath], local: list[IPAddress],
           coarse: bool, take: int = ACCEPT, leave: int = REJECT,
           kernel: bool = False) -> list[Insn]:
    """The program of build_filter (take/leave: ACCEPT/REJECT) or, with ``kernel``, of
    build_kernel_drop (no ARP; ICMPv6 to a VIP left to the kernel)."""
    if coarse:   # one test per (family, protocol, port): the address matches anything
        replies = list(dict.fromkeys(
            ReplyPath(ipaddress.ip_address(0) if r.address.version == 4
                      else ipaddress.IPv6Address(0), r.proto, r.port) for r in replies))
    a = _Asm()
    a.op(BPF_LD_H_ABS, 12)
    a.op(BPF_JEQ_K, ETH_P_IP, 0, 1)
    a.op(BPF_JA, "v4")
    a.op(BPF_JEQ_K, ETH_P_IPV6, 0, 1)
    a.op(BPF_JA, "v6")
    v4 = [v for v in vips if v.version == 4]
    if v4 and not kernel:
        a.op(BPF_JEQ_K, ETH_P_ARP, 0, 1)
        a.op(BPF_JA, "arp")
    a.op(BPF_RET_K, leave)

    if v4 and not kernel:
        # ARP requests for a VIP: the data plane answers them (the kernel cannot: the VIP is
        # not a local address, and its blackhole route is no unicast route to proxy for)
        a.label("arp")
        a.op(BPF_LD_H_ABS, 14 + 6)                  # operation
        a.op(BPF_JEQ_K, 1, 1, 0)
        a.op(BPF_RET_K, leave)
        a.op(BPF_LD_W_ABS, 14 + 24)                 # target protocol address
        for v in v4:
            a.op(BPF_JEQ_K, int(v), 0, 1)
            a.op(BPF_RET_K, take)
        a.op(BPF_RET_K, leave)

    a.label("v4")
    if v4:
        a.op(BPF_LD_W_ABS, 14 + 16)                 # destination
        for v in v4:
            a.op(BPF_JEQ_K, int(v), 0, 1)
            a.op(BPF_RET_K, take)
    whole, ported = _split(replies)
    r4 = [r for r in replies if r.address.version == 4]
    if r4:
        a.op(BPF_LD_W_ABS, 14 + 16)
        for addr in (x for x in local if x.version == 4):
            a.op(BPF_JEQ_K, int(addr), 0, 1)
            a.op(BPF_RET_K, leave)
        a.op(BPF_JGE_K, 0xE0000000, 0, 1)           # multicast, broadcast: never a reply
        a.op(BPF_RET_K, leave)
        w4 = [(addr, protos) for addr, protos in whole.items() if addr.version == 4]
        if w4 and not coarse:
            a.op(BPF_LD_W_ABS, 14 + 12)             # source
        for n, (addr, protos) in enumerate(w4):     # all of its protocols: whole, fragments
            if not coarse:
                a.op(BPF_JEQ_K, int(addr), 0, f"v4next{n}")
            a.op(BPF_LD_B_ABS, 14 + 9)              # protocol
            for p in protos:
                a.op(BPF_JEQ_K, p, f"v4take{n}", 0)
            a.op(BPF_JA, "v4ports")                 # another protocol: its port paths
            a.label(f"v4take{n}")
            a.op(BPF_RET_K, take)
            a.label(f"v4next{n}")
        a.label("v4ports")
        p4 = [r for r in ported if r.address.version == 4]
        if p4:
            a.op(BPF_LD_H_ABS, 14 + 6)              # flags + fragment offset
            a.op(BPF_JSET_K, 0x1FFF, 0, 1)          # a later fragment has no ports
            a.op(BPF_RET_K, leave)
            a.op(BPF_LDX_B_MSH, 14)
        for r in p4:
            if not coarse:
                a.op(BPF_LD_W_ABS, 14 + 12)         # source
                a.op(BPF_JEQ_K, int(r.address), 0, 5)
            a.op(BPF_LD_B_ABS, 14 + 9)              # protocol
            a.op(BPF_JEQ_K, r.proto, 0, 3)
            a.op(BPF_LD_H_IND, 14)                  # source port
            a.op(BPF_JEQ_K, r.port, 0, 1)
            a.op(BPF_RET_K, take)
    a.op(BPF_RET_K, leave)

    a.label("v6")
    v6 = [v for v in vips if v.version == 6]
    for v in v6:
        _v6_equal(a, 14 + 24, v, "v6vip" if kernel else take)
    if v6 and kernel:
        a.op(BPF_JA, "v6replies")
        a.label("v6vip")
        a.op(BPF_LD_B_ABS, 14 + 6)                  # next header
        a.op(BPF_JEQ_K, IPPROTO_ICMPV6, 0, 1)
        a.op(BPF_RET_K, leave)
        a.op(BPF_RET_K, take)
        a.label("v6replies")
    r6 = [r for r in replies if r.address.version == 6]
    if r6:
        for addr in local:
            if addr.version == 6:
                _v6_equal(a, 14 + 24, addr, leave)
        a.op(BPF_LD_H_ABS, 14 + 24)                 # multicast, link-local: never a reply
        a.op(BPF_JGE_K, 0xFF00, "v6reject", 0)
        a.op(BPF_JGE_K, 0xFEC0, "v6unicast", 0)
        a.op(BPF_JGE_K, 0xFE80, "v6reject", "v6unicast")
        a.label("v6reject")
        a.op(BPF_RET_K, leave)
        a.label("v6unicast")
        w6 = [(addr, protos) for addr, protos in whole.items() if addr.version == 6]
        for n, (addr, protos) in enumerate(w6):     # all of its protocols: whole, fragments
            w = _words(addr)
            for i in range(4 if not coarse else 0):
                a.op(BPF_LD_W_ABS, 14 + 8 + 4 * i)  # source
                a.op(BPF_JEQ_K, w[i], 0, f"v6next{n}")
            a.op(BPF_LD_B_ABS, 14 + 6)              # next header
            for p in protos:
                a.op(BPF_JEQ_K, p, f"v6take{n}", 0)
            a.op(BPF_JEQ_K, IPPROTO_FRAGMENT, 0, f"v6other{n}")
            a.op(BPF_LD_B_ABS, 14 + 40)             # the Fragment header's next header
            for p in protos:
                a.op(BPF_JEQ_K, p, f"v6take{n}", 0)
            a.label(f"v6other{n}")
            a.op(BPF_JA, "v6ports")                 # another protocol: its port paths
            a.label(f"v6take{n}")
            a.op(BPF_RET_K, take)
            a.label(f"v6next{n}")
        a.label("v6ports")
        for r in (r for r in ported if r.address.version == 6):
            w = _words(r.address)
            for i in range(4 if not coarse else 0):
                a.op(BPF_LD_W_ABS, 14 + 8 + 4 * i)  # source
                a.op(BPF_JEQ_K, w[i], 0, 11 - 2 * i)
            a.op(BPF_LD_B_ABS, 14 + 6)              # next header
            a.op(BPF_JEQ_K, r.proto, 0, 3)
            a.op(BPF_LD_H_ABS, 14 + 40)             # source port
            a.op(BPF_JEQ_K, r.port, 0, 1)
            a.op(BPF_RET_K, take)
    a.op(BPF_RET_K, leave)
    return a.assemble()


