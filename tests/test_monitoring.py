"""The shipped Grafana dashboard and Prometheus rules (examples/monitoring/) ask for metrics that
lbcore exports, with labels and label values it exports; promtool accepts the rules, their
unit tests pass, and every dashboard query is valid PromQL.

What lbcore exports is taken from the collector over a real _core.Dataplane (the same
exposition /metrics serves); the lab test (test_statuspage_e2e) checks the same names against
a running balancer's /metrics.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from test_status import add_flow, make_daemon

from lbcore.control.metrics import LbCollector
from lbcore.sync import END_REASONS, REJECT_REASONS

ROOT = Path(__file__).resolve().parent.parent
MON = ROOT / "examples" / "monitoring"
RULES = MON / "lbcore-alerts.yml"
RULE_TESTS = MON / "lbcore-alerts.test.yml"
DASHBOARD = MON / "lbcore-dashboard.json"
# labels Prometheus itself puts on every scraped series
TARGET_LABELS = {"job", "instance"}
# an lbcore metric with its optional {matchers}; one matcher; a by(...)/without(...) grouping
SELECTOR = re.compile(r"\b(lbcore_[a-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported(text: str) -> dict[str, dict[str, set[str]]]:
    """{sample name: {label: values seen}} of an exposition."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, dict[str, set[str]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = out.setdefault(s.name, {})
            for k, v in s.labels.items():
                labels.setdefault(k, set()).add(v)
    return out


def collector_exposition() -> str:
    """What /metrics serves for a small balancer with a flow, through the real collector."""
    import asyncio
    d = make_daemon()
    add_flow(d, "198.18.0.2", 40000, "198.19.0.12")

    class WithBgp:
        """The daemon's view, as a gateway with a [bgp] section and one session, a [sync]
        section, a TUN it adopted with a SYN shed filter on it and (as if in mode rawsock) two
        links, shows it."""

        def snapshot(self) -> dict:
            return d.view.snapshot() | {"bgp": {"sessions": [
                {"neighbor": "198.18.1.1", "as": 65000, "up": True}]}, "shed": {
                "active": True, "tun_dropped": 5, "vips": [
                    {"name": "web", "address": "198.18.100.1", "port": 80, "share": 0.5,
                     "syns": 10, "shed": 5, "retried": 0}]}, "rawsock": {
                "kernel_copy": {"eth0": {"dropped_by": "tc", "reason": None, "dropped": 7},
                                "eth1": {"dropped_by": "routes", "reason": "refused",
                                         "dropped": None}},
                "ring_drops": 3}, "tun": {"name": "lbc0", "adopted": True, "ifindex": 7},
                "sync": {"peers": ["198.18.2.2:7700"], "sent": {
                    **dict.fromkeys(("records_new", "records_refresh", "records_end",
                                     "datagrams", "send_errors", "ring_drops",
                                     "end_ring_drops"), 1),
                    **{f"end_{r}": 1 for r in END_REASONS}},
                    # received: only the outcomes seen so far (a Counter)
                    "received": {"datagrams": 2, "records": 3, "inserted": 2, "refreshed": 1},
                    "rejected": dict.fromkeys(REJECT_REASONS, 1)}}

    async def scrape() -> bytes:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(LbCollector(WithBgp(), asyncio.get_running_loop()))
        return await asyncio.to_thread(generate_latest, reg)
    return asyncio.run(scrape()).decode()


def rule_exprs(path: Path = RULES) -> list[str]:
    """The ``expr:`` of every rule, read from the YAML subset the rules file is written in (a
    plain or a block scalar); counted against the rules so that none is missed."""
    lines = path.read_text().splitlines()
    exprs = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value in ("|", "|-", ">", ">-"):
            block = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                block.append(nxt.strip())
            value = " ".join(block)
        exprs.append(value)
    n_rules = sum(1 for line in lines if re.match(r"^\s*- (alert|record):", line))
    assert len(exprs) == n_rules > 0
    return exprs


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL query of the dashboard: panel targets and templating queries."""
    out: list[str] = []

    def walk(x) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "expr" and isinstance(v, str):
                    out.append(v)
                elif k == "definition" and isinstance(v, str):
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(json.loads(path.read_text()))
    assert out
    return out


def problems(expr: str, have: dict[str, dict[str, set[str]]]) -> list[str]:
    """What in ``expr`` lbcore does not export: metric names, label names of selectors and
    groupings, and literal label values matched with = ."""
    bad = []
    used = SELECTOR.findall(expr)
    labels_in_expr = set(TARGET_LABELS)
    for name, sel in used:
        if name not in have:
            bad.append(f"metric {name} is not exported")
            continue
        labels_in_expr |= set(have[name])
        for label, op, value in MATCHER.findall(sel or ""):
            if label in TARGET_LABELS:
                continue
            if label not in have[name]:
                bad.append(f"{name} has no label {label}")
            elif op == "=" and "$" not in value and value not in have[name][label]:
                bad.append(f"{name}{{{label}}} never has the value {value!r}")
    for group in GROUPING.findall(expr):
        for label in (x.strip() for x in group.split(",") if x.strip()):
            if label not in labels_in_expr:
                bad.append(f"grouping by {label}, which no metric of the expression has")
    m = re.search(r"label_values\(\s*(lbcore_\w+)[^,]*,\s*(\w+)\s*\)", expr)
    if m and m.group(2) not in have.get(m.group(1), {}) | dict.fromkeys(TARGET_LABELS):
        bad.append(f"label_values of {m.group(1)} by {m.group(2)}, which it does not have")
    return bad


def check_against(have: dict[str, dict[str, set[str]]], absent_ok: tuple[str, ...] = ()) -> None:
    """Every metric the rules and the dashboard use is in ``have``; a metric whose name starts
    with one of ``absent_ok`` may be missing (a balancer without [bgp] has no BGP samples), and
    an expression with such a missing metric may group by labels ``have`` cannot show (the
    collector's test, with every metric present, checks those)."""
    bad = []
    for where, exprs in (("rules", rule_exprs()), ("dashboard", dashboard_exprs())):
        for expr in exprs:
            found = problems(expr, have)
            excused = [p for p in found if p.startswith("metric ")
                       and p.endswith(" is not exported") and p.split()[1].startswith(absent_ok)]
            bad += [f"{where}: {expr!r}: {p}" for p in found if p not in excused
                    and not (excused and p.startswith("grouping by "))]
    assert bad == []


def test_dashboard_and_rules_use_exported_metrics():
    check_against(exported(collector_exposition()))


def test_the_checker_catches_wrong_names_labels_and_values():
    have = exported(collector_exposition())
    assert problems("rate(lbcore_backend_packets[5m])", have) == [
        "metric lbcore_backend_packets is not exported"]   # a counter is exported as _total
    assert problems('lbcore_drops_total{cause="x"}', have) == [
        "lbcore_drops_total has no label cause"]
    assert problems('lbcore_flow_table_events_total{event="full"}', have) == [
        "lbcore_flow_table_events_total{event} never has the value 'full'"]
    assert problems("sum by (pool) (lbcore_backend_up)", have) == [
        "grouping by pool, which no metric of the expression has"]
    assert problems('sum by (instance, vip) (lbcore_backend_up{vip=~"$vip"})', have) == []


def test_the_balancer_exports_no_metric_the_rules_forget():
    """Every kind of exported metric that warrants an alert has a rule: so far the backends,
    the flow table, the drops, the BGP sessions, the SYN shed filter, rawsock's full rings,
    flow sync's rejected datagrams, the fragment buffers and failed table publishes."""
    names = set(exported(collector_exposition()))
    used = {n for e in rule_exprs() for n, _ in SELECTOR.findall(e)}
    for prefix in ("lbcore_backend_up", "lbcore_flow_table_", "lbcore_drops_", "lbcore_bgp_",
                   "lbcore_shed_share", "lbcore_rawsock_ring_drops", "lbcore_sync_rejected",
                   "lbcore_frag_buffers", "lbcore_table_publish_failures"):
        exported_here = {n for n in names if n.startswith(prefix)}
        assert not exported_here or exported_here & used, f"no rule uses {prefix}*"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing (Debian package prometheus; `make test` installs it)")
    return path


def test_promtool_checks_the_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_unit_tests_of_the_rules():
    r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=MON,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each dashboard query (Grafana's variables filled in) as a recording
    rule, so a typo in a panel fails here rather than on someone's screen."""
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue   # Grafana's own function, not PromQL
        q = (expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
             .replace("$vip", ".*"))
        rules += [f"      - record: dashboard:q{i}", f"        expr: {json.dumps(q)}"]
    f = tmp_path / "dashboard-rules.yml"
    f.write_text("\n".join(rules) + "\n")
    r = subprocess.run([promtool(), "check", "rules", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_is_importable_json():
    d = json.loads(DASHBOARD.read_text())
    assert d["uid"] == "lbcore" and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_panels_do_not_overlap():
    """Every panel lies within the 24 grid columns, under a row (the rows span the width), and
    no two panels share a cell: an overlap Grafana would resolve by moving panels around."""
    d = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}
    row_seen = False
    for p in sorted(d["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] >= 1 and g["h"] >= 1, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            row_seen = True
            assert (g["x"], g["w"], g["h"]) == (0, 24, 1), p["title"]
        assert row_seen, f"{p['title']} is above the first row"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


# exported, and on purpose on no panel: {name: why}
NOT_ON_THE_DASHBOARD = {
    "lbcore_frag_memory_bytes": "fixed at start by [global.fragments]; the fill panel names it",
    "lbcore_backend_packets_total": "the backends' load is on the bytes/s and new flows/s "
                                    "panels; the VIPs' packets/s panel has the packet rate",
}


def test_the_dashboard_shows_every_exported_metric():
    """Each metric family lbcore exports is on some panel (or said above why not), so that a
    new mechanism's metrics do not go unseen."""
    names = set(exported(collector_exposition()))
    used = {n for e in dashboard_exprs() for n, _ in SELECTOR.findall(e)}
    missing = sorted(n for n in names - used
                     if not n.endswith("_created") and n not in NOT_ON_THE_DASHBOARD)
    assert missing == []
    assert set(NOT_ON_THE_DASHBOARD) <= names - used


def test_rawsock_metrics_say_how_the_kernels_copies_die():
    """Per link 1/0 for the tc filter, its drop count only where it exists; the ring drops."""
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(collector_exposition())
               for s in f.samples if s.name.startswith("lbcore_rawsock_")}
    assert samples == {
        ("lbcore_rawsock_kernel_copy_filter", (("link", "eth0"),)): 1.0,
        ("lbcore_rawsock_kernel_copy_filter", (("link", "eth1"),)): 0.0,
        ("lbcore_rawsock_kernel_copies_dropped_total", (("link", "eth0"),)): 7.0,
        ("lbcore_rawsock_ring_drops_total", ()): 3.0}
