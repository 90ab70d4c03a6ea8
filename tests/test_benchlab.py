"""The lab benchmark's harness (bench/lab): its pure parts, fast and without root, plus the
sender built for real and one tiny real cell in the namespace lab."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bench.lab import parse, peers, report, run
from bench.lab.stats import Summary, interleave, ratio, summarize

ROOT = Path(__file__).resolve().parent.parent

WRK_LATENCY = """\
Running 3s test @ http://198.18.100.1/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.00us  301.50us  12.40ms   91.00%
    Req/Sec     1.00k    35.77     1.10k    60.00%
  Latency Distribution
     50%  754.00us
     75%    0.90ms
     90%    1.10ms
     99%    2.85ms
  2990 requests in 3.00s, 317.61KB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:    996.54
Transfer/sec:    105.87KB
"""

WRK_PLAIN = """\
Running 8s test @ http://198.19.0.11/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.05ms    1.10ms  31.02ms   93.12%
    Req/Sec     7.92k   512.00     8.61k    71.00%
  63012 requests in 8.00s, 6.43MB read
Requests/sec:   7876.21
Transfer/sec:    822.70KB
"""


def iperf_doc(bps: float = 12.5e9, retrans: int = 7, streams: int = 4) -> str:
    return json.dumps({
        "start": {"test_start": {"protocol": "TCP", "num_streams": streams, "omit": 1}},
        "intervals": [],
        "end": {"streams": [{}] * streams,
                "sum_sent": {"seconds": 8.0, "bits_per_second": bps * 1.01,
                             "retransmits": retrans, "sender": True},
                "sum_received": {"seconds": 8.0, "bits_per_second": bps, "sender": True}},
    })


# --------------------------------------------------------------------------- parsing

def test_wrk_with_latency_distribution_and_errors():
    r = parse.parse_wrk(WRK_LATENCY)
    assert r.requests == 2990
    assert r.duration_s == pytest.approx(3.0)
    assert r.rps == pytest.approx(996.54)
    assert r.latency_avg_us == pytest.approx(812.0)
    assert r.latency_max_us == pytest.approx(12400.0)
    assert r.percentiles_us == {50.0: pytest.approx(754.0), 75.0: pytest.approx(900.0),
                                90.0: pytest.approx(1100.0), 99.0: pytest.approx(2850.0)}
    assert r.errors == {"connect": 0, "read": 3, "write": 1, "timeout": 2}
    assert r.non_2xx == 4
    assert r.error_count == 10


def test_wrk_without_latency_distribution():
    r = parse.parse_wrk(WRK_PLAIN)
    assert (r.requests, r.rps) == (63012, pytest.approx(7876.21))
    assert r.percentiles_us == {}
    assert r.error_count == 0


@pytest.mark.parametrize("text,us", [("812.00us", 812.0), ("1.23ms", 1230.0), ("2.00s", 2e6),
                                     ("1.50m", 90e6)])
def test_wrk_time_units(text, us):
    assert parse.wrk_time_us(text) == pytest.approx(us)


def test_wrk_garbage_is_a_parse_error():
    with pytest.raises(parse.ParseError, match="no request count"):
        parse.parse_wrk("unable to connect to 198.18.100.1:80 Connection refused\n")
    with pytest.raises(parse.ParseError):
        parse.wrk_time_us("fast")


def test_iperf3_json():
    r = parse.parse_iperf3(iperf_doc(12.5e9, 7, 4))
    assert r.gbps == pytest.approx(12.5)          # the receiver's figure, not the sender's
    assert (r.retransmits, r.streams, r.seconds) == (7, 4, 8.0)


def test_iperf3_error_and_non_json():
    err = json.dumps({"start": {}, "intervals": [], "end": {},
                      "error": "unable to connect to server: Connection refused"})
    with pytest.raises(parse.ParseError, match="Connection refused"):
        parse.parse_iperf3(err)
    with pytest.raises(parse.ParseError, match="did not print JSON"):
        parse.parse_iperf3("iperf3: error - the server is busy running a test\n")
    with pytest.raises(parse.ParseError, match="sum_received"):
        parse.parse_iperf3(json.dumps({"end": {}}))


def test_flood_line():
    out = 'noise\n{"sent": 1200, "errors": 1, "elapsed": 2.0, "pps": 600.0, "flows": 64}\n'
    assert parse.parse_flood(out) == {"sent": 1200.0, "errors": 1.0, "elapsed": 2.0,
                                      "pps": 600.0, "flows": 64.0}
    with pytest.raises(parse.ParseError):
        parse.parse_flood("udpflood: bind: Address already in use\n")


def test_proc_stat_delta():
    before = parse.parse_proc_stat(
        "cpu  10 0 10 100 0 0 0 0\ncpu0 5 0 5 50 0 0 0 0\ncpu1 5 0 5 50 0 0 0 0\nintr 1\n")
    after = parse.parse_proc_stat(
        "cpu  0 0 0 0 0 0 0 0\ncpu0 55 0 5 100 0 0 0 0\ncpu1 5 0 25 100 0 0 30 0\n")
    assert set(before) == {0, 1}                  # the "cpu" total line is not a CPU
    d = parse.cpu_delta_pct(before, after)
    assert d[0]["user"] == pytest.approx(50.0) and d[0]["busy"] == pytest.approx(50.0)
    assert d[1]["softirq"] == pytest.approx(30.0)
    assert d[1]["system"] == pytest.approx(20.0)
    assert d[1]["busy"] == pytest.approx(50.0)


def test_pid_stat_with_awkward_comm():
    fields = ["S"] + [str(i) for i in range(4, 14)] + ["321", "123"] + ["0"] * 30
    text = "4242 (we ird) (name) " + " ".join(fields)
    assert parse.parse_pid_stat(text) == (321, 123)
    # and a real one: this process has used some CPU
    ut, st = parse.parse_pid_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert ut + st > 0


# --------------------------------------------------------------------------- statistics

def test_median_and_spread():
    s = summarize([10.0, 12.0, 11.0])
    assert (s.median, s.lo, s.hi, s.n) == (11.0, 10.0, 12.0, 3)
    assert s.spread == pytest.approx(1 / 11)
    assert summarize([5.0]).spread == 0.0
    assert summarize([None, float("nan")]) is None
    assert summarize([1.0, 2.0, 3.0, 100.0]).median == 2.5
    assert Summary(0.0, -1.0, 1.0, 2).spread == 0.0


def test_ratio():
    assert ratio(8.0, 10.0) == pytest.approx(0.8)
    assert ratio(None, 10.0) is None and ratio(1.0, 0.0) is None


def test_interleave_rotates_groups_and_members():
    rounds = interleave(3, [["kernel", "nftables", "haproxy"], ["tun1"], ["tun2"]])
    assert len(rounds) == 9
    assert [r for r, _ in rounds] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    firsts = [rounds[i][1][0] for i in (0, 3, 6)]
    assert firsts == ["kernel", "tun1", "tun2"]        # a different group leads each time
    peers_rounds = [m for _, m in rounds if "kernel" in m]
    assert [m[0] for m in peers_rounds] == ["kernel", "nftables", "haproxy"]
    for m in peers_rounds:
        assert sorted(m) == ["haproxy", "kernel", "nftables"]


# --------------------------------------------------------------------------- the report

def _sample(system, workload, rep, cpu1=10.0, softirq_s=None, forwarder_s=None, **metrics):
    cpu = {"forwarder_pct": cpu1, "per_cpu": {"0": {"busy": 90.0}, "1": {"busy": cpu1}}}
    if softirq_s is not None:
        cpu["softirq_s"] = softirq_s
    if forwarder_s is not None:
        cpu["forwarder_s"] = forwarder_s
    return {"system": system, "workload": workload, "rep": rep, "metrics": metrics, "cpu": cpu}


def _doc():
    samples = []
    for rep, k in enumerate((1.0, 1.1, 0.9)):
        samples += [
            # the sender alone: 8e6 packets for 4 softirq seconds, 0.5 µs a packet
            _sample("sender", "udp", rep, offered_pps=1.0e6 * k, sent=8.0e6, softirq_s=4.0),
            # kernel: 6.0 s of softirq for 7.6e6 sent (3.8 s of it the sender's), 7.6e6
            # delivered: 2.2 s / 7.6e6 = 0.289 µs a packet
            _sample("kernel", "udp", rep, offered_pps=9.6e5 * k, delivered_pps=9.5e5 * k,
                    loss_pct=1.0, sent=7.6e6, delivered=7.6e6, softirq_s=6.0),
            # nftables: 7.2e6 sent (3.6 s the sender's), 6.0e6 delivered: 2.4 s -> 0.4 µs
            _sample("nftables", "udp", rep, offered_pps=9.0e5, delivered_pps=7.6e5,
                    loss_pct=15.5, sent=7.2e6, delivered=6.0e6, softirq_s=6.0),
            _sample("kernel", "bulk4", rep, gbps=15.0 * k),
            _sample("nftables", "bulk4", rep, gbps=13.5),
            _sample("haproxy", "bulk4", rep, gbps=10.0, cpu1=99.0),
            _sample("kernel", "conn", rep, cps=20000.0, errors=0),
            _sample("haproxy", "conn", rep, cps=12000.0, errors=3),
        ]
    samples.append({"system": "nftables", "workload": "conn", "rep": 0, "error": "wrk died"})
    return {
        "started": "2026-11-24T08:00:00+00:00", "command": "make bench-lab",
        "machine": {"nproc": 2, "cpu_model": "AMD EPYC", "mem_gib": 23.5, "kernel": "6.1",
                    "lbcore_commit": "abc", "versions": {"haproxy": "2.6.12"}},
        "settings": {"reps": 3, "seconds": 8, "workloads": ["udp", "bulk4", "conn"],
                     "notes": ["a note"]},
        "systems": {"sender": {"label": "udpflood alone", "status": "ok"},
                    "kernel": {"label": "kernel forwarding", "status": "ok"},
                    "nftables": {"label": "nftables DNAT", "status": "ok"},
                    "haproxy": {"label": "HAProxy", "status": "ok"},
                    "lbcore-rawsock-1w": {"label": "lbcore rawsock, 1 worker",
                                          "status": "n/a (not implemented)"},
                    "lbcore-rawsock-2w": {"label": "lbcore rawsock, 2 workers",
                                          "status": "n/a (not implemented)"}},
        "samples": samples,
        "lab_errors": [{"group": "peers", "rep": 1,
                        "error": "the lab was removed while the bench used it\ndetails"}],
    }


def test_summary_takes_medians_and_counts_failures():
    doc = _doc()
    s = report.summarize_samples(doc["samples"])
    assert s["kernel"]["bulk4"]["gbps"]["median"] == pytest.approx(15.0)
    assert s["kernel"]["bulk4"]["gbps"]["min"] == pytest.approx(13.5)
    assert s["kernel"]["bulk4"]["gbps"]["n"] == 3
    assert s["haproxy"]["bulk4"]["forwarder_cpu_pct"]["median"] == 99.0
    assert s["nftables"]["conn"] == {"failed": 1}


def test_udp_cpu_per_packet_is_the_forwarders_beyond_the_sender():
    s = report.summarize_samples(_doc()["samples"])
    assert s["kernel"]["udp"]["cpu_us_per_pkt"]["median"] == pytest.approx(2.2 / 7.6)
    assert s["nftables"]["udp"]["cpu_us_per_pkt"]["median"] == pytest.approx(0.4)
    # delivered as a fraction of the sender's ceiling of the same repetition
    assert s["kernel"]["udp"]["of_ceiling"]["median"] == pytest.approx(0.95)
    assert s["nftables"]["udp"]["of_ceiling"]["median"] == pytest.approx(0.76)
    assert s["nftables"]["udp"]["of_ceiling"]["n"] == 3
    assert "cpu_us_per_pkt" not in s["sender"]["udp"]


def test_udp_derived_figures_without_a_sender_cell():
    kernel = _sample("kernel", "udp", 2, delivered_pps=5.0e5, sent=1e6, delivered=1e6,
                     softirq_s=1.0)
    assert report.derived_udp(kernel, {}) == {}
    # the repetition's own sender cell failed: another repetition's stands in
    other = {0: {"pps": 1.0e6, "cpu_s_per_pkt": 0.5e-6}}
    d = report.derived_udp(kernel, other)
    assert d["of_ceiling"] == pytest.approx(0.5)
    assert d["cpu_us_per_pkt"] == pytest.approx(0.5)
    # a user-space forwarder's process time counts with the softirq time
    lb = _sample("lbcore-tun-1w", "udp", 0, delivered_pps=5.0e5, sent=1e6, delivered=5e5,
                 softirq_s=1.0, forwarder_s=2.0)
    assert report.derived_udp(lb, other)["cpu_us_per_pkt"] == pytest.approx(2.5 / 5e5 * 1e6)
    # less the time its workers spent busy polling empty queues
    lb["cpu"]["spin_s"] = 1.5
    assert report.derived_udp(lb, other)["cpu_us_per_pkt"] == pytest.approx(1.0 / 5e5 * 1e6)
    lb["cpu"]["wall_s"] = 3.0
    summ = report.summarize_samples([lb])["lbcore-tun-1w"]["udp"]
    assert summ["forwarder_spin_pct"]["median"] == pytest.approx(50.0)
    # never below zero when the machine was quieter than in the sender's cell
    kernel["cpu"]["softirq_s"] = 0.1
    assert report.derived_udp(kernel, other)["cpu_us_per_pkt"] == 0.0
    # nothing delivered: no per-packet figure rather than a division by zero
    kernel["metrics"]["delivered"] = 0
    assert "cpu_us_per_pkt" not in report.derived_udp(kernel, other)


def test_markdown_table_has_figures_ratios_and_statuses():
    doc = _doc()
    doc["summary"] = report.summarize_samples(doc["samples"])
    md = report.render_markdown(doc)
    table = report.markdown_table(doc)
    head = table.splitlines()[0]
    assert head.index("kernel forwarding") < head.index("nftables DNAT")   # reference first
    assert "udpflood alone" not in head                                     # not a column
    assert head.endswith("| lbcore rawsock |")        # two n/a variants share one column
    bulk = next(line for line in table.splitlines() if line.startswith("| TCP bulk, 4"))
    cells = [c.strip() for c in bulk.strip("|").split("|")]
    assert cells[1] == "15 Gbit/s ±10%"                   # the reference: no ratio
    assert cells[2] == "13.5 Gbit/s ±0% (**0.90x**)"
    assert cells[3] == "10 Gbit/s ±0% (**0.67x**)"
    assert cells[4] == "n/a (not implemented)"
    udp = next(line for line in table.splitlines() if "delivered" in line)
    assert "950k pps" in udp and "(**0.80x**)" in udp and "n/a (TCP only)" in udp
    loss = next(line for line in table.splitlines() if "loss" in line)
    assert "15.5 %" in loss and "x**" not in loss        # no ratio of a loss
    assert "bulk1" not in md and "1 stream" not in table  # workloads not run: no rows
    assert "Sender ceiling" in md and "1M pps" in md
    ceiling = next(line for line in table.splitlines() if "sender ceiling" in line)
    assert "(udpflood alone: 1M pps ±10%)" in ceiling      # the ceiling, in the row's title
    cells = [c.strip() for c in ceiling.strip("|").split("|")]
    assert cells[1:4] == ["0.95 ±0%", "0.76 ±10%", "n/a (TCP only)"]
    cpu = next(line for line in table.splitlines() if "CPU per delivered packet" in line)
    cells = [c.strip() for c in cpu.strip("|").split("|")]
    assert cells[1] == "0.289 µs ±0%" and cells[2] == "0.4 µs ±0% (**1.38x**)"
    latency_rows = [r.label for r in report.ROWS if r.workload == "latency"]
    assert any("p50" in r for r in latency_rows) and any("p99" in r for r in latency_rows)
    assert "kernel forwarding" in md.split("Sender ceiling")[1].split("\n")[0]  # sender-bound
    assert "nftables / conn: 1 repetition(s) failed" in md
    assert "haproxy / conn: up to 3 HTTP errors" in md
    assert "| HTTP new connections | 10 % (90 / 10) |" in md
    assert "- a note" in md
    assert ("- lab for peers, repetition 2: the lab was removed while the bench used it "
            "… details") in md


def test_readme_table_rows_in_order_for_the_five_systems(tmp_path, capsys):
    doc = _doc()
    doc["summary"] = report.summarize_samples(doc["samples"])
    table = report.readme_table(doc).splitlines()
    # kernel, nftables, haproxy; the n/a rawsock column; no 2-worker or sender column
    assert table[0] == ("| workload | kernel forwarding | nftables DNAT | HAProxy | "
                        "lbcore rawsock |")
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert labels == ["UDP 64 B, delivered at the backends",
                      "UDP 64 B, forwarder CPU per delivered packet (lower is better)",
                      "UDP 64 B, delivered / sender ceiling (udpflood alone: 1M pps ±10%)",
                      "TCP bulk, 4 streams (iperf3)",
                      "HTTP new connections/s (wrk, Connection: close)"]  # only what ran
    path = tmp_path / "run.json"
    path.write_text(json.dumps(_doc()))
    assert report.main([str(path), "--readme"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == table
    assert not (tmp_path / "run.md").exists()           # printed, nothing re-rendered
    keys = {(r.workload, r.metric) for r in report.ROWS}
    assert set(report.README_ROWS) <= keys


def test_charts_and_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    written = report.write_outputs(_doc(), tmp_path / "lab-test")
    names = sorted(p.name for p in written)
    assert names == ["lab-test-absolute.png", "lab-test-ratios.png", "lab-test.json",
                     "lab-test.md"]
    for p in written:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    again = json.loads((tmp_path / "lab-test.json").read_text())
    assert again["summary"]["nftables"]["bulk4"]["gbps"]["median"] == 13.5


def test_compare_two_runs():
    old = _doc()
    old["summary"] = report.summarize_samples(old["samples"])
    new = _doc()
    for s in new["samples"]:
        if s["system"] == "haproxy" and s["workload"] == "bulk4":
            s["metrics"]["gbps"] = 12.0
    new["summary"] = report.summarize_samples(new["samples"])
    text = report.compare(old, new)
    line = next(x for x in text.splitlines() if "4 streams" in x and "haproxy" in x)
    assert "(0.67x)" in line and "(0.80x)" in line and line.endswith("| 1.20 |")


# --------------------------------------------------------------------------- configs

BACKENDS = ["198.19.0.11", "198.19.0.12", "198.19.0.13"]


def test_nftables_ruleset_spreads_over_every_backend():
    text = peers.nftables_dnat("198.18.100.1", BACKENDS)
    assert text.count("jhash ip saddr .") == 3           # :80, nginx's :8080, udp 5300
    assert f"tcp dport {peers.NGINX_PORT} dnat to jhash" in text
    assert "map { 0 : 198.19.0.11, 1 : 198.19.0.12, 2 : 198.19.0.13 }" in text
    assert "mod 3" in text and "masquerade" not in text
    assert "tcp dport 5201 dnat to 198.19.0.11" in text


def test_haproxy_config():
    text = peers.haproxy_config("198.18.100.1", BACKENDS, pidfile="/tmp/x.pid",
                                maxconn=peers.haproxy_maxconn(20000))
    assert "mode tcp" in text and "balance roundrobin" in text and "nbthread 1" in text
    assert "bind 198.18.100.1:80" in text and "bind 198.18.100.1:5201" in text
    assert f"bind 198.18.100.1:{peers.NGINX_PORT}" in text
    assert text.count(f":{peers.NGINX_PORT} check inter 1s") == 3      # every nginx
    assert text.count("server be") == 7
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy not installed (make bench-lab installs it)")
    cfg = Path("/tmp") / f"benchlab-test-{os.getpid()}.cfg"
    try:
        cfg.write_text(text)
        r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    finally:
        cfg.unlink()
    assert r.returncode == 0, r.stdout + r.stderr


def test_lbcore_bench_config_adds_the_bulk_port():
    lab_cfg = ('[global]\nmode = "tun"\n\n[[vip]]\naddress = "198.18.100.1"\nport = 80\n'
               'protocol = "tcp"\npool = "web"\n\n[pool.web]\nbackends = [\n'
               '    { address = "198.19.0.11", port = 80, weight = 1 },\n]\n\n'
               '[pool.web.health]\ntype = "tcp"\n')
    doc = tomllib.loads(peers.lbcore_bench_config(lab_cfg, "198.18.100.1", "198.19.0.11"))
    assert [(v["port"], v["pool"]) for v in doc["vip"]] == [(80, "web"), (5201, "bulk")]
    assert doc["pool"]["bulk"]["backends"] == [{"address": "198.19.0.11", "port": 5201,
                                                "weight": 1}]
    assert "health" not in doc["pool"]["bulk"]
    assert doc["pool"]["web"]["health"]["type"] == "tcp"
    # with the backends: the nginx port over all of them, health-checked
    doc = tomllib.loads(peers.lbcore_bench_config(lab_cfg, "198.18.100.1", "198.19.0.11",
                                                  BACKENDS))
    assert [(v["port"], v["pool"]) for v in doc["vip"]] == [
        (80, "web"), (5201, "bulk"), (peers.NGINX_PORT, "nginx")]
    assert [b["address"] for b in doc["pool"]["nginx"]["backends"]] == BACKENDS
    assert {b["port"] for b in doc["pool"]["nginx"]["backends"]} == {peers.NGINX_PORT}
    assert doc["pool"]["nginx"]["health"]["type"] == "tcp"


@pytest.mark.parametrize("mode", ["tun", "rawsock"])
def test_lbcore_bench_config_passes_lbcore_loader(tmp_path, mode):
    """The config the bench starts lbcore with: the lab's own, the bulk port and the nginx
    pool, accepted by lbcore's loader with every backend in the nginx pool."""
    import ipaddress

    from lbcore import lab
    from lbcore.config import load_config
    base = lab.render_config(lab.LabSpec(mode=mode), tmp_path)
    path = tmp_path / "bench.toml"
    path.write_text(peers.lbcore_bench_config(base, lab.VIP_V4, lab.backend_v4(1), BACKENDS))
    cfg = load_config(path)
    keys = {(str(v.address), v.port, v.protocol): v.pool for v in cfg.vips}
    assert keys[(lab.VIP_V4, peers.NGINX_PORT, "tcp")] == "nginx"
    assert keys[(lab.VIP_V4, peers.BULK_PORT, "tcp")] == "bulk"
    assert {b.address for b in cfg.pools["nginx"].backends} == {
        ipaddress.ip_address(b) for b in BACKENDS}


def _nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def test_nginx_config(tmp_path):
    """What the brief for the HTTP backends asks: one worker, no access log, keep-alive that
    outlasts a cell, a tiny static body, everything nginx writes inside the prefix."""
    text = peers.nginx_config("be2", str(tmp_path))
    lines = [x.strip() for x in text.splitlines()]
    for want in ("daemon off;", "master_process on;", "worker_processes 1;", "access_log off;",
                 "keepalive_timeout 65s;", "keepalive_requests 1000000;",
                 f"listen {peers.NGINX_PORT} backlog=4096;", 'return 200 "be2\\n";',
                 f"pid {tmp_path}/nginx.pid;", "error_log stderr warn;"):
        assert want in lines, want
    for path in (x.split()[1].rstrip(";") for x in lines if "_temp_path" in x):
        assert path.startswith(str(tmp_path) + "/")
    with pytest.raises(ValueError):
        peers.nginx_config("be1; evil", str(tmp_path))
    nginx = _nginx()
    if nginx is None:
        pytest.skip("nginx not installed (make bench-lab installs it)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    r = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_workload_names_and_aliases():
    from bench.lab import run
    a = run._parse_args(["--workloads", "http_new,http_keepalive,latency",
                         "--systems", "nftables"])
    assert a.workloads == ["conn", "keepalive", "latency"]
    assert a.systems == ["kernel", "nftables"]        # the reference is always measured
    assert run.HTTP_WORKLOADS <= set(run.ALL_WORKLOADS)
    with pytest.raises(SystemExit):
        run._parse_args(["--workloads", "nope"])


def test_cpu_seconds_sum_every_cpu():
    before = parse.parse_proc_stat("cpu0 100 0 50 1000 0 0 10 0\ncpu1 10 0 5 2000 0 0 0 0\n")
    after = parse.parse_proc_stat("cpu0 150 0 70 1100 5 0 40 0\ncpu1 110 0 5 2000 0 0 0 0\n")
    # cpu0: 50 user + 20 system + 30 softirq; cpu1: 100 user; idle and iowait do not count
    assert parse.cpu_seconds(before, after, 100) == pytest.approx(2.0)
    assert parse.cpu_seconds(before, after, 100, ("softirq",)) == pytest.approx(0.3)


@pytest.mark.netns
def test_nftables_rulesets_load(tmp_path):
    """Both rulesets are accepted by the kernel (in a throwaway namespace: unshare -n)."""
    if shutil.which("nft") is None or shutil.which("unshare") is None:
        pytest.skip("nft or unshare missing (make bench-lab installs nftables)")
    gw = tmp_path / "gw.nft"
    be = tmp_path / "be.nft"
    gw.write_text(peers.nftables_dnat("198.18.100.1", BACKENDS))
    be.write_text(peers.backend_counter())
    r = subprocess.run(["unshare", "-n", "sh", "-c",
                        f"nft -f {gw} && nft -f {be} && nft -j list counter inet "
                        f"{peers.NFT_TABLE} flood"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    counters = [x["counter"] for x in json.loads(r.stdout)["nftables"] if "counter" in x]
    assert counters[0]["name"] == "flood" and counters[0]["packets"] == 0


# --------------------------------------------------------------------------- the sender

@pytest.fixture(scope="module")
def flood_binary(tmp_path_factory):
    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("no gcc")
    out = tmp_path_factory.mktemp("flood") / "udpflood"
    r = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                        "-o", str(out), str(ROOT / "bench" / "lab" / "udpflood.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_udpflood_sends_and_reports(flood_binary):
    """A 0.3 s burst to a loopback sink: the sink counts what the sender says it sent."""
    import socket
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    port = sink.getsockname()[1]
    r = subprocess.run([str(flood_binary), "-d", "127.0.0.1", "-p", str(port), "-f", "4",
                        "-s", "41000", "-l", "64", "-t", "0.3"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    res = parse.parse_flood(r.stdout)
    assert res["sent"] > 1000 and res["flows"] == 4 and res["payload"] == 64
    assert 0.25 < res["elapsed"] < 2.0
    sink.setblocking(False)
    got = sink.recvfrom(2048)
    assert len(got[0]) == 64 and 41000 <= got[1][1] < 41004
    sink.close()


def test_udpflood_rejects_bad_arguments(flood_binary):
    for args in (["-p", "80"], ["-d", "x", "-p", "80"], ["-d", "127.0.0.1", "-p", "0"],
                 ["-d", "127.0.0.1", "-p", "9", "-t", "1000"]):
        r = subprocess.run([str(flood_binary), *args], capture_output=True, text=True, timeout=5)
        assert r.returncode == 2 and "usage" in r.stderr


def test_wakeprobe_measures_wake_ups_and_stalls(tmp_path):
    """The machine probe: JSON with the wake-up distribution of a thread on CPU 1 woken by
    CPU 0 and the stall figures of a thread spinning there; bad arguments exit 2."""
    if shutil.which("gcc") is None or (os.cpu_count() or 1) < 2:
        pytest.skip("needs gcc and two CPUs")
    out = tmp_path / "wakeprobe"
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                        "-pthread", "-o", str(out), str(ROOT / "bench" / "lab" / "wakeprobe.c")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(out), "-a", "0", "-b", "1", "-n", "20", "-p", "2", "-s", "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["wake_n"] == 20
    assert 0 < res["wake_p50_us"] <= res["wake_p99_us"]
    assert 0.99 <= res["spin_s"] < 5
    assert 0 <= res["stalls_over_1ms_per_s"] and res["stall_ms_per_s"] >= 0
    for args in ([], ["-a", "0"], ["-a", "0", "-b", "0"], ["-a", "0", "-b", "1", "-n", "1"],
                 ["-a", "0", "-b", "99999"], ["-a", "0", "-b", "1", "-p", "x"]):
        r = subprocess.run([str(out), *args], capture_output=True, text=True, timeout=5)
        assert r.returncode == 2, args


def test_wakeprobe_line_and_latency_only_columns():
    doc = _doc()
    doc["settings"]["workloads"].append("latency")
    doc["wakeprobe"] = [
        {"rep": 0, "wake_p50_us": 50.0, "wake_p99_us": 120.0, "wake_n": 300,
         "stall_ms_per_s": 1.0, "stalls_over_1ms_per_s": 0.5, "spin_s": 3.0},
        {"rep": 1, "error": "wakeprobe: the sleeper failed"},
        {"rep": 2, "wake_p50_us": 70.0, "wake_p99_us": 200.0, "wake_n": 300,
         "stall_ms_per_s": 3.0, "stalls_over_1ms_per_s": 1.5, "spin_s": 3.0}]
    doc["systems"]["lbcore-tun-1w-poll"] = {"label": "lbcore tun, polling", "status": "ok",
                                            "only": ["latency"]}
    for rep in range(3):
        doc["samples"] += [_sample("kernel", "latency", rep, p50_us=300.0, p99_us=500.0),
                           _sample("lbcore-tun-1w-poll", "latency", rep, p50_us=240.0,
                                   p99_us=900.0, cpu1=100.0)]
    doc["summary"] = report.summarize_samples(doc["samples"])
    line = report.wakeprobe_line(doc)
    assert "2 run(s)" in line and "p50 60 µs" in line and "p99 160 µs" in line
    assert "2.0 ms per second" in line and "(1.0 per second over 1 ms)" in line
    table = report.markdown_table(doc)
    p50 = next(ln for ln in table.splitlines() if ln.startswith("| latency p50"))
    assert p50.rstrip(" |").endswith("240 µs ±0% (**0.80x**)")
    bulk = next(ln for ln in table.splitlines() if ln.startswith("| TCP bulk, 4"))
    assert bulk.rstrip(" |").endswith("–")                 # a workload it does not run
    assert report.wakeprobe_line({"wakeprobe": [{"rep": 0, "error": "x"}]}) is None
    assert line in report.render_markdown(doc)


def test_a_systems_own_lbcore_setting_yields_to_the_command_line():
    assert run._unless_given(["busy_poll_us = 20000", "workers = 1"],
                             ["busy_poll_us=0"]) == ["workers = 1"]
    assert run._unless_given(run.POLL_GLOBAL, []) == list(run.POLL_GLOBAL)
    polls = [s for s in run.SYSTEMS.values() if s.lbcore_global]
    assert {s.mode for s in polls} == {"tun", "rawsock"}
    assert all(s.only == ("latency",) for s in polls)


# --------------------------------------------------------------------------- one real cell

@pytest.mark.netns
@pytest.mark.slow
def test_one_tiny_real_cell(tmp_path):
    """The harness end to end on the lab: kernel forwarding, UDP, latency and new HTTP
    connections (both against the bench's nginx), 1 s cells."""
    from lbcore import lab
    for tool in ("nft", "wrk", "iperf3", "gcc", "taskset", "nginx"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            pytest.skip(f"{tool} missing (make bench-lab installs it)")
    stem = tmp_path / "tiny"
    with lab.turn():       # our turn with the lab; the harness must not wait for it again
        lab.down(out=lambda _: None)    # a lab left over by a crashed session, as tests do
        r = subprocess.run([sys.executable, "-m", "bench.lab.run", "--systems", "kernel",
                            "--workloads", "udp,latency,conn", "--reps", "1", "--seconds", "1",
                            "--no-install", "--no-lab-lock", "--out", str(stem)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        gone = not lab.present_namespaces()
    assert r.returncode == 0, r.stderr[-3000:]
    assert gone                                          # torn down
    doc = json.loads(stem.with_suffix(".json").read_text())
    s = doc["summary"]
    assert s["kernel"]["udp"]["delivered_pps"]["median"] > 1000
    assert s["sender"]["udp"]["offered_pps"]["median"] > 1000
    assert 0 < s["kernel"]["latency"]["p50_us"]["median"] < 1e6
    assert s["kernel"]["conn"]["cps"]["median"] > 100        # nginx answered
    assert s["kernel"]["conn"]["errors"]["max"] == 0
    assert s["kernel"]["udp"]["cpu_us_per_pkt"]["n"] == 1
    probe, = doc["wakeprobe"]                 # the machine, once per repetition
    assert "error" in probe or probe["wake_p50_us"] > 0
    assert "nginx" in doc["machine"]["versions"]
    assert doc["systems"]["kernel"]["status"] == "ok"
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["versions"]["wrk"] != "?"
