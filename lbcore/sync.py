"""Flow sync between gateways: each gateway tells its peers about the flows
it creates, the flows still active (a periodic refresh) and the flows it
ends, so that a flow the router moves to another gateway (a gateway lost,
ECMP rehashed) keeps its backend there, even when the backend set changed
since the flow began. Active-active: every gateway sends and receives.

The packet path never runs Python for this: workers push each new flow into
a bounded per-worker ring in C (ext/lb_sync.h; a full ring drops the event
and counts it), the flow table pushes the flows it removes on its own -
reclaimed idle or evicted by an insert, purged with their backend - into
a bounded END ring of its own (ext/lb_flow.h; full: dropped and counted,
those flows then expire at the peers), housekeeping's expiry reports what it
removed, and :class:`FlowSync` drains the rings every few ms, encodes
the entries as 64-byte wire records in C, and sends them batched in UDP
datagrams to every peer. Receiving, it checks each datagram here (length,
version, MAC, timestamp window, sequence window) and hands the records of
the good ones to C, which checks every field again before a flow is
inserted. A forged, garbled or replayed datagram never reaches the table;
each is counted by the reason it was dropped.

Datagram (version 1; integers big-endian)::

     0  magic    b"LBSY"
     4  version  1
     5  zero
     6  count    records that follow (1..MAX_RECORDS)
     8  nonce    the sender's incarnation: random per start
    16  seq      per incarnation, +1 per datagram
    24  time     sender's CLOCK_REALTIME, ms
    32  records  count x 64 bytes (ext/lb_sync.h)
    ..  tag      16 bytes: keyed BLAKE2b of everything before it

Replay: a datagram is accepted only from a configured peer address, within
``window`` seconds of the receiver's clock, and once per (nonce, seq): a
64-datagram sliding window per peer, as IPsec's. A new nonce (the peer
restarted) is accepted only if its time is not older than the current
incarnation's first datagram, so an old incarnation's datagrams cannot be
replayed after a restart either. Left open: right after the *receiver*
restarts it has no window yet, so a datagram captured in the last
``window`` seconds can be accepted once; at worst it re-inserts a flow the
peer already ended, which then expires.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .config import SyncConfig

log = logging.getLogger("lbcore.sync")

MAGIC = b"LBSY"
VERSION = 1
HEADER = struct.Struct("!4sBBHQQQ")
RECORD = 64                       # ext/lb_sync.h LB_SYNC_REC_SIZE
TAG = 16
# 22 records: 32 + 22 * 64 + 16 = 1456 bytes, one unfragmented datagram on a
# 1500-byte link, IPv4 or IPv6
MAX_RECORDS = 22
MAX_DATAGRAM = HEADER.size + MAX_RECORDS * RECORD + TAG
REPLAY_WINDOW = 64                # datagrams per peer
DRAIN_EVERY_S = 0.005             # how often the workers' rings are emptied
DRAIN_BATCH = 512                 # entries per drain call (small, stack-friendly buffers)
RECV_BURST = 256                  # datagrams read per wake-up, then the loop runs again

# why a flow's END record was sent: expired (housekeeping, or reclaimed idle by an insert),
# evicted (by an insert under table pressure), purged (its backend left)
END_REASONS = ("expired", "evicted", "purged")
REJECT_REASONS = ("short", "bad_magic", "bad_version", "bad_length", "unknown_peer",
                  "bad_mac", "stale", "replay")


def mac_key(raw: bytes) -> bytes:
    """The MAC key: a digest of the configured key (any length, text or not),
    bound to this protocol so the same secret used elsewhere gives another key."""
    return hashlib.blake2b(raw, digest_size=32, person=b"lbcore-sync-v1").digest()


def _tag(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=TAG).digest()


@dataclass
class _PeerState:
    nonce: int
    first_ms: int
    max_seq: int
    bitmap: int                   # bit i: max_seq - i was seen


class Codec:
    """Datagrams in and out, without sockets (the fuzz tests drive it)."""

    def __init__(self, key: bytes, peers: list[str], window_s: float,
                 clock=time.time) -> None:
        self._key = mac_key(key)
        self._peers = set(peers)
        self._window_ms = int(window_s * 1000)
        self._clock = clock
        self.nonce = int.from_bytes(os.urandom(8), "big")
        self._seq = 0
        self._seq_lock = threading.Lock()    # the refresh walk seals from a thread
        self._state: dict[str, _PeerState] = {}
        self.rejected: Counter[str] = Counter()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def seal(self, records: bytes) -> list[bytes]:
        """The datagrams that carry `records` (whole records, any number)."""
        out = []
        step = MAX_RECORDS * RECORD
        for off in range(0, len(records) - len(records) % RECORD, step):
            chunk = records[off:off + step]
            with self._seq_lock:
                self._seq += 1
                seq = self._seq
            head = HEADER.pack(MAGIC, VERSION, 0, len(chunk) // RECORD, self.nonce, seq,
                               self._now_ms())
            out.append(head + chunk + _tag(self._key, head + chunk))
        return out

    def open(self, peer: str, d: bytes) -> bytes | None:
        """The records of datagram `d` from address `peer`, or None (counted
        in `rejected` by reason)."""
        why = self._check(peer, d)
        if why is not None:
            self.rejected[why] += 1
            return None
        return d[HEADER.size:-TAG]

    def _check(self, peer: str, d: bytes) -> str | None:
        if len(d) < HEADER.size + RECORD + TAG:
            return "short"
        magic, version, zero, count, nonce, seq, ts = HEADER.unpack_from(d)
        if magic != MAGIC:
            return "bad_magic"
        if version != VERSION:
            return "bad_version"
        if (zero or not 1 <= count <= MAX_RECORDS
                or len(d) != HEADER.size + count * RECORD + TAG):
            return "bad_length"
        if peer not in self._peers:
            return "unknown_peer"
        if not hmac.compare_digest(_tag(self._key, d[:-TAG]), d[-TAG:]):
            return "bad_mac"
        if abs(self._now_ms() - ts) > self._window_ms:
            return "stale"
        return self._replay(peer, nonce, seq, ts)

    def _replay(self, peer: str, nonce: int, seq: int, ts: int) -> str | None:
        st = self._state.get(peer)
        if st is None or nonce != st.nonce:
            if st is not None and ts < st.first_ms:
                return "replay"              # an earlier incarnation of the peer
            self._state[peer] = _PeerState(nonce, ts, seq, 1)
            return None
        if seq > st.max_seq:
            shift = seq - st.max_seq
            st.bitmap = ((st.bitmap << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) \
                if shift < REPLAY_WINDOW else 1
            st.max_seq = seq
            return None
        back = st.max_seq - seq
        if back >= REPLAY_WINDOW or st.bitmap >> back & 1:
            return "replay"
        st.bitmap |= 1 << back
        return None


def _addr(hp: tuple[Any, int]) -> tuple[str, int]:
    return (str(hp[0]), hp[1])


class FlowSync:
    """The sender and receiver of one gateway, on its event loop."""

    def __init__(self, dp: Any, cfg: SyncConfig) -> None:
        self.dp = dp
        self.cfg = cfg
        self.peers = [_addr(p) for p in cfg.peers]
        self.codec = Codec(cfg.key, [h for h, _ in self.peers], cfg.window)
        self.sock: socket.socket | None = None
        self._tasks: list[asyncio.Future] = []
        self.sent = Counter()       # records / datagrams / send_errors, by kind
        self.received = Counter()   # datagrams, records, and lb_sync_apply's outcomes
        self.ring_drops = 0
        self.end_ring_drops = 0
        self.last_send_error = ""

    def start(self) -> None:
        host, port = _addr(self.cfg.listen)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((host, port))
        except OSError:
            s.close()
            raise
        self.sock = s
        loop = asyncio.get_running_loop()
        loop.add_reader(s.fileno(), self._on_readable)
        self._tasks = [asyncio.ensure_future(self._drain_loop()),
                       asyncio.ensure_future(self._refresh_loop())]
        log.info("flow sync on %s:%d with %s", host, port,
                 ", ".join(f"{h}:{p}" for h, p in self.peers))

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    # -- sending -----------------------------------------------------------

    def send(self, records: bytes, kind: str = "new", reason: str | None = None) -> None:
        """Send wire records (any number) to every peer; never raises. ``reason``: why END
        records ended (END_REASONS), counted once per record."""
        if not records or self.sock is None:
            return
        if reason is not None:
            self.sent[f"end_{reason}"] += len(records) // RECORD
        for d in self.codec.seal(records):
            n = (len(d) - HEADER.size - TAG) // RECORD
            for peer in self.peers:
                try:
                    self.sock.sendto(d, peer)
                    self.sent["datagrams"] += 1
                    self.sent[f"records_{kind}"] += n
                except OSError as e:
                    # a peer that is down must not stop the others (nor the loop)
                    self.sent["send_errors"] += 1
                    if e.errno not in (errno.ECONNREFUSED, errno.EAGAIN):
                        self.last_send_error = str(e)

    def drain_once(self) -> int:
        """Empty the workers' rings into datagrams; returns the records sent."""
        total = 0
        while True:
            records, drops = self.dp.sync_drain(DRAIN_BATCH)
            self.ring_drops = drops
            self.send(records, "new")
            total += len(records) // RECORD
            if len(records) < DRAIN_BATCH * RECORD:
                break
        while True:
            records, reasons, drops = self.dp.sync_drain_ends(DRAIN_BATCH)
            self.end_ring_drops = drops
            for reason in END_REASONS:      # the ring's order is not by reason: count only
                self.sent[f"end_{reason}"] += reasons.get(reason, 0)
            self.send(records, "end")
            total += len(records) // RECORD
            if len(records) < DRAIN_BATCH * RECORD:
                return total

    async def _drain_loop(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_EVERY_S)
            self.drain_once()

    def refresh_all(self) -> int:
        """Re-send every flow active within the last refresh period (so the
        peers' copies of flows busy here do not expire there). Runs in a
        worker thread; returns the records sent."""
        cursor, total = 0, 0
        max_age = int(self.cfg.refresh * 1000 * 2)
        while True:
            records, cursor, done = self.dp.sync_refresh(cursor, max_age)
            self.send(records, "refresh")
            total += len(records) // RECORD
            if done:
                return total

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh)
            await asyncio.to_thread(self.refresh_all)

    # -- receiving ---------------------------------------------------------

    def _on_readable(self) -> None:
        assert self.sock is not None
        for _ in range(RECV_BURST):
            try:
                d, src = self.sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.receive(d, src[0])

    def receive(self, d: bytes, peer: str) -> None:
        """Check one datagram from address `peer` and apply its records."""
        self.received["datagrams"] += 1
        body = self.codec.open(peer, d)
        if body is None:
            return
        self.received["records"] += len(body) // RECORD
        for k, v in self.dp.sync_apply(body).items():
            if v:
                self.received[k] += v

    # -- the read model ----------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """What `status` shows: records sent by kind, ring drops, datagrams
        and records received, what became of them, rejections by reason."""
        return {
            "peers": [f"{h}:{p}" for h, p in self.peers],
            "sent": {"records_new": self.sent["records_new"],
                     "records_refresh": self.sent["records_refresh"],
                     "records_end": self.sent["records_end"],
                     "datagrams": self.sent["datagrams"],
                     "send_errors": self.sent["send_errors"], "ring_drops": self.ring_drops,
                     "end_ring_drops": self.end_ring_drops,
                     **{f"end_{r}": self.sent[f"end_{r}"] for r in END_REASONS}},
            "received": dict(self.received),
            "rejected": {r: self.codec.rejected[r] for r in REJECT_REASONS},
        }
