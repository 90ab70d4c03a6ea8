"""Type stub of lbcore._testing (ext/_testing.pyx): benchmark and stress
loops over lbcore._core's objects, built only with LB_TESTING=1.

Synthetic flow i: client 198.18.0.0/15 + (i >> 14), cport 1024 + (i & 0x3fff),
VIP 198.19.255.1:80, backend 198.19.254.(1 + i % 16):8080.
"""
from collections.abc import Sequence
from typing import Any

from ._core import Dataplane, FlowTable, MaglevTable

def fill(ft: FlowTable, n: int, now: int = 0, state: str | int = "established",
         start: int = 0, proto: int | str = 6) -> int: ...
def lookup_batch(ft: FlowTable, n: int, span: int, hit: bool = True, now: int = 0,
                 dir: int = ..., tcp_flags: int = 0x10, seed: int = 1, proto: int | str = 6,
                 batched: bool = True) -> int: ...
def hammer(ft: FlowTable, threads: int, ops_per_thread: int, now: int = 0,
           keys: int | None = None, expire_jump: int = ...) -> dict[str, int]: ...
def pick_batch(table: MaglevTable, n: int, seed_offset: int = 0) -> int: ...
def parse_rewrite_batch(packets: Sequence[bytes], entry: dict[str, Any] | tuple, dir: int,
                        rounds: int, csum_partial: bool = False) -> int: ...
def process_repeat(dp: Dataplane, packets: Sequence[bytes], rounds: int,
                   now: int | None = None) -> int: ...
