"""Flow sync between gateways without a network: the workers' event rings and
wire records (ext/lb_sync.c through Dataplane.sync_*), and the datagram
layer (lbcore.sync.Codec: MAC, timestamp and sequence windows). Random,
truncated, replayed and forged datagrams never crash, never insert a flow,
and are counted (also run by `make test-sanitize`)."""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from lbcore import _core
from lbcore.config import parse_config
from lbcore.sync import HEADER, MAX_RECORDS, RECORD, TAG, Codec, FlowSync

VIP, CLIENT = "198.18.100.1", "198.18.0.2"
BACKENDS = ["198.19.0.11", "198.19.0.12", "198.19.0.13"]
KEY = b"a shared key of some length"
PEER = "198.19.0.2"
TX = _core.VERDICT_TX
REC = _core.SYNC_RECORD_SIZE


def table(backends=BACKENDS):
    return [(VIP, 80, "tcp", 7, 65537, [(b, 8080, 1, 100 + i, False)
                                         for i, b in enumerate(backends)])]


def gateway(backends=BACKENDS, ring=1024):
    dp = _core.Dataplane(workers=1, flow_capacity=4096)
    dp.publish(table(backends), seed=42)
    dp.sync_attach(ring)
    return dp


def tcp(sport, flags="S"):
    return bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags))


def backend_of(dp, sport, flags="A"):
    (v, reason, out), = dp.process([tcp(sport, flags)])
    assert v == TX, reason
    return IP(out).dst


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


def codecs(clock=None):
    clock = clock or Clock()
    return Codec(KEY, ["198.19.0.1"], 30.0, clock), Codec(KEY, [PEER], 30.0, clock)


def test_records_round_trip_and_a_moved_flow_keeps_its_backend():
    a, b = gateway(), gateway(BACKENDS + ["198.19.0.14", "198.19.0.15"])
    before = {40000 + i: backend_of(a, 40000 + i, "S") for i in range(100)}
    records, drops = a.sync_drain()
    assert len(records) == 100 * REC and drops == 0
    tx, rx = codecs()
    got = {"inserted": 0}
    for d in tx.seal(records):
        assert len(d) <= HEADER.size + MAX_RECORDS * RECORD + TAG
        body = rx.open(PEER, d)
        assert body is not None
        got["inserted"] += b.sync_apply(body)["inserted"]
    assert got["inserted"] == 100 and sum(rx.rejected.values()) == 0
    # the router moves the flows to b, mid-connection: each keeps its backend
    assert {p: backend_of(b, p) for p in before} == before
    assert b.flow_table.check()
    # b's own Maglev table would have moved some (its backend set differs)
    assert sum(b.pick(CLIENT, p, VIP, 80, "tcp")[2] != be for p, be in before.items()) > 5


def test_refresh_end_and_conflicts():
    a, b = gateway(), gateway()
    now = _core.now_ms()
    for p in range(10):
        backend_of(a, 50000 + p, "S")
    rec, _ = a.sync_drain()
    assert b.sync_apply(rec)["inserted"] == 10
    again = b.sync_apply(rec)                       # a duplicate: same backend, refreshed
    assert again["refreshed"] == 10 and again["inserted"] == 0
    refresh, cursor, done = a.sync_refresh(0, 60_000)
    assert len(refresh) == 10 * REC
    assert b.sync_apply(refresh)["refreshed"] == 10
    # a flow b has with another backend is not overwritten
    body = bytearray(rec[:REC])
    body[48:52] = bytes([198, 19, 0, 13 if body[51] != 13 else 12])
    assert b.sync_apply(bytes(body))["conflict"] == 1
    # a's flows expire; the END records remove b's copies
    removed, ended = a.expire_flows(now + 10 * 60_000)
    assert removed == 10 and len(ended) == 10 * REC
    res = b.sync_apply(ended)
    assert res["ended"] == 10 and len(b.flow_table) == 0
    assert b.sync_apply(ended)["not_found"] == 10


def test_records_of_an_unknown_vip_or_backend_are_not_inserted():
    a = gateway()
    backend_of(a, 41000, "S")
    rec, _ = a.sync_drain()
    other_vip = gateway()
    other_vip.publish([("198.18.100.2", 80, "tcp", 7, 65537, [(BACKENDS[0], 8080, 1, 1,
                                                                False)])], seed=1)
    assert other_vip.sync_apply(rec)["unknown_vip"] == 1
    no_be = gateway(["198.19.0.99"])
    assert no_be.sync_apply(rec)["unknown_backend"] == 1
    assert len(other_vip.flow_table) == len(no_be.flow_table) == 0


def test_a_full_ring_drops_and_counts():
    a = gateway(ring=4)
    for p in range(10):
        backend_of(a, 42000 + p, "S")
    rec, drops = a.sync_drain()
    assert len(rec) == 4 * REC and drops == 6


def small_gateway(capacity=8, ring=1024):
    dp = _core.Dataplane(workers=1, flow_capacity=capacity)
    dp.publish(table(), seed=42)
    dp.sync_attach(ring)
    return dp


def test_flows_evicted_by_table_pressure_are_ended_at_the_peers():
    """A full table evicts half-open flows for new ones: each evicted flow goes out as an END
    record (reason evicted), and the peer that holds its copy removes it."""
    a, b = small_gateway(), gateway()
    for p in range(8):
        backend_of(a, 43000 + p, "S")
    rec, _ = a.sync_drain()
    assert b.sync_apply(rec)["inserted"] == 8
    assert a.sync_drain_ends() == (b"", {"expired": 0, "evicted": 0, "purged": 0}, 0)
    for p in range(5):                                  # five more: five evicted
        backend_of(a, 44000 + p, "S")
    ends, reasons, drops = a.sync_drain_ends()
    assert reasons == {"expired": 0, "evicted": 5, "purged": 0} and drops == 0
    assert len(ends) == 5 * REC and all(ends[i * REC] == 3 for i in range(5))   # LB_SYNC_END
    res = b.sync_apply(ends)
    # within one ms the oldest half-open flow may be one of the new ones (b never had it)
    assert res["ended"] + res["not_found"] == 5 and res["ended"] >= 1
    assert len(b.flow_table) == 8 - res["ended"]
    assert a.flow_table.counters()["evicted_halfopen"] == 5


def test_flows_reclaimed_idle_by_an_insert_are_ended_as_expired():
    a, b = small_gateway(), gateway()
    now = _core.now_ms()
    for p in range(8):
        a.process([tcp(45000 + p, "S")], now=now)
    rec, _ = a.sync_drain()
    b.sync_apply(rec)
    # ten minutes later (every half-open flow idle past its timeout) a new flow comes
    (v, reason, _), = a.process([tcp(46000, "S")], now=now + 10 * 60_000)
    assert v == TX, reason
    ends, reasons, _ = a.sync_drain_ends()
    assert reasons["expired"] == 1 and reasons["evicted"] == 0 and len(ends) == REC
    assert b.sync_apply(ends)["ended"] == 1


def test_flows_purged_with_their_backend_are_ended_at_the_peers():
    a, b = gateway(), gateway()
    owners = {p: backend_of(a, 47000 + p, "S") for p in range(30)}
    rec, _ = a.sync_drain()
    assert b.sync_apply(rec)["inserted"] == 30
    gone = BACKENDS[0]
    n = a.flow_table.purge_backend(gone, 8080, "tcp")
    assert n == sum(be == gone for be in owners.values()) > 0
    ends, reasons, drops = a.sync_drain_ends()
    assert reasons == {"expired": 0, "evicted": 0, "purged": n} and drops == 0
    assert b.sync_apply(ends)["ended"] == n
    assert {f["backend"] for f in b.flow_table.walk()} == set(BACKENDS) - {gone}


def test_a_full_end_ring_drops_and_counts_and_never_blocks():
    a = gateway(ring=4)
    for p in range(10):
        backend_of(a, 48000 + p, "S")
    n = sum(a.flow_table.purge_backend(be, 8080, "tcp") for be in BACKENDS)
    assert n == 10
    ends, reasons, drops = a.sync_drain_ends()
    assert len(ends) == 4 * REC and reasons["purged"] == 4 and drops == 6
    assert len(a.flow_table) == 0                       # the removals all happened


def test_end_records_through_the_datagram_layer_and_forged_ones_are_dropped():
    """END records travel as any other: a forged or garbled datagram carrying them is
    dropped and counted before a record is read, and removes nothing."""
    a, b = gateway(), gateway()
    for p in range(6):
        backend_of(a, 49000 + p, "S")
    rec, _ = a.sync_drain()
    b.sync_apply(rec)
    a.flow_table.purge_backend(BACKENDS[1], 8080, "tcp")
    ends, reasons, _ = a.sync_drain_ends()
    tx, rx = codecs()
    forger = Codec(b"another key of some length", ["198.19.0.1"], 30.0, Clock())
    for d in forger.seal(ends):
        assert rx.open(PEER, d) is None
    for d in tx.seal(ends):
        bad = bytearray(d)
        bad[HEADER.size + 17] ^= 0x40                   # a garbled client address
        assert rx.open(PEER, bytes(bad)) is None
    assert rx.rejected["bad_mac"] == 2 * len(tx.seal(ends)) and len(b.flow_table) == 6
    for d in tx.seal(ends):
        body = rx.open(PEER, d)
        assert body is not None
        assert b.sync_apply(body)["ended"] == reasons["purged"]
    # a record with a field out of range is refused by C, also an END
    bad = bytearray(ends[:REC])
    bad[1] = 5                                          # family
    assert b.sync_apply(bytes(bad))["bad_record"] == 1


def test_a_body_of_partial_records_is_refused_whole():
    b = gateway()
    assert b.sync_apply(b"x" * (REC + 1)) == {"bad_length": 1}


# --- the datagram layer: forged, garbled, replayed -------------------------------------

def sealed(n=3):
    a = gateway()
    for p in range(n):
        backend_of(a, 43000 + p, "S")
    rec, _ = a.sync_drain()
    return rec


def test_forged_with_another_key_is_dropped():
    rec = sealed()
    clock = Clock()
    bad = Codec(b"not the shared key at all", ["x"], 30.0, clock)
    _, rx = codecs(clock)
    (d,) = bad.seal(rec)
    assert rx.open(PEER, d) is None and rx.rejected["bad_mac"] == 1


@pytest.mark.parametrize("where", [0, 5, 7, 10, 20, 30, 40, 100, -1])
def test_any_flipped_byte_is_dropped(where):
    tx, rx = codecs()
    (d,) = tx.seal(sealed())
    d = bytearray(d)
    d[where] ^= 0x40
    assert rx.open(PEER, bytes(d)) is None and sum(rx.rejected.values()) == 1


def test_replays_and_old_incarnations_are_dropped():
    clock = Clock()
    tx, rx = codecs(clock)
    ds = tx.seal(sealed() * 20)         # 60 records: 3 datagrams
    assert len(ds) == 3
    assert all(rx.open(PEER, d) is not None for d in ds)
    assert all(rx.open(PEER, d) is None for d in ds)
    assert rx.rejected["replay"] == 3
    # out of order inside the window is fine, once
    more = tx.seal(sealed() * 20)
    assert rx.open(PEER, more[2]) is not None and rx.open(PEER, more[0]) is not None
    assert rx.open(PEER, more[0]) is None
    # the peer restarts (new nonce, later clock): accepted; then the old one's datagrams are not
    clock.t += 5
    restarted = Codec(KEY, ["x"], 30.0, clock)
    assert rx.open(PEER, restarted.seal(sealed())[0]) is not None
    assert rx.open(PEER, more[1]) is None and rx.rejected["replay"] == 5


def test_stale_and_unknown_peers_are_dropped():
    clock = Clock()
    tx, rx = codecs(clock)
    (d,) = tx.seal(sealed())
    clock.t += 31
    assert rx.open(PEER, d) is None and rx.rejected["stale"] == 1
    (d,) = tx.seal(sealed())
    assert rx.open("198.19.0.66", d) is None and rx.rejected["unknown_peer"] == 1


def test_truncated_and_padded_datagrams_are_dropped():
    tx, rx = codecs()
    (d,) = tx.seal(sealed(5))
    for cut in (0, 1, HEADER.size, HEADER.size + RECORD, len(d) - 1):
        assert rx.open(PEER, d[:cut]) is None
    assert rx.open(PEER, d + b"\0") is None
    assert rx.open(PEER, d) is not None       # the intact one still goes through
    assert rx.rejected["short"] + rx.rejected["bad_length"] + rx.rejected["bad_mac"] == 6


def test_bad_version_and_magic():
    tx, rx = codecs()
    (d,) = tx.seal(sealed())
    assert rx.open(PEER, b"XXXX" + d[4:]) is None
    assert rx.open(PEER, d[:4] + b"\x02" + d[5:]) is None
    assert rx.rejected["bad_magic"] == 1 and rx.rejected["bad_version"] == 1


# --- fuzz: hypothesis ------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=1600))
def test_random_datagrams_never_insert(d):
    clock = Clock()
    _, rx = codecs(clock)
    dp = gateway()
    sync = FlowSync.__new__(FlowSync)
    sync.dp, sync.codec = dp, rx
    from collections import Counter
    sync.received = Counter()
    sync.receive(d, PEER)
    assert len(dp.flow_table) == 0
    assert sum(rx.rejected.values()) == 1


@FUZZ
@given(st.binary(min_size=REC, max_size=REC * 8).map(lambda b: b[:len(b) - len(b) % REC]))
def test_authentic_datagrams_of_random_records_insert_only_valid_flows(body):
    """Even a peer that holds the key (a compromised or buggy gateway) cannot
    make the C side read out of bounds or insert a malformed entry: at most
    a well-formed flow to a configured VIP and backend."""
    dp = gateway()
    res = dp.sync_apply(body)
    assert sum(res.values()) == len(body) // REC
    assert dp.flow_table.check()
    for e in dp.flow_table.walk():
        assert e["vip"] == VIP and e["backend"] in BACKENDS


@FUZZ
@given(st.data())
def test_mutated_records_of_real_flows(data):
    rec = bytearray(sealed(4))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(rec) - 1))
        rec[i] = data.draw(st.integers(0, 255))
    dp = gateway()
    res = dp.sync_apply(bytes(rec))
    assert sum(res.values()) == 4
    assert dp.flow_table.check() and len(dp.flow_table) <= 4


def test_random_datagrams_with_a_valid_header_but_wrong_tag():
    tx, rx = codecs()
    for _ in range(200):
        n = 1 + int.from_bytes(os.urandom(1), "big") % MAX_RECORDS
        head = HEADER.pack(b"LBSY", 1, 0, n, 1, 1, int(Clock()() * 1000))
        d = head + os.urandom(n * RECORD + TAG)
        assert rx.open(PEER, d) is None
    assert rx.rejected["bad_mac"] == 200


def test_sync_config_is_checked_and_the_key_is_never_shown(tmp_path):
    keyf = tmp_path / "k"
    keyf.write_text("0123456789abcdef0123\n")
    cfg = parse_config(f'[sync]\nlisten = "198.19.0.1:7700"\npeers = ["{PEER}:7700"]\n'
                       f'key_file = "{keyf}"\nrefresh = 5\n')
    assert cfg.sync.key == b"0123456789abcdef0123" and cfg.sync.refresh == 5.0
    assert "0123456789" not in repr(cfg.sync)
    from lbcore.config import ConfigError
    with pytest.raises(ConfigError) as e:
        parse_config('[sync]\nlisten = "198.19.0.1"\npeers = ["198.19.0.1:7700", 7]\n'
                     'key = "k"\nkey_file = "rel"\nwindow = 0\nbogus = 1\n')
    text = str(e.value)
    for expect in ("sync.bogus", "sync.listen", "sync.peers[1]", "exactly one of key and "
                   "key_file", "sync.window"):
        assert expect in text, text


def test_datagram_header_layout():
    assert HEADER.size == 32 and RECORD == REC == 64
    tx, _ = codecs()
    (d,) = tx.seal(sealed(2))
    magic, ver, zero, count, nonce, seq, ts = struct.unpack_from("!4sBBHQQQ", d)
    assert (magic, ver, zero, count, seq) == (b"LBSY", 1, 0, 2, 1)
    assert len(d) == 32 + 2 * 64 + 16
