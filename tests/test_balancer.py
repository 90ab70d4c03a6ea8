"""The control class against a fake data plane (katran's adapter injection):
what it publishes after configure, health, drain, weight and reload."""
from __future__ import annotations

from ipaddress import ip_address

import pytest

from lbcore.balancer import Balancer
from lbcore.config import parse_config

BASE = """
[global]
hash_seed = 7
ring_size = 251

[[vip]]
name = "web"
address = "198.18.100.1"
port = 80
protocol = "tcp"
pool = "web"

[pool.web]
backends = [
  { address = "198.19.0.11", port = 80 },
  { address = "198.19.0.12", port = 80, weight = 2 },
  { address = "198.19.0.13", port = 80 },
]
"""


class FakeFlows:
    def __init__(self):
        self.purged = []

    def purge_backend(self, addr, port, proto):
        self.purged.append((addr, port, proto))
        return 1

    def lookup(self, *a, **k):
        return None


class FakeDataplane:
    def __init__(self):
        self.tables = []
        self.flow_table = FakeFlows()
        self.purged = self.flow_table.purged

    def publish(self, spec, seed):
        self.tables.append((spec, seed))

    def pick(self, src, sport, dst, dport, proto):
        return (1, 0, "198.19.0.11", 80)


@pytest.fixture
def bal():
    b = Balancer(FakeDataplane())
    b.configure(parse_config(BASE))
    b.publish()
    return b


def weights(bal):
    spec, _ = bal.dp.tables[-1]
    [(addr, port, proto, _stat, ring, bes, _settings)] = spec
    return {str(a): w for a, _p, w, _s, _d in bes}


def test_configure_publishes_the_pool_with_weights_and_seed(bal):
    spec, seed = bal.dp.tables[-1]
    assert seed == 7
    [(addr, port, proto, stat, ring, bes, settings)] = spec
    assert (str(addr), port, proto, ring) == ("198.18.100.1", 80, "tcp", 251)
    assert settings["closed_port"] == "drop" and settings["persistence"] == "none"
    assert weights(bal) == {"198.19.0.11": 1, "198.19.0.12": 2, "198.19.0.13": 1}
    assert len({s for *_x, s, _d in bes}) == 3      # distinct counter slots


def test_health_down_zeroes_weight_and_purges_flows_after_publish(bal):
    [(v, b)] = bal.find_backends("web", "198.19.0.13")
    assert bal.set_health(v, b, False, "connect refused")
    assert bal.dp.purged == []                      # not before the new table is live
    bal.publish()
    assert weights(bal)["198.19.0.13"] == 0
    assert bal.dp.purged == [(str(b.address), 80, "tcp")]
    assert not bal.set_health(v, b, False, "again")  # no change, no rebuild needed
    assert bal.set_health(v, b, True, "ok")
    bal.publish()
    assert weights(bal)["198.19.0.13"] == 1


def test_drain_keeps_flows_and_weight_override(bal):
    [(v, b)] = bal.find_backends("198.18.100.1:80", "198.19.0.12:80")
    bal.drain(v, b)
    bal.publish()
    spec, _ = bal.dp.tables[-1]
    drained = [x for x in spec[0][5] if str(x[0]) == "198.19.0.12"][0]
    assert drained[2] == 0 and drained[4] is True
    assert bal.dp.purged == []                      # draining keeps its flows
    bal.drain(v, b, False)
    bal.set_backend_weight(v, b, 5)
    bal.publish()
    assert weights(bal)["198.19.0.12"] == 5
    with pytest.raises(ValueError):
        bal.set_backend_weight(v, b, -1)


def test_reload_diff_keeps_state_of_backends_that_stay(bal):
    [(v, b)] = bal.find_backends("web", "198.19.0.11")
    bal.drain(v, b)
    new = BASE.replace('{ address = "198.19.0.13", port = 80 },',
                       '{ address = "198.19.0.14", port = 80, weight = 3 },')
    changes = bal.configure(parse_config(new))
    bal.publish()
    assert any("added backend 198.19.0.14:80" in c for c in changes)
    assert any("removed backend 198.19.0.13:80" in c for c in changes)
    w = weights(bal)
    assert w == {"198.19.0.11": 0, "198.19.0.12": 2, "198.19.0.14": 3}
    assert (str(ip_address("198.19.0.13")), 80, "tcp") in bal.dp.purged


def test_reload_removing_a_vip(bal):
    cfg = BASE.replace('port = 80\nprotocol = "tcp"', 'port = 8080\nprotocol = "tcp"')
    changes = bal.configure(parse_config(cfg))
    bal.publish()
    assert any(c.startswith("removed VIP") for c in changes)
    assert any(c.startswith("added VIP") for c in changes)
    [(addr, port, *_)] = bal.dp.tables[-1][0]
    assert port == 8080


def test_slow_start_ramps_weight():
    b = Balancer(FakeDataplane())
    b.configure(parse_config(BASE.replace("[pool.web]", "[pool.web]\nslow_start = 100")))
    [(v, be)] = b.find_backends("web", "198.19.0.12")
    b.set_health(v, be, False, "x")
    b.set_health(v, be, True, "y")
    assert b.in_slow_start()
    assert 1 <= be.effective_weight(v.slow_start, be.up_since + 50) <= 2
    assert be.effective_weight(v.slow_start, be.up_since + 101) == 2


def test_pick_explains(bal):
    r = bal.pick("web", "198.18.0.2", 1234)
    assert r["backend"] == "198.19.0.11:80" and "Maglev" in r["why"]
    with pytest.raises(KeyError):
        bal.pick("nope", "198.18.0.2", 1)
