"""What flow continuity costs, measured in one process (no root, no network
namespaces): `python -m bench.continuity [--flows N]`.

* adoption: a data plane fills its flow table file with N established flows
  and goes away; a new one adopts them (wall time of adopt_flows).
* sync: the same N flows are encoded as wire records (the refresh walk; the
  ring drain encodes the same way), sealed in authenticated datagrams, sent
  over loopback UDP, received, checked (MAC, windows) and applied to a
  second data plane: records per second and CPU microseconds per record, for
  the sender's and the receiver's half separately.
"""
from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

from lbcore import _core, _testing
from lbcore.sync import MAX_DATAGRAM, RECORD, Codec

NB = 16   # backends of _testing.fill's synthetic flows: 198.19.254.1..16:8080, VIP 198.19.255.1:80
SYNTH = [("198.19.255.1", 80, "tcp", 1, 65537,
          [(f"198.19.254.{k}", 8080, 1, k, False) for k in range(1, NB + 1)])]


def adoption(n: int, d: Path) -> float:
    path = str(d / "flows.shm")
    dp = _core.Dataplane(1, n, flow_file=path)
    dp.publish(SYNTH, 1)
    dp.commit_flow_file()
    assert _testing.fill(dp.flow_table, n, now=_core.now_ms()) == n
    del dp
    dp = _core.Dataplane(1, n, flow_file=path)
    dp.publish(SYNTH, 1)
    res = dp.adopt_flows()
    assert res["adopted"] == n, res
    return res["seconds"]


def sync(n: int) -> dict:
    a = _core.Dataplane(1, n)
    a.publish(SYNTH, 1)
    assert _testing.fill(a.flow_table, n, now=_core.now_ms()) == n
    b = _core.Dataplane(1, n)
    b.publish(SYNTH, 1)
    key = b"bench key, long enough"
    tx, rx = Codec(key, ["x"], 30.0), Codec(key, ["127.0.0.1"], 30.0)
    rs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rs.bind(("127.0.0.1", 0))
    rs.setblocking(False)
    ss = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dst = rs.getsockname()
    send_cpu = recv_cpu = 0.0
    sent = inserted = 0
    cursor, done = 0, False
    t0 = time.perf_counter()
    while not done:
        c0 = time.process_time()
        records, cursor, done = a.sync_refresh(cursor, 60_000, 2048)
        grams = tx.seal(records)
        for g in grams:
            ss.sendto(g, dst)
        sent += len(records) // RECORD
        c1 = time.process_time()
        for _ in grams:        # what was just sent (fits the receive buffer)
            d, src = rs.recvfrom(MAX_DATAGRAM + 1)
            body = rx.open(src[0], d)
            if body is not None:
                inserted += b.sync_apply(body)["inserted"]
        c2 = time.process_time()
        send_cpu += c1 - c0
        recv_cpu += c2 - c1
    wall = time.perf_counter() - t0
    return {"records": sent, "inserted": inserted, "wall_s": wall,
            "records_per_s": sent / wall, "send_us_per_record": send_cpu / sent * 1e6,
            "recv_us_per_record": recv_cpu / sent * 1e6,
            "rejected": sum(rx.rejected.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=1 << 20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        s = adoption(args.flows, Path(d))
    print(f"adoption of {args.flows} flows: {s:.3f} s")
    r = sync(args.flows)
    print(f"sync of {r['records']} flows: {r['records_per_s']:.0f} records/s one core, "
          f"sender {r['send_us_per_record']:.2f} us CPU/record, receiver "
          f"{r['recv_us_per_record']:.2f} us CPU/record; inserted {r['inserted']}, "
          f"rejected {r['rejected']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
