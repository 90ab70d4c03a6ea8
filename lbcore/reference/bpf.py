"""Classic BPF as the kernel runs a socket filter: the oracle for the rawsock filters.

Only the opcodes lbcore.dataplane.rawsock.bpf emits; anything else is an error. The tests run
each generated filter over hand-built frames here and compare the verdicts with a table (and,
separately, with the kernel on real sockets).
"""
from __future__ import annotations

from ..dataplane.rawsock.bpf import (
    BPF_JA,
    BPF_JEQ_K,
    BPF_JGE_K,
    BPF_JSET_K,
    BPF_LD_B_ABS,
    BPF_LD_H_ABS,
    BPF_LD_H_IND,
    BPF_LD_W_ABS,
    BPF_LDX_B_MSH,
    BPF_RET_K,
)

MAX_STEPS = 100_000


def bpf_run(prog: list[tuple[int, int, int, int]], pkt: bytes) -> int:
    """Classic BPF as the kernel runs a socket filter (only the opcodes build_filter emits);
    a load beyond the packet ends the program with 0, as in the kernel."""
    a = x = pc = 0
    steps = 0

    def load(off: int, n: int) -> int | None:
        if off < 0 or off + n > len(pkt):
            return None
        return int.from_bytes(pkt[off:off + n], "big")

    while True:
        steps += 1
        if steps >= MAX_STEPS or not 0 <= pc < len(prog):
            raise ValueError(f"runaway program (pc {pc}, step {steps})")
        code, jt, jf, k = prog[pc]
        pc += 1
        if code in (BPF_LD_W_ABS, BPF_LD_H_ABS, BPF_LD_B_ABS, BPF_LD_H_IND):
            n = {BPF_LD_W_ABS: 4, BPF_LD_H_ABS: 2, BPF_LD_B_ABS: 1, BPF_LD_H_IND: 2}[code]
            v = load(k + (x if code == BPF_LD_H_IND else 0), n)
            if v is None:
                return 0
            a = v
        elif code == BPF_LDX_B_MSH:
            v = load(k, 1)
            if v is None:
                return 0
            x = 4 * (v & 0xF)
        elif code == BPF_JA:
            pc += k
        elif code == BPF_JEQ_K:
            pc += jt if a == k else jf
        elif code == BPF_JGE_K:
            pc += jt if a >= k else jf
        elif code == BPF_JSET_K:
            pc += jt if a & k else jf
        elif code == BPF_RET_K:
            return k
        else:
            raise ValueError(f"unexpected opcode {code:#x}")
