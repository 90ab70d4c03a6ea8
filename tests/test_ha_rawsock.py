"""Several gateways in mode rawsock: the same announcements, ECMP and failover as in tun mode
(tests/test_ha.py), with IPv6 beside IPv4, on a smaller load. The lab is 2 gateways and 2
backends; one gateway's balancer is SIGKILLed under load and the connections live on."""
from __future__ import annotations

import os
import time

import pytest
from test_ha import check_survived, load, wait_nexthops, wait_withdrawn

from lbcore import lab
from lbcore.control.client import request
from lbcore.lab import multi
from lbcore.lab.ns import http_requests, udp_requests

pytestmark = [pytest.mark.netns, pytest.mark.slow]

GATEWAYS = 2


@pytest.fixture(scope="module")
def rawsock_ha_lab():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    try:
        multi.check_tools()
    except lab.LabError as e:
        pytest.skip(str(e))
    with lab.lease(gateways=GATEWAYS, backends=2, mode="rawsock", ipv6=True) as state:
        yield state


def test_every_gateway_announces_and_forwards_both_families(rawsock_ha_lab):
    wait_nexthops(GATEWAYS)
    digests = []
    for i in range(1, GATEWAYS + 1):
        st = request(str(multi.gateway_socket(i)), {"cmd": "status"})
        assert st["mode"] == "rawsock"
        assert all(v["announced"] for v in st["vips"]), [v["announce_reason"]
                                                          for v in st["vips"]]
        digests.append({f"{v['address']}:{v['port']}/{v['protocol']}": v["table_digest"]
                        for v in st["vips"]})
    assert digests[0] == digests[1] and all(digests[0].values())
    for vip in (lab.VIP_V4, lab.VIP_V6):
        r = http_requests(lab.CLIENT_NS, vip, n=40, deadline=60)
        assert r["ok"] == 40, r["error_samples"]
        u = udp_requests(lab.CLIENT_NS, vip, n=40, deadline=60)
        assert u["ok"] == 40, u.get("error_samples")


def test_a_killed_rawsock_gateway_loses_no_connection(rawsock_ha_lab):
    wait_nexthops(GATEWAYS)
    with load(conns=20) as ld:
        time.sleep(2.0)
        t_kill = multi.kill_balancer(1)
        assert wait_withdrawn(GATEWAYS) is not None
        time.sleep(6.0)
        res = ld.stop()
    check_survived(res, t_kill)
    multi.start_balancer(1)
    wait_nexthops(GATEWAYS)
