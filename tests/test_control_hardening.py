"""The control API against hostile input: every argument is checked by the config's rules
before anything changes, a change that cannot be published leaves no trace, a failed publish
is counted and blocks nothing after it, and no sequence of random requests keeps the balancer
from publishing and failing over. In-process, against a Daemon with a real _core.Dataplane."""
from __future__ import annotations

import asyncio
import json
from ipaddress import ip_address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbcore.balancer import PublishError
from lbcore.config import MAX_WEIGHT, ArgumentError
from lbcore.control.metrics import LbCollector
from lbcore.control.server import _ARGS, handle
from tests.test_status import make_daemon

VIP = "198.18.100.1"
BE1, BE2 = "198.19.0.11", "198.19.0.12"


class FlakyPublish:
    """The data plane with a publish() that fails while ``fail`` is set (an unforeseen
    refusal: memory, a limit), everything else passed through."""

    def __init__(self, dp: Any) -> None:
        self._dp = dp
        self.fail = False

    def publish(self, spec, seed, *args):
        if self.fail:
            raise MemoryError("cannot allocate the table")
        return self._dp.publish(spec, seed, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dp, name)


def flaky_daemon():
    d = make_daemon()
    d.dp = d.balancer.dp = FlakyPublish(d.dp)
    return d


def picks(d, n: int = 400) -> dict[str, int]:
    """Where n new flows to the VIP would go, by the live table."""
    out: dict[str, int] = {}
    for i in range(n):
        got = d.dp.pick(f"198.18.{i // 250}.{i % 250 + 1}", 40000 + i, VIP, 80, "tcp")
        be = got[2] if got and got[1] is not None else None
        out[str(be)] = out.get(str(be), 0) + 1
    return out


def run(coro):
    return asyncio.run(coro)


async def call(d, **req) -> Any:
    return await handle(d, d.view, req)


@pytest.mark.parametrize("weight", [4294967296, 70000, MAX_WEIGHT + 1, -1, 1.5, True, "3", None])
def test_bad_weight_is_refused_by_name_and_changes_nothing(weight):
    d = make_daemon()
    before, rebuilds = picks(d), d.balancer.rebuilds
    with pytest.raises(ArgumentError, match=r"^weight: "):
        run(call(d, cmd="backend", action="weight", vip="web", backend=BE1, weight=weight))
    [(_, b)] = d.balancer.find_backends("web", BE1)
    assert b.weight_override is None and b.reason == "configured"
    assert d.balancer.rebuilds == rebuilds and picks(d) == before


def test_weight_at_the_config_limit_is_accepted():
    d = make_daemon()
    r = run(call(d, cmd="backend", action="weight", vip="web", backend=BE1, weight=MAX_WEIGHT))
    assert r["changed"] is True
    assert d.view.snapshot()["vips"][0]["backends"][0]["weight"] == MAX_WEIGHT


@pytest.mark.parametrize("req, name", [
    ({"cmd": "backend", "action": "drian", "vip": "web", "backend": BE1}, "action"),
    ({"cmd": "backend", "action": "drain", "vip": "web"}, "backend"),
    ({"cmd": "backend", "action": "drain", "vip": "web", "backend": 7}, "backend"),
    ({"cmd": "backend", "action": "drain", "vip": "web", "backend": BE1, "weight": 3}, "weight"),
    ({"cmd": "backend", "action": "drain", "vip": "web", "backend": "198.19.0.99"}, "backend"),
    ({"cmd": "backend", "action": "weight", "vip": "web", "backend": BE1}, "weight"),
    ({"cmd": "pick", "vip": "web", "src": "not-an-ip", "sport": 1}, "src"),
    ({"cmd": "pick", "vip": "web", "src": "198.18.0.2", "sport": 70000}, "sport"),
    ({"cmd": "pick", "vip": "web", "src": "198.18.0.2", "sport": 1, "proto": "sctp"}, "proto"),
    ({"cmd": "pick", "vip": "x" * 300, "src": "198.18.0.2", "sport": 1}, "vip"),
    ({"cmd": "flows", "limit": 0}, "limit"),
    ({"cmd": "flows", "limit": "10"}, "limit"),
    ({"cmd": "flows", "cursor": -1}, "cursor"),
    ({"cmd": "status", "verbose": True}, "verbose"),
    ({"cmd": "pick", "vip": "nope", "src": "198.18.0.2", "sport": 1}, "vip"),
    ({"cmd": "pick", "vip": "web", "src": "198.18.0.2", "sport": 1, "proto": "udp"}, "vip"),
    ({"cmd": "pick", "vip": "web", "src": "2001:db8::2", "sport": 1}, "src"),
    ({"cmd": "flows", "vip": "nope"}, "vip"),
])
def test_bad_arguments_are_named(req, name):
    d = make_daemon()
    with pytest.raises(ArgumentError, match=rf"^{name}: "):
        run(handle(d, d.view, req))


def test_failed_publish_leaves_no_trace_is_counted_and_blocks_nothing():
    d = flaky_daemon()
    bal = d.balancer
    before = picks(d)
    d.dp.fail = True
    with pytest.raises(PublishError, match="cannot allocate"):
        run(call(d, cmd="backend", action="drain", vip="web", backend=BE1))
    [(v, b1)] = bal.find_backends("web", BE1)
    assert not b1.draining                       # the live table does not drain it: neither do we
    st = d.view.snapshot()["table"]
    assert st["publish_failures"] == 1 and "cannot allocate" in st["last_publish_error"]
    assert picks(d) == before
    # the next updates go through: health (failover) and the operator's drain
    d.dp.fail = False
    assert bal.set_health(v, b1, False, "test: down")
    run(d.republish())
    assert set(picks(d)) == {BE2}
    r = run(call(d, cmd="backend", action="drain", vip="web", backend=BE2))
    assert r["changed"] and set(picks(d)) == {"None"}
    assert d.view.snapshot()["table"]["last_publish_error"] is None


def test_failed_health_publish_is_retried_and_purges_are_kept():
    d = flaky_daemon()
    bal = d.balancer
    [(v, b1)] = bal.find_backends("web", BE1)
    d.dp.fail = True
    bal.set_health(v, b1, False, "test: down")

    async def go():
        await d._republish_quietly()             # as a health change does: logged, not raised
        assert d._publish_pending and bal.publish_failures == 1
        assert bal._purge_after_publish           # the down backend's flows still must go
        d.dp.fail = False
        await d._republish_quietly()              # housekeeping's retry
    run(go())
    assert not d._publish_pending and not bal._purge_after_publish
    assert set(picks(d)) == {BE2}


def test_metric_counts_publish_failures():
    d = flaky_daemon()
    d.dp.fail = True
    with pytest.raises(PublishError):
        run(call(d, cmd="backend", action="weight", vip="web", backend=BE1, weight=5))
    snap = d.view.snapshot()

    class _View:
        def snapshot(self):
            return snap

    async def collect():
        col = LbCollector(_View(), asyncio.get_running_loop())
        return await asyncio.to_thread(lambda: list(col.collect()))
    fams = {m.name: m for m in run(collect())}
    assert fams["lbcore_table_publish_failures"].samples[0].value == 1


# --------------------------------------------------------------------------- fuzz

SPECS = st.sampled_from(["web", VIP, f"{VIP}:80", f"{VIP}:80/tcp", BE1, BE2, f"{BE1}:80",
                         "", "nope", "[::1]:80", "\x00", "x" * 300])
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20) | SPECS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6)
VERBS = st.sampled_from(sorted(_ARGS) + ["", "shutdown", "STATUS", "backend "])
ARGS = st.sampled_from(sorted({a for names in _ARGS.values() for a in names}
                              | {"cmd", "extra"}))
REQUEST = st.builds(lambda cmd, args: {**args, "cmd": cmd}, VERBS,
                    st.dictionaries(ARGS.filter(lambda a: a != "cmd"), JUNK | SPECS, max_size=5))
ACTIONS = st.sampled_from(["drain", "undrain", "weight", "bogus"])
GOOD_BACKEND = st.builds(lambda a, b, w: {"cmd": "backend", "action": a, "vip": "web",
                                          "backend": b, "weight": w if a == "weight" else None},
                         ACTIONS, st.sampled_from([BE1, BE2]),
                         st.integers(-5, MAX_WEIGHT + 5) | JUNK)

PICK = st.builds(lambda v, s, p, proto: {"cmd": "pick", "vip": v, "src": s, "sport": p,
                                         "proto": proto},
                 SPECS, st.sampled_from(["198.18.0.2", "2001:db8::2", "0.0.0.0", "x", 5]),
                 st.integers(-1, 70000), st.sampled_from([None, "tcp", "udp", "icmp", 6]))
FLOWS = st.builds(lambda v, lim, cur: {"cmd": "flows", "vip": v, "limit": lim, "cursor": cur},
                  SPECS | st.none(), st.integers(-1, 20000) | st.none(),
                  st.integers(-1, 2**33) | st.none())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(REQUEST | GOOD_BACKEND | PICK | FLOWS, max_size=12))
def test_random_requests_never_poison_the_balancer(reqs):
    """Whatever is sent: each answer is ok or a named refusal (never an internal error), the
    JSON reply can be written, and afterwards the balancer still publishes and fails over."""
    d = make_daemon()
    bal = d.balancer

    async def go():
        for req in reqs:
            try:
                res = await handle(d, d.view, req)
                json.dumps(res, default=str)
            except (ValueError, PublishError):
                pass                        # refusals the server answers with their message
            # anything else is what the server would call an internal error: the test fails
        # back to a known state, then fail one backend over
        for v in bal.vips.values():
            for b in v.backends.values():
                bal.drain(v, b, False)
                b.weight_override = None
        await d.republish()
        assert {str(k) for k in picks(d)} <= {BE1, BE2} and "None" not in picks(d)
        [(v, b1)] = bal.find_backends("web", BE1)
        bal.set_health(v, b1, False, "fuzz: down")
        await d.republish()
        assert set(picks(d)) == {BE2}
        bal.set_health(v, b1, True, "fuzz: up")
        await d.republish()
        assert set(picks(d)) == {BE1, BE2}
    asyncio.run(go())
    assert bal.publish_failures == 0
    assert all(ip_address(b["address"]) for b in d.view.snapshot()["vips"][0]["backends"])


class RecordingPlane:
    """The mode's back end without the kernel: records each update()."""

    def __init__(self) -> None:
        self.updates: list[tuple[list, list]] = []

    def update(self, vips, replies) -> None:
        self.updates.append((list(vips), list(replies)))


def test_reload_that_cannot_publish_keeps_the_running_config(tmp_path):
    from tests.test_status import CONFIG
    path = tmp_path / "lbcore.toml"
    path.write_text(CONFIG)
    d = flaky_daemon()
    d.config_path = str(path)
    d.plane = RecordingPlane()
    path.write_text(CONFIG.replace('  { address = "198.19.0.12", port = 80, weight = 2 },',
                                   '  { address = "198.19.0.12", port = 80, weight = 2 },\n'
                                   '  { address = "198.19.0.13", port = 80 },'))
    before = picks(d)
    d.dp.fail = True
    ok, msgs = run(d.reload())
    assert not ok and "cannot allocate" in msgs[0] and "running config stays" in msgs[0]
    assert len(d.balancer.find_backends("web", "198.19.0.13")) == 0
    assert picks(d) == before
    # the routes and rules went back to the running config's
    assert {r.address for r in d.plane.updates[-1][1]} == {ip_address(BE1), ip_address(BE2)}
    d.dp.fail = False
    ok, msgs = run(d.reload())
    assert ok and any("198.19.0.13" in m for m in msgs)
    assert "198.19.0.13" in picks(d)
