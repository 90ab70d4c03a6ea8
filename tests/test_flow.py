"""The connection table (ext/lb_flow.c through lbcore._core.FlowTable).

Each test drives the table with an explicit ms clock (`now`), so expiry and
eviction are deterministic; FlowTable.check() (the C consistency checker) is
asserted after every test that changes the table.
"""
from __future__ import annotations

import errno
import os
import pathlib
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from lbcore import _core, _testing

FlowTable = _core.FlowTable
FWD, REV = _core.DIR_FWD, _core.DIR_REV
TCP, UDP = 6, 17
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

CLIENT, VIP, BACKEND = "198.18.0.10", "198.19.0.1", "198.19.1.1"
TIMEOUTS = {"tcp_syn": 1_000, "tcp_established": 9_000, "tcp_fin": 3_000,
            "tcp_close": 500, "udp": 2_000, "udp_stream": 7_000}


def add(ft: FlowTable, cport: int = 40000, *, client: str = CLIENT, vip: str = VIP,
        vport: int = 80, backend: str = BACKEND, bport: int = 8080, proto: int = TCP,
        state: str = "syn", now: int = 0, vip_stat: int = 0, be_stat: int = 0) -> int:
    return ft.insert(client, cport, vip, vport, backend, bport, proto, state, now,
                     vip_stat, be_stat)


def fwd(ft: FlowTable, cport: int = 40000, *, client: str = CLIENT, vport: int = 80,
        proto: int = TCP, flags: int = 0, now: int = 0) -> dict | None:
    return ft.lookup(client, VIP, cport, vport, proto, FWD, flags, now)


def rev(ft: FlowTable, cport: int = 40000, *, client: str = CLIENT, backend: str = BACKEND,
        bport: int = 8080, proto: int = TCP, flags: int = 0, now: int = 0) -> dict | None:
    return ft.lookup(backend, client, bport, cport, proto, REV, flags, now)


@pytest.fixture
def ft() -> FlowTable:
    return FlowTable(64, seed=0x5EED, timeouts=TIMEOUTS)


def test_lookup_from_both_directions(ft):
    assert add(ft, vip_stat=3, be_stat=7, now=100) == 0
    want = {"client": CLIENT, "cport": 40000, "vip": VIP, "vport": 80, "backend": BACKEND,
            "bport": 8080, "proto": TCP, "family": 4, "state": "syn", "vip_stat": 3,
            "be_stat": 7}
    f = fwd(ft, now=150)
    assert f is not None and {k: f[k] for k in want} == want and f["last_seen"] == 150
    r = rev(ft, now=160)
    assert r is not None and {k: r[k] for k in want} == want and r["last_seen"] == 160
    # each key is found only from its own direction, and only exactly
    assert ft.lookup(CLIENT, VIP, 40000, 80, TCP, REV) is None
    assert ft.lookup(BACKEND, CLIENT, 8080, 40000, TCP, FWD) is None
    assert fwd(ft, 40001) is None and fwd(ft, vport=81) is None and fwd(ft, proto=UDP) is None
    assert rev(ft, bport=8081) is None
    assert len(ft) == 1 and ft.check()


def test_ipv6_flow_and_family_checks(ft):
    c6, v6, b6 = "2001:db8::10", "2001:db8:1::1", "2001:db8:2::1"
    assert ft.insert(c6, 5555, v6, 443, b6, 8443, "tcp") == 0
    hit = ft.lookup(b6, c6, 8443, 5555, TCP, REV)
    assert hit["family"] == 6 and hit["vip"] == v6 and hit["client"] == c6
    with pytest.raises(ValueError):
        ft.insert(CLIENT, 1, v6, 443, b6, 8443, TCP)
    with pytest.raises(ValueError):
        ft.insert("not-an-ip", 1, VIP, 80, BACKEND, 8080, TCP)
    with pytest.raises(ValueError):
        ft.insert(CLIENT, 70000, VIP, 80, BACKEND, 8080, TCP)
    with pytest.raises(ValueError):
        ft.insert(CLIENT, 1, VIP, 80, BACKEND, 8080, 1)
    with pytest.raises(ValueError):
        ft.insert(CLIENT, 1, VIP, 80, BACKEND, 8080, TCP, state="half-open")
    assert len(ft) == 1 and ft.check()


def test_insert_twice_answers_with_the_first_entry(ft):
    assert add(ft, backend="198.19.1.1", now=10, be_stat=1) == 0
    rc, entry = ft.insert_get(CLIENT, 40000, VIP, 80, "198.19.1.2", 9090, TCP, "syn", 20,
                              0, 2)
    assert rc == -errno.EEXIST
    assert entry["backend"] == "198.19.1.1" and entry["bport"] == 8080
    assert entry["be_stat"] == 1 and entry["last_seen"] == 10
    assert add(ft, backend="198.19.1.3") == -errno.EEXIST
    assert fwd(ft)["backend"] == "198.19.1.1"
    assert ft.counters()["refused_exists"] == 2 and ft.counters()["inserted"] == 1
    assert ft.active_backend(1) == 1 and ft.active_backend(2) == 0
    assert len(ft) == 1 and ft.check()


def test_reverse_tuple_clash_is_refused_with_the_holder(ft):
    """Two VIPs, one client port, one backend: the backend would see one
    connection, so the second flow cannot be tracked apart from the first."""
    assert add(ft, vip="198.19.0.1") == 0
    rc, entry = ft.insert_get(CLIENT, 40000, "198.19.0.2", 80, BACKEND, 8080, TCP)
    assert rc == -errno.EEXIST and entry["vip"] == "198.19.0.1"
    assert ft.lookup(CLIENT, "198.19.0.2", 40000, 80, TCP) is None
    assert len(ft) == 1 and ft.check()


def test_delete(ft):
    assert add(ft, vip_stat=4, be_stat=5) == 0
    assert add(ft, 40001) == 0
    assert ft.delete(CLIENT, VIP, 40000, 80, TCP) is True
    assert fwd(ft) is None and rev(ft) is None
    assert fwd(ft, 40001) is not None
    assert ft.delete(CLIENT, VIP, 40000, 80, TCP) is False
    assert ft.delete(BACKEND, CLIENT, 8080, 40000, TCP) is False   # not a forward key
    assert ft.counters()["deleted"] == 1
    assert ft.active_vip(4) == 0 and ft.active_backend(5) == 0
    assert len(ft) == 1 and ft.check()
    assert add(ft) == 0                                    # the key is free again
    assert len(ft) == 2 and ft.check()


@pytest.mark.parametrize("state,proto,tmo_key", [
    ("syn", TCP, "tcp_syn"), ("established", TCP, "tcp_established"),
    ("fin", TCP, "tcp_fin"), ("close", TCP, "tcp_close"),
    ("udp", UDP, "udp"), ("udp_stream", UDP, "udp_stream"),
])
def test_expiry_per_state(ft, state, proto, tmo_key):
    tmo = TIMEOUTS[tmo_key]
    t0 = 5_000
    assert add(ft, proto=proto, state=state, now=t0) == 0
    assert add(ft, 40001, proto=proto, state=state, now=t0 + 1) == 0
    assert ft.expire(t0 + tmo) == 0            # idle == timeout: still alive
    assert ft.expire(t0 + tmo + 1) == 1        # idle > timeout: gone
    assert fwd(ft, proto=proto) is None and rev(ft, proto=proto) is None
    assert fwd(ft, 40001, proto=proto)["state"] == state
    assert ft.counters()["expired"] == 1
    assert len(ft) == 1 and ft.check()


def test_lookup_refreshes_last_seen(ft):
    assert add(ft, state="established", now=0) == 0
    assert rev(ft, now=8_000) is not None               # a reply keeps it alive
    assert ft.expire(9_001) == 0
    assert ft.expire(17_001) == 1
    assert len(ft) == 0 and ft.check()


def test_set_timeouts_and_validation(ft):
    assert ft.timeouts == TIMEOUTS
    assert add(ft, state="established", now=0) == 0
    ft.set_timeouts({"tcp_established": 100})
    assert ft.timeouts["tcp_established"] == 100
    assert ft.timeouts["udp"] == _core.DEFAULT_TIMEOUTS_MS["udp"]
    assert ft.expire(101) == 1
    with pytest.raises(ValueError, match="tcp_est"):
        FlowTable(8, timeouts={"tcp_est": 5})
    with pytest.raises(ValueError):
        FlowTable(8, timeouts={"udp": 0})
    assert FlowTable(8).timeouts == _core.DEFAULT_TIMEOUTS_MS


def test_default_timeouts_are_the_documented_ones():
    assert _core.DEFAULT_TIMEOUTS_MS == {
        "tcp_syn": 60_000, "tcp_established": 900_000, "tcp_fin": 120_000,
        "tcp_close": 10_000, "udp": 30_000, "udp_stream": 120_000}
    ft = FlowTable(4, seed=1)
    assert add(ft, state="established", now=0) == 0
    assert ft.expire(900_000) == 0 and ft.expire(900_001) == 1


def test_clock_wraparound(ft):
    start = 2**32 - 600                          # 600 ms before the clock wraps
    assert add(ft, state="syn", now=start) == 0
    assert add(ft, 40001, state="syn", now=start) == 0
    assert ft.expire(399) == 0                   # 999 ms idle across the wrap
    assert fwd(ft, 40001, now=300)["last_seen"] == 300
    assert ft.expire(401) == 1                   # 1001 ms idle: the untouched one
    assert fwd(ft) is None and fwd(ft, 40001) is not None
    # a clock slightly behind the entry's (another worker's older `now`) is
    # not a huge idle time
    assert ft.expire(250) == 0
    assert ft.expire(1_301) == 1
    assert len(ft) == 0 and ft.check()


@dataclass(frozen=True)
class StateCase:
    description: str
    start: str
    packets: tuple[tuple[int, int], ...]    # (dir, tcp flags) in order
    state: str
    rev_seen: bool
    proto: int = TCP


STATE_CASES = [
    StateCase("three-way handshake", "syn", ((REV, SYN | ACK), (FWD, ACK)),
              "established", True),
    StateCase("client ACK before any reply stays half-open", "syn", ((FWD, ACK),),
              "syn", False),
    StateCase("SYN flood: backend answers, client never ACKs", "syn",
              ((REV, SYN | ACK), (FWD, SYN), (REV, SYN | ACK)), "syn", True),
    StateCase("client SYN|ACK does not establish", "syn", ((REV, SYN | ACK), (FWD, SYN | ACK)),
              "syn", True),
    StateCase("mid-stream pickup", "syn", ((FWD, ACK), (REV, ACK), (FWD, ACK)),
              "established", True),
    StateCase("established stays on data", "established", ((FWD, ACK), (REV, ACK | 0x08)),
              "established", True),
    StateCase("RST from client", "established", ((FWD, RST),), "close", False),
    StateCase("RST from backend in SYN does not count as a reply", "syn", ((REV, RST | ACK),),
              "close", False),
    StateCase("FIN from client", "established", ((FWD, FIN | ACK),), "fin", False),
    StateCase("FIN from backend", "established", ((REV, FIN | ACK), (FWD, ACK)), "fin", True),
    StateCase("FIN during handshake", "syn", ((FWD, FIN),), "fin", False),
    StateCase("RST after FIN", "established", ((FWD, FIN | ACK), (REV, RST)), "close", False),
    StateCase("FIN after RST stays closed", "established", ((FWD, RST), (REV, FIN | ACK)),
              "close", True),
    StateCase("fresh SYN reopens a closed tuple", "established",
              ((FWD, RST), (FWD, SYN)), "syn", False),
    StateCase("fresh SYN reopens a finished tuple", "established",
              ((FWD, FIN | ACK), (REV, FIN | ACK), (FWD, SYN)), "syn", False),
    StateCase("UDP request only", "udp", ((FWD, 0), (FWD, 0)), "udp", False, UDP),
    StateCase("UDP reply", "udp", ((FWD, 0), (REV, 0), (FWD, 0)), "udp_stream", True, UDP),
    StateCase("UDP ignores TCP flag bits", "udp", ((FWD, RST | FIN),), "udp", False, UDP),
]


@pytest.mark.parametrize("case", STATE_CASES, ids=lambda c: c.description)
def test_state_transitions(ft, case: StateCase):
    assert add(ft, proto=case.proto, state=case.start) == 0
    got = None
    for t, (direction, flags) in enumerate(case.packets, 1):
        lk = fwd if direction == FWD else rev
        got = lk(ft, proto=case.proto, flags=flags, now=t)
        assert got is not None and got["last_seen"] == t
    assert got["state"] == case.state
    assert got["rev_seen"] is case.rev_seen
    # the change is in the table, seen from both directions
    assert fwd(ft, proto=case.proto, now=99)["state"] == case.state
    assert ft.walk()[0]["state"] == case.state
    assert ft.check()


def _fill_states(ft: FlowTable, states: list[str], *, now: int = 0, first: int = 1000,
                 proto: int = TCP) -> list[int]:
    ports = []
    for n, state in enumerate(states):
        assert add(ft, first + n, state=state, now=now, proto=proto) == 0
        ports.append(first + n)
    return ports


def test_full_of_established_refuses_new_flows():
    ft = FlowTable(8, seed=1, timeouts=TIMEOUTS)
    est = _fill_states(ft, ["established"] * 8)
    assert add(ft, 2000, now=10) == -errno.ENOSPC
    assert add(ft, 2001, state="established", now=10) == -errno.ENOSPC
    c = ft.counters()
    assert c["refused_full"] == 2 and c["evicted_halfopen"] == 0 and c["evicted_expired"] == 0
    assert all(fwd(ft, p) is not None for p in est)
    # an existing flow is answered, not refused and not evicting anything
    assert add(ft, est[0], backend="198.19.1.9") == -errno.EEXIST
    assert len(ft) == 8 and ft.check()


def test_full_table_reclaims_expired_before_half_open():
    ft = FlowTable(8, seed=2, timeouts=TIMEOUTS)
    old_est = _fill_states(ft, ["established"] * 4, now=0, first=1000)
    fresh_syn = _fill_states(ft, ["syn"] * 4, now=8_500, first=2000)
    now = TIMEOUTS["tcp_established"] + 1                 # the established ones expired
    for n in range(4):
        assert add(ft, 3000 + n, state="established", now=now) == 0
    c = ft.counters()
    assert c["evicted_expired"] == 4 and c["evicted_halfopen"] == 0
    assert all(fwd(ft, p, now=now) is None for p in old_est)
    assert all(fwd(ft, p, now=now) is not None for p in fresh_syn)
    # nothing expired left: now the half-open ones go, never the established
    for n in range(4):
        assert add(ft, 4000 + n, state="established", now=now) == 0
    assert ft.counters()["evicted_halfopen"] == 4
    assert add(ft, 5000, now=now) == -errno.ENOSPC
    assert all(fwd(ft, 3000 + n, now=now) and fwd(ft, 4000 + n, now=now) for n in range(4))
    assert len(ft) == 8 and ft.check()


def test_half_open_flood_never_evicts_established():
    ft = FlowTable(16, seed=3, timeouts=TIMEOUTS)
    est = _fill_states(ft, ["established"] * 8, first=1000)
    _fill_states(ft, ["syn"] * 8, first=2000)
    for n in range(200):                      # a SYN flood, clock barely moving
        assert add(ft, 10_000 + n, state="syn", now=n) == 0
    assert all(fwd(ft, p)["state"] == "established" for p in est)
    c = ft.counters()
    assert c["evicted_halfopen"] == 200 and c["refused_full"] == 0
    assert len(ft) == 16 and ft.check()


def test_eviction_takes_the_oldest_half_open():
    ft = FlowTable(4, seed=4, timeouts=TIMEOUTS)
    for n, t in enumerate((40, 10, 30, 20)):
        assert add(ft, 1000 + n, now=t) == 0
    assert add(ft, 2000, now=50) == 0
    assert fwd(ft, 1001) is None                     # last seen at 10
    assert all(fwd(ft, 1000 + n) is not None for n in (0, 2, 3))


def test_what_counts_as_half_open():
    """Reclaimable: SYN, unreplied UDP, CLOSE, FIN of a never-established
    connection; then replied UDP (a spoofer can make the backends answer).
    Protected: established, FIN after establishment."""
    ft = FlowTable(6, seed=5, timeouts=TIMEOUTS)
    assert add(ft, 1, state="established") == 0
    assert fwd(ft, 1, flags=FIN | ACK)["state"] == "fin"          # was established
    assert add(ft, 2, state="syn") == 0
    assert fwd(ft, 2, flags=FIN)["state"] == "fin"                # never was
    assert add(ft, 3, state="established") == 0
    assert rev(ft, 3, flags=RST)["state"] == "close"
    assert add(ft, 4, proto=UDP, state="udp") == 0
    assert add(ft, 5, proto=UDP, state="udp") == 0
    assert rev(ft, 5, proto=UDP)["state"] == "udp_stream"
    assert add(ft, 6, state="established") == 0
    for n in range(3):
        assert add(ft, 100 + n, state="established", now=1) == 0
    assert fwd(ft, 2) is None and fwd(ft, 3) is None and fwd(ft, 4, proto=UDP) is None
    assert add(ft, 200, state="established", now=1) == 0          # takes the replied UDP
    assert fwd(ft, 5, proto=UDP) is None
    assert add(ft, 201, state="established", now=1) == -errno.ENOSPC
    assert fwd(ft, 1)["state"] == "fin" and fwd(ft, 6)
    c = ft.counters()
    assert c["evicted_halfopen"] == 3 and c["evicted_udp"] == 1 and c["refused_full"] == 1
    assert ft.check()


def test_answered_udp_flood_cannot_fill_the_table():
    """A spoofed UDP flood the backends answer makes udp_stream entries as fast as it sends:
    they give way to new flows (the least recently seen of a scan window first), established
    TCP never does, and new TCP connections keep being tracked through the flood."""
    ft = FlowTable(256, seed=9, timeouts=TIMEOUTS)
    est = _fill_states(ft, ["established"] * 64, first=1000)
    now = 0
    tcp = []
    for n in range(20_000):                      # the flood: insert, then the backend answers
        now = n // 10
        spoofed = f"198.18.{128 + (n >> 8) % 128}.{n & 255}"
        assert add(ft, 53, client=spoofed, proto=UDP, state="udp", now=now) == 0
        assert rev(ft, 53, client=spoofed, proto=UDP, now=now)["state"] == "udp_stream"
        if n % 500 == 0:                         # a real client now and then
            assert add(ft, 5000 + n, state="syn", now=now) == 0
            assert rev(ft, 5000 + n, flags=SYN | ACK, now=now) is not None
            assert fwd(ft, 5000 + n, flags=ACK, now=now)["state"] == "established"
            tcp.append(5000 + n)
    assert all(fwd(ft, p, flags=ACK, now=now)["state"] == "established" for p in est + tcp)
    c = ft.counters()
    assert c["refused_full"] == 0 and c["evicted_udp"] >= 20_000 - 256
    assert len(ft) == 256 and ft.check()
    # the udp_stream entries that stayed are the most recent ones (least active go first)
    left = [f for f in ft.walk() if f["state"] == "udp_stream"]
    assert left and min(f["last_seen"] for f in left) >= now - 200


def test_eviction_scans_past_its_budget_for_the_last_half_open():
    """One half-open entry among thousands of established ones is still
    found (the scan does not stop while half-open entries exist)."""
    cap = 4096
    ft = FlowTable(cap, seed=6)
    assert _testing.fill(ft, cap - 1, now=0, state="established") == cap - 1
    assert add(ft, 1, state="syn") == 0
    assert add(ft, 2, state="established") == 0             # evicts the SYN one
    assert fwd(ft, 1) is None and fwd(ft, 2) is not None
    assert add(ft, 3, state="syn") == -errno.ENOSPC      # no half-open left
    c = ft.counters()
    assert c["evicted_halfopen"] == 1 and c["refused_full"] == 1
    assert len(ft) == cap and ft.check()


def test_purge_backend_and_active_counts(ft):
    for n in range(5):
        assert add(ft, 1000 + n, backend="198.19.1.1", vip_stat=1, be_stat=11) == 0
    for n in range(3):
        assert add(ft, 2000 + n, backend="198.19.1.2", vip_stat=1, be_stat=12) == 0
    assert add(ft, 3000, backend="198.19.1.1", bport=9090, vip_stat=1, be_stat=13) == 0
    assert add(ft, 3001, backend="198.19.1.1", proto=UDP, state="udp", vip_stat=1,
               be_stat=14) == 0
    assert (ft.active_vip(1), ft.active_backend(11), ft.active_backend(12)) == (10, 5, 3)
    assert ft.purge_backend("198.19.1.1", 8080, TCP) == 5
    assert all(fwd(ft, 1000 + n) is None for n in range(5))
    assert all(rev(ft, 1000 + n, backend="198.19.1.1") is None for n in range(5))
    assert all(fwd(ft, 2000 + n) is not None for n in range(3))
    assert fwd(ft, 3000) is not None and fwd(ft, 3001, proto=UDP) is not None
    assert (ft.active_vip(1), ft.active_backend(11), ft.active_backend(12)) == (5, 0, 3)
    assert ft.purge_backend("198.19.1.1", 8080, TCP) == 0
    assert ft.counters()["deleted"] == 5
    assert ft.active_backend(_core.MAX_STAT_IDS) == 0     # out of range: 0, no crash
    assert len(ft) == 5 and ft.check()


def test_active_counts_follow_every_removal():
    ft = FlowTable(4, seed=7, timeouts=TIMEOUTS)
    big = _core.MAX_STAT_IDS + 5                             # not counted, not fatal
    assert add(ft, 1, state="syn", be_stat=3, vip_stat=big) == 0
    assert add(ft, 2, state="established", be_stat=3) == 0
    assert add(ft, 3, state="established", be_stat=3) == 0
    assert add(ft, 4, state="established", be_stat=3) == 0
    assert ft.active_backend(3) == 4
    assert add(ft, 5, state="established", be_stat=4) == 0      # evicts the SYN one
    assert (ft.active_backend(3), ft.active_backend(4)) == (3, 1)
    assert ft.delete(CLIENT, VIP, 2, 80, TCP)
    assert ft.expire(10**6) == 3
    assert (ft.active_backend(3), ft.active_backend(4), ft.active_vip(0)) == (0, 0, 0)
    assert ft.check()


def test_walk(ft):
    for n in range(20):
        assert add(ft, 1000 + n, state="established", now=n) == 0
    rows = ft.walk()
    assert sorted(r["cport"] for r in rows) == list(range(1000, 1020))
    assert all(r["backend"] == BACKEND and r["state"] == "established" for r in rows)
    assert len(ft.walk(limit=7)) == 7
    assert ft.walk(limit=0) == []
    ft.delete(CLIENT, VIP, 1005, 80, TCP)
    assert 1005 not in {r["cport"] for r in ft.walk()} and len(ft.walk()) == 19


def test_synthetic_flows_are_ordinary_flows():
    """_testing.fill() inserts what lookup() and walk() see: flow i is client
    198.18.0.0 + (i >> 14), port 1024 + (i & 0x3fff), VIP 198.19.255.1:80,
    backend 198.19.254.(1 + i % 16):8080."""
    ft = FlowTable(20_000, seed=8)
    assert _testing.fill(ft, 20_000, now=5) == 20_000
    hit = ft.lookup("198.18.0.1", "198.19.255.1", 1024 + 3, 80, TCP)
    assert hit["backend"] == f"198.19.254.{1 + (16384 + 3) % 16}"
    assert ft.lookup("198.19.254.4", "198.18.0.0", 8080, 1024 + 3, TCP, REV) is not None
    assert _testing.fill(ft, 10, now=5) == 0                       # all there already
    assert _testing.lookup_batch(ft, 5000, 20_000) == 5000
    assert _testing.lookup_batch(ft, 5000, 20_000, dir=REV) == 5000
    assert _testing.lookup_batch(ft, 5000, 20_000, batched=False) == 5000
    assert _testing.lookup_batch(ft, 5000, 20_000, hit=False) == 0
    assert _testing.lookup_batch(ft, 5000, 20_000, hit=False, dir=REV, batched=False) == 0
    assert ft.check()


def test_uninitialised_or_reinitialised_table_is_refused():
    bare = FlowTable.__new__(FlowTable)
    with pytest.raises(RuntimeError):
        len(bare)
    with pytest.raises(RuntimeError):
        bare.lookup(CLIENT, VIP, 1, 80, TCP)
    ft = FlowTable(4, seed=1)
    with pytest.raises(RuntimeError):
        ft.__init__(8)
    assert ft.capacity == 4


def test_batched_lookups_advance_state_like_single_ones():
    ft = FlowTable(64, seed=9)
    assert _testing.fill(ft, 64, state="syn") == 64
    assert _testing.lookup_batch(ft, 200, 64, dir=REV, tcp_flags=SYN | ACK) == 200
    assert _testing.lookup_batch(ft, 200, 64, dir=FWD, tcp_flags=ACK, now=7) == 200
    states = {r["state"] for r in ft.walk()}
    # every flow drawn in both rounds is established, the rest still half-open
    assert states <= {"syn", "established"} and "established" in states
    assert ft.check()


def test_memory_per_connection():
    """<= 128 bytes per tracked connection, both directions and the indexes;
    worst case is a capacity just above a power of two (bucket count doubles)."""
    for cap in (1 << 20, (1 << 20) + 1):
        ft = FlowTable(cap, seed=10)
        per_flow = ft.memory / cap
        assert per_flow <= 128, per_flow
    assert FlowTable(1 << 20, seed=10).memory / (1 << 20) < 90


def test_capacity_limits():
    one = FlowTable(1, seed=11, timeouts=TIMEOUTS)
    assert one.capacity == 1
    assert add(one, 1, state="established") == 0
    assert add(one, 2, state="established") == -errno.ENOSPC
    assert one.delete(CLIENT, VIP, 1, 80, TCP)
    assert add(one, 2, state="syn") == 0
    assert add(one, 3, state="syn") == 0                   # evicts the other half-open
    assert len(one) == 1 and one.check()
    for bad in (0, -1, _core.FLOW_MAX + 1):
        with pytest.raises(ValueError):
            FlowTable(bad)
    assert FlowTable(_core.FLOW_MAX, seed=1).capacity == _core.FLOW_MAX


def test_large_table():
    ft = FlowTable(1 << 20, seed=12)
    assert _testing.fill(ft, 1 << 20, now=1) == 1 << 20
    assert len(ft) == 1 << 20 and ft.capacity == 1 << 20
    assert _testing.lookup_batch(ft, 100_000, 1 << 20) == 100_000
    assert _testing.fill(ft, 1, start=1 << 20, state="established") == 0   # full, all established
    assert ft.counters()["refused_full"] == 1
    assert ft.check()
    assert ft.expire(10**7) == 1 << 20 and len(ft) == 0 and ft.check()


def test_thread_hammer():
    """4 threads insert, look up from both sides, delete, expire, walk and
    purge on shared keys, on tables that are full and evicting (16) and
    roomier (512). Afterwards every invariant holds and every count adds up."""
    for cap in (16, 512):
        ft = FlowTable(cap, seed=cap, timeouts=TIMEOUTS)
        r = _testing.hammer(ft, 4, 250_000, now=1_000, keys=4 * cap, expire_jump=3_000)
        assert r["ops"] == 1_000_000
        assert r["bad"] == 0
        assert r["hits"] > 0 and r["ins_ok"] > 0 and r["ins_exists"] > 0
        assert r["deleted"] > 0 and r["expired"] > 0 and r["walked"] > 0
        c = ft.counters()
        assert ft.check_code() == 0
        assert c["inserted"] == r["ins_ok"]
        assert c["refused_exists"] == r["ins_exists"]
        assert c["refused_full"] == r["ins_full"]
        assert c["expired"] == r["expired"]
        assert c["deleted"] == r["deleted"] + r["purged"]
        removed = (c["expired"] + c["deleted"] + c["evicted_expired"] + c["evicted_halfopen"]
                   + c["evicted_udp"])
        assert c["inserted"] - removed == len(ft) == len(ft.walk())
        if cap == 16:
            assert c["evicted_halfopen"] + c["evicted_expired"] > 0


@pytest.mark.slow
def test_c_stress_under_thread_sanitizer(tmp_path):
    """lb_flow.c alone, built with -fsanitize=thread, hammered by 4 pthreads
    (tests/c/flow_stress.c): no data race reported, no wrong entry handed
    out, lb_flow_check passes. Skipped only if the compiler cannot build
    with ThreadSanitizer here."""
    root = pathlib.Path(__file__).resolve().parent.parent
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "flow_stress"
    # not under the ASan preload of `make test-sanitize`: TSan must come alone
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    build = subprocess.run(
        [cc, "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-fsanitize=thread",
         "-pthread", "-I", str(root / "ext"), str(root / "tests" / "c" / "flow_stress.c"),
         str(root / "ext" / "lb_flow.c"), "-o", str(exe)],
        capture_output=True, text=True, env=env)
    if build.returncode != 0 and "tsan" in build.stderr:
        pytest.skip(f"no ThreadSanitizer runtime: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), "60000"], capture_output=True, text=True, timeout=300,
                         env={**env, "TSAN_OPTIONS": "halt_on_error=1"})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert run.stdout.count("check 0, bad 0") == 3, run.stdout
