"""The [bgp] section and what lbcore makes of it: one message per mistake (key and value),
and a BIRD config that BIRD itself accepts (``bird -p``, when BIRD is installed)."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest

from lbcore.bgp.bird import BirdPaths, render_config
from lbcore.config import ConfigError, config_from_dict

BASE: dict = {
    "global": {"hash_seed": 1},
    "bgp": {"local_as": 65001, "router_id": "198.18.1.11",
            "neighbors": [{"address": "198.18.1.1", "as": 65000}],
            "next_hop": "198.18.1.11"},
    "vip": [{"address": "198.18.100.1", "port": 80, "protocol": "tcp", "pool": "web"}],
    "pool": {"web": {"backends": [{"address": "198.19.0.11", "port": 80}]}},
}

# (change to BASE["bgp"], the whole expected message)
BAD = [
    ({"local_as": 0}, "bgp.local_as: expected an integer 1..4294967295, got 0"),
    ({"router_id": "2001:db8::1"},
     'bgp.router_id: expected an IPv4 address (a BGP router id is 32 bits), got "2001:db8::1"'),
    ({"neighbors": []}, "bgp.neighbors: expected an array of { address, as } tables, got []; "
                        "at least one neighbor"),
    ({"neighbors": [{"address": "198.18.1.1", "as": "x"}]},
     'bgp.neighbors[0].as: expected an integer 1..4294967295, got "x" (a string)'),
    ({"neighbors": [{"address": "198.18.1.1", "as": 1, "port": 179}]},
     "bgp.neighbors[0].port: unknown key; expected one of: address, as"),
    ({"bfd": "yes"}, 'bgp.bfd: expected true or false, got "yes" (a string)'),
    ({"hold_time": 2},
     "bgp.hold_time: expected 0 (no keepalives) or 3..65535 seconds (RFC 4271), got 2"),
    ({"next_hop": ["198.18.1.11", "198.18.1.12"]},
     "bgp.next_hop: expected an address or an array of addresses (at most one IPv4 and one "
     'IPv6), got ["198.18.1.11", "198.18.1.12"]'),
    ({"withdraw_grace": -1}, "bgp.withdraw_grace: expected seconds >= 0 and <= 3600, got -1"),
    ({"anchor_device": "lbc0"},
     'bgp.anchor_device: expected a device name other than global.tun_name, got "lbc0"'),
    ({"holdtime": 3}, 'bgp.holdtime: unknown key; did you mean "hold_time"?'),
]


@pytest.mark.parametrize(("change", "message"), BAD, ids=[m.split(":")[0] + str(i)
                                                         for i, (_, m) in enumerate(BAD)])
def test_bad_bgp(change: dict, message: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["bgp"].update(change)
    with pytest.raises(ConfigError) as e:
        config_from_dict(doc)
    assert message in e.value.errors, e.value.errors


def test_vip_family_needs_a_neighbor() -> None:
    doc = copy.deepcopy(BASE)
    doc["vip"].append({"address": "2001:db8:100::1", "port": 80, "protocol": "tcp",
                       "pool": "web6"})
    doc["pool"]["web6"] = {"backends": [{"address": "2001:db8:1::11", "port": 80}]}
    with pytest.raises(ConfigError) as e:
        config_from_dict(doc)
    assert any(err.startswith("bgp.neighbors: no IPv6 neighbor") for err in e.value.errors)


def test_good_bgp_and_defaults() -> None:
    b = config_from_dict(copy.deepcopy(BASE)).bgp
    assert b is not None and b.local_as == 65001 and b.bfd and b.hold_time == 3
    assert [str(a) for a in b.next_hop] == ["198.18.1.11"] and b.withdraw_grace == 2.0
    assert config_from_dict({k: v for k, v in BASE.items() if k != "bgp"}).bgp is None


@pytest.mark.skipif(shutil.which("bird") is None, reason="BIRD 2 (Debian bird2) not installed")
def test_bird_accepts_the_generated_config(tmp_path: Path) -> None:
    doc = copy.deepcopy(BASE)
    doc["bgp"]["neighbors"].append({"address": "2001:db8:2::1", "as": 65000})
    doc["bgp"]["next_hop"] = ["198.18.1.11", "2001:db8:2::11"]
    text = render_config(config_from_dict(doc).bgp, BirdPaths(tmp_path))
    conf = tmp_path / "bird.conf"
    conf.write_text(text)
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + text
    assert "bfd on" in text and "next hop address 2001:db8:2::11" in text
