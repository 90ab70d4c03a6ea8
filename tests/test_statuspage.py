"""The read-only HTTP listener (/, /status.json, /metrics) over a real _core.Dataplane, the
StatusView's rates, the page's rendering and `lbcore top`'s rendering, without a network: the
listener binds a free loopback port. The lab test (test_statuspage_e2e) looks at the same page
in a browser."""
from __future__ import annotations

import asyncio
import contextlib
import http.client
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
