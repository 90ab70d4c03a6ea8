"""The read-only HTTP listener (/, /status.json, /metrics) over a real _core.Dataplane, the
StatusView's rates, the page's rendering and `lbcore top`'s rendering, without a network: the
listener binds a free loopback port. The lab test (test_statuspage_e2e) looks at the same page
in a browser."""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import re
import socket
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.text import Text
from test_status import add_flow, make_daemon

from lbcore.control import page, top
from lbcore.control.fmt import duration, si
from lbcore.control.metrics import start_metrics
from lbcore.control.status import RateKeeper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, method: str, path: str, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def with_listener(d, fn: Callable[[int], Any]) -> Any:
    """Run ``fn(port)`` in a thread while the daemon's listener serves on ``port`` from a running
    event loop (as in the daemon), then close it; return fn's result and check the port is
    closed after."""
    port = free_port()

    async def go():
        async with contextlib.AsyncExitStack() as stack:
            start_metrics((IPv4Address("127.0.0.1"), port), d.view, stack)
            result = await asyncio.to_thread(fn, port)
        return result
    result = asyncio.run(go())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return result


def test_page_json_and_metrics_on_one_port():
    d = make_daemon()
    add_flow(d, "198.18.0.2", 40000, "198.19.0.12")

    def look(port: int):
        return {p: get(port, "GET", p) for p in ("/", "/status.json", "/metrics")}
    got = with_listener(d, look)

    status, h, body = got["/"]
    assert status == 200 and h["content-type"].startswith("text/html")
    text = body.decode()
    assert 'data-backend="198.19.0.11:80" data-state="up"' in text
    assert 'data-backend="198.19.0.12:80" data-state="up"' in text
    assert "default-src 'none'" in h["content-security-policy"]

    status, h, body = got["/status.json"]
    assert status == 200 and h["content-type"] == "application/json"
    st = json.loads(body)
    # the same data as `lbcore status --json` (which prints view.snapshot())
    assert set(st) == set(d.view.snapshot())
    [vip] = st["vips"]
    assert {b["address"]: b["active_flows"] for b in vip["backends"]} == {
        "198.19.0.11": 0, "198.19.0.12": 1}

    status, h, body = got["/metrics"]
    assert status == 200 and h["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert fams["lbcore_flow_table_entries"].samples[0].value == 1


def test_read_only_and_unknown_paths():
    d = make_daemon()

    def look(port: int):
        return [get(port, m, "/") for m in ("POST", "PUT", "DELETE")] + [
            get(port, "HEAD", "/status.json"), get(port, "GET", "/status.json"),
            get(port, "GET", "/nope"),
            get(port, "GET", "/metrics", {"Accept": "application/openmetrics-text; "
                                                     "version=1.0.0"})]
    *writes, head, full, missing, om = with_listener(d, look)
    for status, h, _ in writes:
        assert status == 405 and h["allow"] == "GET, HEAD" and h["connection"] == "close"
    assert head[0] == 200 and head[2] == b"" and int(head[1]["content-length"]) > 100
    assert full[0] == 200 and full[2]
    assert missing[0] == 404
    assert om[0] == 200 and om[1]["content-type"].startswith("application/openmetrics-text")
    assert om[2].decode().rstrip().endswith("# EOF")


def test_page_is_self_contained():
    """Nothing on the page points off it: no external scripts, styles, fonts or images, and
    the links are relative (a gateway has no internet; the page may sit behind a proxy)."""
    d = make_daemon()
    html = page.render(d.view.snapshot())
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert set(re.findall(r"href=\"([^\"]+)\"", html)) == {"status.json", "metrics"}
    # the inline blocks are the ones the CSP allows by hash
    assert html.count("<script>") == 1 and html.count("<style>") == 1
    assert page.STYLE in html and page.SCRIPT in html


def states(html: str) -> dict[str, str]:
    return dict(re.findall(r'data-backend="([^"]+)" data-state="(\w+)"', html))


def test_page_shows_down_draining_and_escapes():
    d = make_daemon()
    bal = d.balancer
    [(v, b1)] = bal.find_backends("web", "198.19.0.11")
    [(_, b2)] = bal.find_backends("web", "198.19.0.12")
    bal.set_health(v, b1, False, "HTTP 500 <script>alert(1)</script>")
    bal.drain(v, b2, True)
    html = page.render(d.view.snapshot())
    assert states(html) == {"198.19.0.11:80": "down", "198.19.0.12:80": "draining"}
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html
    assert "0 of 2 backends usable" in html and "lbcore: 1 backend down" in html


def test_page_and_top_render_bgp_when_the_snapshot_has_it():
    d = make_daemon()
    s = d.view.snapshot()
    assert "BGP" not in page.render(s)
    s["bgp"] = {"sessions": [{"peer": "198.18.0.9", "state": "established"}]}
    assert "198.18.0.9" in page.render(s) and "established" in page.render(s)
    s["bgp"] = [{"peer": "198.18.0.9", "state": "idle"}]
    html = page.render(s)
    assert "<th>peer</th>" in html and "<td>idle</td>" in html
    con = Console(width=160, record=True)
    con.print(top.render(s))
    assert "BGP: peer=198.18.0.9, state=idle" in con.export_text()


def test_rates_come_from_two_samples():
    rk = RateKeeper(min_interval=1.0, max_interval=10.0)
    assert rk.update(100.0, {"a": 0}) == (None, {})
    assert rk.update(100.5, {"a": 50}) == (None, {})     # too close for a rate
    dt, r = rk.update(101.0, {"a": 100, "b": 7})
    assert dt == 1.0 and r == {"a": 100.0}               # b has no earlier sample
    dt, r = rk.update(101.6, {"a": 130, "b": 9})
    assert dt == pytest.approx(1.1) and r["a"] == pytest.approx(80 / 1.1)  # base: 100.5
    dt, r = rk.update(102.7, {"a": 10, "b": 10})         # a went backwards: no rate
    assert "a" not in r and r["b"] == pytest.approx(1 / 1.1)
    assert rk.update(200.0, {"a": 0}) == (None, {})      # everything older was forgotten
    assert len(rk._samples) == 1
    for i in range(1, 1001):                               # a reader looking every ms
        rk.update(200.0 + i / 1000, {"a": i})
    assert len(rk._samples) <= 6
    dt, r = rk.update(201.5, {"a": 1500})
    assert 1.0 <= dt <= 1.5 and r["a"] == pytest.approx(1000)


def test_snapshot_rates_follow_the_counters():
    """A VIP's rate is its counter's growth between two snapshots over the time between."""
    d = make_daemon()
    s1 = d.view.snapshot()
    assert s1["vips"][0]["rates"] == {"packets": None, "bytes": None, "new_flows": None}
    assert s1["rates"]["interval"] is None
    add_flow(d, "198.18.0.2", 40000, "198.19.0.12")
    time.sleep(1.0)
    s2 = d.view.snapshot()
    assert s2["rates"]["interval"] >= 0.9
    assert s2["rates"]["flows"]["inserted"] == pytest.approx(1 / s2["rates"]["interval"])
    assert s2["vips"][0]["usable_backends"] == 2


def test_top_renders_states_and_stale():
    d = make_daemon()
    bal = d.balancer
    [(v, b1)] = bal.find_backends("web", "198.19.0.11")
    bal.set_health(v, b1, False, "connect refused")
    s = d.view.snapshot()
    con = Console(width=160, record=True)
    con.print(top.render(s))
    con.print(top.render(s, "nothing listens"))
    con.print(top.render(None, "no control socket"))
    out = con.export_text()
    assert re.search(r"198\.19\.0\.11:80\s+DOWN\s.*connect refused", out)
    assert re.search(r"198\.19\.0\.12:80\s+UP\s", out)
    assert "1/2 usable" in out
    assert "STALE: no answer from lbcore (nothing listens)" in out
    assert "waiting for the balancer: no control socket" in out


def test_formatting():
    assert si(None) == "–" and si(0) == "0" and si(12.5, "/s") == "12.5 /s"
    assert si(1234, "B/s") == "1.2 kB/s" and si(2_500_000) == "2.5 M"
    assert si(3e18) == "3000.0 P"
    assert duration(45) == "45s" and duration(200) == "3m 20s" and duration(90061) == "1d 1h"


def test_the_new_views_read_only_through_the_status_view():
    """The page, the HTTP listener and top show snapshots; none reaches the data plane or the
    balancer itself."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "lbcore" / "control"
    for name in ("web.py", "page.py", "top.py", "fmt.py"):
        text = (root / name).read_text()
        assert ".dp." not in text and ".flow_table" not in text and ".balancer" not in text, name


# --------------------------------------------------------------------------- the data plane

def with_dataplane(s: dict[str, Any], link: str = "lbc-br0",
                   reason: str = "[Errno 95] no clsact") -> dict[str, Any]:
    """Snapshot ``s`` with every data plane part present, shaped as the daemon gives them
    (rawsock's status, the shed filter's, the sync's counters, adopt_flows' answer), with one
    rawsock link fallen back to blackhole routes (named ``link``, for ``reason``), frames lost
    to full rings and the shed filter shedding: the states `lbcore status` colours."""
    return {**s,
            "io": "io_uring",
            "busy_poll": {"window_us": 50, "seconds": 12.34, "cores": 0.031},
            "cpus": {"workers": [3, 2], "control": [0, 1]},
            "fragments": {"first": 5, "forwarded": 4, "held": 2, "released": 2,
                          "early_dropped": 1, "dropped": 0, "timeouts": 1, "timeout_held": 0,
                          "evicted": 0, "completed": 1, "entries": 1, "buffers": 1,
                          "capacity": 1024, "buffer_capacity": 4096, "memory": 1},
            "adoption": {"adopted": 17, "seconds": 0.0123, "expired": 2, "full": 0},
            "tun": {"name": "lbc0", "adopted": True, "ifindex": 5},
            "sync": {"peers": ["198.18.0.7:7000"],
                     "sent": {"records_new": 3, "records_refresh": 4, "records_end": 1,
                              "datagrams": 2, "send_errors": 0, "ring_drops": 0,
                              "end_ring_drops": 0},
                     "received": {"records": 9, "inserted": 7},
                     "rejected": {"stale": 0, "bad_version": 2}},
            "shed": {"filter": "tun-ebpf", "tun_dropped": 3, "active": True,
                     "since": s["time"] - 42, "max_share": 0.5, "headroom": 2,
                     "vips": [{"address": "198.18.100.1", "port": 80, "protocol": "tcp",
                               "name": "web", "new_flow_rate": 1000, "share": 0.25,
                               "syns": 900, "shed": 300, "retried": 12, "syn_rate": 4000.4,
                               "last_active": 1.0}]},
            "rawsock": {"kernel_copy": {
                "lbc-gw-cl": {"dropped_by": "tc", "reason": None, "dropped": 1234},
                link: {"dropped_by": "routes", "reason": reason, "dropped": None}},
                "ring_drops": 7}}


NO_DATAPLANE = dict.fromkeys(("io", "busy_poll", "cpus", "fragments", "adoption", "tun", "sync",
                              "shed", "rawsock"))


def items(html: str) -> dict[str, str]:
    """The data plane section's top-level lines: {data-part: the <li> tag and its content}."""
    return {m[1]: m[0] for m in re.finditer(r'<li data-part="(\w+)"[^>]*>.*?(?=<li|</ul>)',
                                            html, re.S)}


def top_text(s: dict[str, Any], width: int = 160) -> tuple[str, dict[str, str]]:
    """top's screen for ``s`` as text, and the style of each styled piece of its lines."""
    r = top.render(s, now=s["time"])
    con = Console(width=width, record=True, file=io.StringIO())
    con.print(r)
    styles = {}
    for t in r.renderables:
        if isinstance(t, Text):
            styles |= {t.plain[sp.start:sp.end]: str(sp.style) for sp in t.spans}
    return con.export_text(), styles


def test_page_shows_the_data_plane_as_status_judges_it():
    d = make_daemon()
    s = with_dataplane(d.view.snapshot())
    s["bgp"] = {"state": "up"}
    html = page.render(s)
    # one section, after the VIPs and BGP, before the counters, inside the part the page's
    # script swaps in place every second (so it is as live as the rest)
    assert html.count('<section class="dataplane"><h3>Data plane</h3>') == 1
    content = html[html.index('<main id="content">'):html.index("</main>")]
    assert '"content"' in page.SCRIPT and 'class="dataplane"' in content
    assert (content.index('<section class="bgp">') < content.index('class="dataplane"')
            < content.index('<div class="grid">'))
    it = items(html)
    assert list(it) == ["io", "busy_poll", "cpus", "rawsock", "fragments", "adoption", "tun",
                        "sync", "shed"]
    assert "CPUs: worker(s) on 3, 2; control plane on 0, 1" in it["cpus"]
    assert "I/O path: io_uring" in it["io"]
    assert ("busy poll 50 µs after traffic: 3.1 % of a core spinning on empty queues, "
            "12.3 s since start") in it["busy_poll"]
    # the fallen-back link is a warning, the ring drops bad; the row takes the worst
    assert it["rawsock"].startswith('<li data-part="rawsock" class="bad">')
    assert ("kernel copies: lbc-gw-cl: tc filter, 1234 dropped; lbc-br0: "
            '<span class="warn">blackhole routes only</span> ([Errno 95] no clsact)  '
            '<span class="bad">7 frames lost to full rings</span>') in it["rawsock"]
    assert "fragments: 1/1024 datagrams, 1/4096 held; first 5," in it["fragments"]
    assert "flow table at start: adopted 17 flow(s) in 0.012s (skipped expired=2)" in (
        it["adoption"])
    assert "tun lbc0: attached to the last run&#x27;s device" in it["tun"]
    assert ("sync with 198.18.0.7:7000: sent 3 new, 4 refresh, 1 end in 2 datagrams; "
            "received records=9, inserted=7; rejected bad_version=2") in it["sync"]
    assert it["shed"].startswith('<li data-part="shed" class="bad">SYN shed filter before the '
                                 'TUN queue: <span class="bad">shedding</span> since 42s ago'
                                 "  (TUN dropped 3)<ul>")
    assert ("web 198.18.100.1:80/tcp: new_flow_rate 1000/s, offered 4000 new-flow SYNs/s, "
            "share 25%; seen 900, shed 300, retries passed 12") in html
    for plain_part in ("io", "busy_poll", "cpus", "fragments", "adoption", "tun", "sync"):
        assert "class=" not in it[plain_part], plain_part
    # the classes are styled: a row's colour band and background, a piece's colour
    for rule in ("section.dataplane li.warn", "section.dataplane li.bad",
                 "section.dataplane span.warn", "section.dataplane span.bad",
                 "section.dataplane span.ok"):
        assert rule in page.STYLE

    # the good states: no warning anywhere; shed idle is "ok"; nothing lost, no window
    s["rawsock"] = {"kernel_copy": {"lbc-gw-cl": {"dropped_by": "tc", "reason": None,
                                                  "dropped": 0}}, "ring_drops": 0}
    s["shed"] = {**s["shed"], "active": False, "since": None, "tun_dropped": None}
    s["busy_poll"] = {"window_us": 0, "seconds": 0.0, "cores": None}
    s["adoption"] = {"adopted": 0, "refused": "no flow file", "code": "open"}
    s["tun"] = {"name": "lbc0", "adopted": False, "ifindex": 5}
    s["cpus"] = {"workers": [1, 0], "control": None}
    it = items(page.render(s))
    assert 'class="warn"' not in "".join(it.values())
    assert 'class="bad"' not in "".join(it.values())
    assert ("kernel copies: lbc-gw-cl: tc filter, 0 dropped  no frames lost to full rings"
            in it["rawsock"])
    assert ('SYN shed filter before the TUN queue: <span class="ok">idle</span><ul>'
            in it["shed"])
    assert "busy poll off (busy_poll_us = 0)" in it["busy_poll"]
    assert "flow table at start: not adopted (no flow file)" in it["adoption"]
    assert "tun lbc0: made at start" in it["tun"]
    assert ("CPUs: worker(s) on 1, 0; control plane on every CPU (none is left without a "
            "worker)") in it["cpus"]


def test_page_and_top_without_the_data_plane_parts():
    d = make_daemon()
    s = {**d.view.snapshot(), **NO_DATAPLANE}
    html = page.render(s)
    assert "Data plane</h3>" not in html and "data-part=" not in html
    assert "Data plane totals" in html          # the counters are still there
    out, _ = top_text(s)
    starts = ("I/O path", "busy poll", "CPUs:", "kernel copies", "fragments:",
              "flow table at start", "tun ", "sync with", "SYN shed")
    assert not [ln for ln in out.splitlines() if ln.startswith(starts)], out
    # a snapshot from before these parts existed renders too
    old = {k: x for k, x in d.view.snapshot().items() if k not in NO_DATAPLANE}
    assert "Data plane</h3>" not in page.render(old)
    assert "busy poll" not in top_text(old)[0]
    # parts with nothing to say are left out: no fragment seen yet, a shed filter guarding
    # no VIP (as `lbcore status` leaves them out)
    s = d.view.snapshot()
    assert s["fragments"] is not None and not s["fragments"]["first"]
    s["shed"] = {"filter": "idle", "tun_dropped": None, "active": False, "since": None,
                 "vips": []}
    assert list(items(page.render(s))) == ["busy_poll"]        # window 0 in the test config
    out, _ = top_text(s)
    assert "busy poll off" in out and "fragments:" not in out and "SYN shed" not in out


def test_data_plane_strings_are_escaped():
    d = make_daemon()
    evil = "<script>alert(1)</script>"
    s = with_dataplane(d.view.snapshot(), link=f'x"{evil}', reason=evil)
    s["tun"] = {"name": evil, "adopted": True, "ifindex": 1}
    s["adoption"] = {"adopted": 0, "refused": evil}
    s["sync"]["peers"] = [evil]
    s["shed"]["vips"][0]["name"] = evil
    s["io"] = evil
    html = page.render(s)
    assert html.count("<script>") == 1 and "alert(1)</script>" not in html   # only the page's
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 7
    assert 'x&quot;&lt;script&gt;' in html
    # top shows them as text (rich markup in them is not interpreted either)
    s["tun"]["name"] = "[bold red]lbc0[/]"
    out, _ = top_text(s)
    assert f"x\"{evil}: blackhole routes only ({evil})" in out
    assert "tun [bold red]lbc0[/]: attached" in out


def test_top_shows_the_data_plane_as_status_judges_it():
    d = make_daemon()
    s = with_dataplane(d.view.snapshot())
    out, styles = top_text(s)
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("I/O path"))
    assert lines[at:at + 10] == [
        "I/O path: io_uring",
        "busy poll 50 µs after traffic: 3.1 % of a core spinning on empty queues, 12.3 s since "
        "start",
        "CPUs: worker(s) on 3, 2; control plane on 0, 1",
        "kernel copies: lbc-gw-cl: tc filter, 1234 dropped; lbc-br0: blackhole routes only "
        "([Errno 95] no clsact)  7 frames lost to full rings",
        "fragments: 1/1024 datagrams, 1/4096 held; first 5, forwarded 4, held 2, released 2, "
        "early_dropped 1, timeouts 1, evicted 0",
        "flow table at start: adopted 17 flow(s) in 0.012s (skipped expired=2)",
        "tun lbc0: attached to the last run's device",
        "sync with 198.18.0.7:7000: sent 3 new, 4 refresh, 1 end in 2 datagrams; received "
        "records=9, inserted=7; rejected bad_version=2",
        "SYN shed filter before the TUN queue: shedding since 42s ago  (TUN dropped 3)",
        "  web 198.18.100.1:80/tcp: new_flow_rate 1000/s, offered 4000 new-flow SYNs/s, share "
        "25%; seen 900, shed 300, retries passed 12"]
    # after the other lines: the backends' table comes first
    assert at > next(i for i, ln in enumerate(lines) if ln.startswith("flow table events"))
    assert styles["blackhole routes only"] == "bold yellow"
    assert styles["7 frames lost to full rings"] == "bold red"
    assert styles["shedding"] == "bold red"
    s["shed"]["active"] = False
    assert top_text(s)[1]["idle"] == "green"
    # a narrow terminal: a plain line is cut to one row, one with a warning wraps whole
    lines = top_text(s, width=60)[0].splitlines()
    [busy] = [ln for ln in lines if "busy poll" in ln]
    assert busy.startswith("busy poll 50 µs after traffic:") and busy.endswith("…")
    assert not [ln for ln in lines if "since start" in ln]
    assert "7 frames lost to full rings" in " ".join(" ".join(lines).split())


def test_status_page_and_top_say_the_same(monkeypatch, capsys):
    """`lbcore status`, the page and top word every data plane line alike (one helper each)."""
    from lbcore.control import client
    from lbcore.control.fmt import dataplane_lines, plain
    d = make_daemon()
    s = with_dataplane(d.view.snapshot())
    s["time"] = time.time()
    s["shed"]["since"] = s["time"] - 42
    monkeypatch.setattr(client, "request", lambda *a, **k: s)
    args = type("Args", (), {"json": False, "socket": "unused", "config": None})()
    assert client.cmd_status(args) == 0
    status = capsys.readouterr().out.replace("\n", "")
    text = re.sub(r"<[^>]+>", "", page.render(s))
    screen, _ = top_text(s, width=400)
    n = 0
    for _, lines in dataplane_lines(s, s["time"]):
        for line in lines:
            words = plain(line)
            assert words in status, words
            assert page.esc(words) in text, words
            assert words in screen, words
            n += 1
    assert n == 10
    # text from the snapshot is printed as it is, never read as rich markup
    s = {**s, "bgp": None}
    s["vips"][0]["name"] = "[bold]web[/]"
    s["vips"][0]["backends"][0]["reason"] = "[red]x[/] y"
    assert client.cmd_status(args) == 0
    status = capsys.readouterr().out
    assert "bgp: not configured (no [bgp] section)" in status
    assert "[bold]web[/]" in status and "([red]x[/] y)" in status
