"""The config file: defaults, the example, and one clear message per mistake.

Each error case checks the whole message: the key path it starts with, the bad
value and what was expected. Most cases mutate one valid document (BASE) and
go through `config_from_dict`, which is what `parse_config` calls after
tomllib; health checks have their own table (HEALTH_CASES: one whole health
section per mistake). The file-level cases (syntax, missing, unreadable) go
through files and through `python -m lbcore check-config`.
"""
from __future__ import annotations

import copy
import ipaddress
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from lbcore import config as C
from lbcore.config import (
    BackendConfig,
    Config,
    ConfigError,
    ConfigFileError,
    HealthCheckConfig,
    Timeouts,
    config_from_dict,
    load_config,
    parse_config,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "lbcore.toml"

BASE: dict = {
    "global": {"hash_seed": 42},
    "vip": [
        {"name": "web", "address": "198.18.100.1", "port": 80, "protocol": "tcp", "pool": "web"},
        {"address": "2001:db8:100::1", "port": 53, "protocol": "udp", "pool": "v6"},
    ],
    "pool": {
        "web": {
            "backends": [
                {"address": "198.19.0.11", "port": 80},
                {"address": "198.19.0.12", "port": 80, "weight": 2},
                {"address": "198.19.0.13", "port": 8080},
            ],
            "health": {"type": "http", "path": "/healthz"},
        },
        "v6": {
            "backends": [{"address": "2001:db8:200::1", "port": 53}],
            "health": {"type": "udp", "payload": "ping"},
        },
    },
}


def errors_of(mutate: Callable[[dict], object]) -> list[str]:
    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(ConfigError) as ei:
        config_from_dict(doc, "test.toml")
    return ei.value.errors


def one_error(mutate: Callable[[dict], object]) -> str:
    errs = errors_of(mutate)
    assert len(errs) == 1, errs
    return errs[0]


def web_backends(d: dict) -> list[dict]:
    return d["pool"]["web"]["backends"]


def web_health(d: dict) -> dict:
    return d["pool"]["web"]["health"]


# --- valid configs --------------------------------------------------------------------

def test_base_is_valid_and_typed():
    cfg = config_from_dict(copy.deepcopy(BASE))
    assert cfg.warnings == ()
    web, v6 = cfg.vips
    assert web.key == (ipaddress.IPv4Address("198.18.100.1"), 80, "tcp")
    assert web.name == "web" and web.family == 4
    assert v6.name == "[2001:db8:100::1]:53/udp"       # the default name
    assert v6.family == 6
    pool = cfg.pool_of(web)
    assert pool.name == "web"
    assert [b.key for b in pool.backends] == [
        (ipaddress.IPv4Address("198.19.0.11"), 80), (ipaddress.IPv4Address("198.19.0.12"), 80),
        (ipaddress.IPv4Address("198.19.0.13"), 8080)]
    assert [b.weight for b in pool.backends] == [1, 2, 1]
    assert pool.backend("198.19.0.12", 80) == BackendConfig(
        ipaddress.IPv4Address("198.19.0.12"), 80, 2)
    assert pool.backend("198.19.0.12", 81) is None
    assert pool.health == HealthCheckConfig(type="http", path="/healthz")
    assert cfg.pool_of(v6).health.payload == "ping"
    assert cfg.backend_count == 4
    assert cfg.hash_seed == 42
    assert cfg.vip("web") is web and cfg.vip("nope") is None


def test_defaults():
    cfg = parse_config("")
    assert cfg.mode == C.DEFAULT_MODE == "tun"
    assert cfg.workers == 1
    assert cfg.flow_table_size == 1 << 20
    assert cfg.hash_seed == 0
    assert cfg.ring_size == 65537
    assert cfg.tun_name == "lbc0"
    assert cfg.control_socket == "/run/lbcore/lbcore.sock"
    assert cfg.metrics_listen == (ipaddress.IPv4Address("127.0.0.1"), 9150)
    assert cfg.log_level == "info"
    assert cfg.all_down == "drop"
    assert cfg.closed_port == "drop" and cfg.reject_rate == 1000
    assert cfg.fragments == C.FragmentsConfig(4096, 1024, 2.0)
    assert cfg.rawsock is None
    assert cfg.vips == () and dict(cfg.pools) == {}
    assert cfg.timeouts == Timeouts()
    assert cfg.timeouts.as_ms() == {"tcp_syn": 60000, "tcp_established": 900000,
                                    "tcp_fin": 120000, "tcp_close": 10000, "udp": 30000,
                                    "udp_stream": 120000}
    assert cfg.warnings == ("vip: no [[vip]] defined: the balancer forwards nothing",)
    # The dataclass defaults are the same as what an empty file gives.
    assert cfg == Config()


def test_health_defaults():
    cfg = config_from_dict({"vip": [{"address": "198.18.100.1", "port": 80, "protocol": "tcp",
                                     "pool": "p"}],
                            "pool": {"p": {"backends": [{"address": "198.19.0.1", "port": 80}],
                                           "health": {"type": "tcp"}}}})
    hc = cfg.pools["p"].health
    assert (hc.interval, hc.timeout, hc.rise, hc.fall, hc.port) == (2.0, 1.0, 2, 3, None)
    assert cfg.pools["p"].slow_start == 0.0
    # A short interval without a timeout gets timeout = interval.
    d = copy.deepcopy(BASE)
    d["pool"]["web"]["health"] = {"type": "tcp", "interval": 0.5}
    assert config_from_dict(d).pools["web"].health.timeout == 0.5


def test_limits_match_the_c_core():
    core = pytest.importorskip("lbcore._core")
    assert C.RING_SIZE_MAX == core.RING_SIZE_MAX
    assert C.DEFAULT_RING_SIZE == core.RING_SIZE
    assert C.MAX_BACKENDS == core.MAX_BACKENDS
    assert C.MAX_VIPS == core.MAX_VIPS
    assert C.FLOW_MAX == core.FLOW_MAX
    assert Timeouts().as_ms() == dict(core.DEFAULT_TIMEOUTS_MS)


def test_example_file_parses_without_warnings():
    cfg = load_config(EXAMPLE)
    assert cfg.warnings == ()
    assert len(cfg.vips) == 5
    assert {v.name for v in cfg.vips} == {"web", "web-v6", "dns", "dns-tcp", "app"}
    assert {p.health.type for p in cfg.pools.values()} == {"http", "tcp", "udp", "exec"}
    assert cfg.hash_seed == C.hash_seed_of("rack-42")
    assert cfg.source == str(EXAMPLE)
    web = cfg.pools["web"]
    assert web.slow_start == 30.0
    assert web.health.expect_status == (200, 204)
    assert web.health.body_match == "ok" and web.health.host == "www.example.com"


def test_example_documents_every_key():
    """Every key the parser accepts appears in the example and in the README's
    configuration reference."""
    example = EXAMPLE.read_text()
    docs = (ROOT / "README.md").read_text()
    keys = (set(C._GLOBAL_KEYS) | set(C.TIMEOUT_KEYS) | set(C._VIP_KEYS) | set(C._POOL_KEYS)
            | set(C._BACKEND_KEYS) | set(C._HEALTH_COMMON) | set(C._HEALTH_ONLY)
            | {"client_link", "backend_link"} | set(C._SYNC_KEYS))
    for k in keys:
        assert re.search(rf"\b{k}\b", example), k
        assert f"`{k}`" in docs or f".{k}]`" in docs, k


def test_worker_cpus():
    """One CPU per worker, in order; absent or [] is automatic. Whether this machine has them
    is `run`'s question (check_worker_cpus), not the parser's."""
    doc = copy.deepcopy(BASE)
    doc["global"].update(workers=2, worker_cpus=[3, 1])
    assert config_from_dict(doc, "t.toml").worker_cpus == (3, 1)
    doc["global"]["worker_cpus"] = []
    assert config_from_dict(doc, "t.toml").worker_cpus == ()
    assert config_from_dict(copy.deepcopy(BASE), "t.toml").worker_cpus == ()
    assert C.check_worker_cpus((3, 1), {0, 1, 2, 3}) is None
    assert C.check_worker_cpus((), {0}) is None
    assert C.check_worker_cpus((3, 1), {0, 1}) == (
        "global.worker_cpus: CPU 3 is not one this process may run on (it may run on 0, 1)")
    assert C.check_worker_cpus((5, 4), {0, 1}).startswith(
        "global.worker_cpus: CPU 5, 4 are not one")


def test_hash_seed_forms():
    assert parse_config('[global]\nhash_seed = "secret"').hash_seed == C.hash_seed_of("secret")
    # Stable across runs and hosts: a fixed value, not Python's salted hash().
    assert C.hash_seed_of("secret") == int.from_bytes(
        __import__("hashlib").blake2b(b"secret", digest_size=8).digest(), "big")
    assert parse_config("[global]\nhash_seed = 0xffffffffffffffff").hash_seed == 2**64 - 1
    assert parse_config("[global]\nhash_seed = 7").hash_seed == 7


def test_metrics_listen_forms():
    assert parse_config('[global]\nmetrics_listen = ""').metrics_listen is None
    assert parse_config('[global]\nmetrics_listen = "[::1]:9150"').metrics_listen == (
        ipaddress.IPv6Address("::1"), 9150)
    assert parse_config('[global]\nmetrics_listen = "0.0.0.0:9100"').metrics_listen == (
        ipaddress.IPv4Address("0.0.0.0"), 9100)


def test_timeouts_floats_and_ms():
    cfg = parse_config("[global.timeouts]\ntcp_syn = 1.5\nudp = 0.25\n")
    assert cfg.timeouts.tcp_syn == 1.5
    assert cfg.timeouts.as_ms()["tcp_syn"] == 1500
    assert cfg.timeouts.as_ms()["udp"] == 250
    assert all(type(v) is int for v in cfg.timeouts.as_ms().values())


def test_rawsock_mode():
    cfg = parse_config('[global]\nmode = "rawsock"\n'
                       '[rawsock]\nclient_link = "eth0"\nbackend_link = "eth1"\n')
    assert cfg.mode == "rawsock"
    assert cfg.rawsock == C.RawsockConfig("eth0", "eth1")


def test_rawsock_table_in_tun_mode_is_ignored_with_a_warning():
    cfg = parse_config('[rawsock]\nclient_link = "eth0"\nbackend_link = "eth1"\n')
    assert cfg.rawsock is None
    assert 'rawsock: ignored: global.mode is "tun", not "rawsock"' in cfg.warnings


def test_all_weights_zero_is_legal_with_a_warning():
    d = copy.deepcopy(BASE)
    for b in web_backends(d):
        b["weight"] = 0
    cfg = config_from_dict(d)
    assert [b.weight for b in cfg.pools["web"].backends] == [0, 0, 0]
    assert cfg.warnings == ("pool.web.backends: every backend has weight 0: VIPs using this "
                            "pool have no backend (see global.all_down)",)


def test_unused_pool_and_small_ring_warn():
    d = copy.deepcopy(BASE)
    d["pool"]["spare"] = {"backends": [{"address": "198.19.0.99", "port": 80}]}
    d["global"]["ring_size"] = 251
    cfg = config_from_dict(d)
    assert "pool.spare: not used by any VIP" in cfg.warnings
    assert any(w.startswith("global.ring_size: 251 is less than 100 slots per backend of pool "
                            '"web" (3 backends)') for w in cfg.warnings)


def test_same_address_and_port_other_protocol_is_not_a_duplicate():
    d = copy.deepcopy(BASE)
    d["vip"].append({"name": "web-udp", "address": "198.18.100.1", "port": 80,
                     "protocol": "udp", "pool": "web"})
    assert len(config_from_dict(d).vips) == 3


def test_config_is_frozen():
    cfg = config_from_dict(copy.deepcopy(BASE))
    with pytest.raises(AttributeError):
        cfg.workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.pools["x"] = cfg.pools["web"]  # type: ignore[index]


# --- one message per mistake ----------------------------------------------------------

def _set(path: list, value: object) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
    return mutate


def _del(path: list) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        node = d
        for p in path[:-1]:
            node = node[p]
        del node[path[-1]]
    return mutate


W_CPUS = ("global.worker_cpus: expected an array of CPU numbers 0..4095, one per worker, none "
          "twice, got ")
CASES = [
    # (id, mutation, the exact message)
    ("unknown key, did you mean", _set(["global", "worker"], 2),
     'global.worker: unknown key; did you mean "workers"?'),
    ("unknown top-level key", _set(["vips"], []),
     'vips: unknown key; did you mean "vip"?'),
    ("unknown key, no close match", _set(["pool", "web", "backends", 0, "zzz"], 1),
     "pool.web.backends[0].zzz: unknown key; expected one of: address, port, weight"),
    ("wrong type", _set(["vip", 0, "port"], "80"),
     'vip[0].port: expected an integer 1..65535, got "80" (a string)'),
    ("boolean is not an integer", _set(["global", "workers"], True),
     "global.workers: expected an integer 1..64, got true (a boolean)"),
    ("wrong type for a table", _set(["global"], 3),
     "global: expected a table, got 3 (an integer)"),
    ("vip must be an array of tables", _set(["vip"], {"address": "198.18.100.1"}),
     'vip: expected an array of tables ([[vip]]), got { address = "198.18.100.1" } (a table)'),
    ("bad address", _set(["vip", 0, "address"], "198.18.100.300"),
     'vip[0].address: expected an IPv4 or IPv6 address (no prefix length, no port), '
     'got "198.18.100.300"'),
    ("address with prefix", _set(["pool", "web", "backends", 1, "address"], "198.19.0.12/32"),
     'pool.web.backends[1].address: expected an IPv4 or IPv6 address (no prefix length, '
     'no port), got "198.19.0.12/32"'),
    ("unspecified address", _set(["vip", 0, "address"], "0.0.0.0"),
     'vip[0].address: expected a unicast address (not unspecified, loopback, multicast or '
     'broadcast), got "0.0.0.0"'),
    ("loopback backend", _set(["pool", "web", "backends", 0, "address"], "127.0.0.1"),
     'pool.web.backends[0].address: expected a unicast address (not unspecified, loopback, '
     'multicast or broadcast), got "127.0.0.1"'),
    ("ipv4-mapped", _set(["vip", 0, "address"], "::ffff:198.18.100.1"),
     'vip[0].address: expected a plain IPv4 or IPv6 address, got "::ffff:198.18.100.1"; '
     "write 198.18.100.1 instead of an IPv4-mapped IPv6 address"),
    ("port out of range", _set(["pool", "web", "backends", 2, "port"], 70000),
     "pool.web.backends[2].port: expected an integer 1..65535, got 70000"),
    ("port zero", _set(["vip", 0, "port"], 0),
     "vip[0].port: expected an integer 1..65535, got 0"),
    ("missing key", _del(["vip", 0, "port"]),
     "vip[0].port: missing; expected an integer 1..65535"),
    ("bad protocol", _set(["vip", 0, "protocol"], "tpc"),
     'vip[0].protocol: expected "tcp" or "udp", got "tpc"; did you mean "tcp"?'),
    ("negative weight", _set(["pool", "web", "backends", 1, "weight"], -1),
     "pool.web.backends[1].weight: expected an integer 0..65535, got -1"),
    ("weight too large", _set(["pool", "web", "backends", 1, "weight"], 65536),
     "pool.web.backends[1].weight: expected an integer 0..65535, got 65536"),
    ("float weight", _set(["pool", "web", "backends", 1, "weight"], 1.5),
     "pool.web.backends[1].weight: expected an integer 0..65535, got 1.5 (a float)"),
    ("table size not prime", _set(["global", "ring_size"], 65536),
     "global.ring_size: expected a prime number 2..16777213, got 65536; 65536 is not prime; "
     "nearest primes: 65521 or 65537"),
    ("table size too large", _set(["global", "ring_size"], 16777259),
     "global.ring_size: expected a prime number 2..16777213, got 16777259"),
    ("table size below backends", _set(["global", "ring_size"], 3),
     'global.ring_size: expected a prime larger than the 3 backends of pool "web", got 3'),
    ("flow table too large", _set(["global", "flow_table_size"], 16777217),
     "global.flow_table_size: expected an integer 1..16777216, got 16777217"),
    ("workers", _set(["global", "workers"], 65),
     "global.workers: expected an integer 1..64, got 65"),
    ("pool missing", _set(["vip", 0, "pool"], "webb"),
     'vip[0].pool: "webb" is not defined: expected the name of a [pool.NAME] table; '
     'did you mean "web"?'),
    ("pool missing, no close name", _set(["vip", 0, "pool"], "api"),
     'vip[0].pool: "api" is not defined: expected the name of a [pool.NAME] table; '
     "defined pools: v6, web"),
    ("backends missing", _del(["pool", "v6", "backends"]),
     "pool.v6.backends: missing; expected an array of { address, port, weight } tables"),
    ("backends not an array", _set(["pool", "v6", "backends"], {"address": "2001:db8:200::1"}),
     'pool.v6.backends: expected an array of { address, port, weight } tables, got '
     '{ address = "2001:db8:200::1" } (a table)'),
    ("backend not a table", _set(["pool", "web", "backends", 1], "198.19.0.12:80"),
     "pool.web.backends[1]: expected a table { address = ..., port = ..., weight = ... }, "
     'got "198.19.0.12:80" (a string)'),
    ("vip not a table", _set(["vip", 1], "2001:db8:100::1"),
     'vip[1]: expected a table ([[vip]]), got "2001:db8:100::1" (a string)'),
    ("health not a table", _set(["pool", "web", "health"], "http"),
     'pool.web.health: expected a table, got "http" (a string)'),
    ("bad mode", _set(["global", "mode"], "tap"),
     'global.mode: expected "tun" or "rawsock", got "tap"'),
    ("bad all_down", _set(["global", "all_down"], "rst"),
     'global.all_down: expected "drop", got "rst"'),
    ("reject is not implemented", _set(["global", "all_down"], "reject"),
     'global.all_down: expected "drop", got "reject"'),
    ("bad log level", _set(["global", "log_level"], "warn"),
     'global.log_level: expected "debug" or "info" or "warning" or "error", got "warn"; '
     'did you mean "warning"?'),
    ("negative hash seed", _set(["global", "hash_seed"], -1),
     "global.hash_seed: expected an integer 0..2^64-1 or a non-empty string, got -1"),
    ("hash seed too large", _set(["global", "hash_seed"], 2**64),
     "global.hash_seed: expected an integer 0..2^64-1 or a non-empty string, "
     "got 18446744073709551616"),
    ("tun name too long", _set(["global", "tun_name"], "a-very-long-name0"),
     'global.tun_name: expected a network interface name (1..15 characters, no "/", ":" or '
     'spaces), got "a-very-long-name0"'),
    ("relative control socket", _set(["global", "control_socket"], "lbcore.sock"),
     'global.control_socket: expected an absolute path (the daemon and the CLI may run in '
     'different directories), got "lbcore.sock"'),
    ("metrics host name", _set(["global", "metrics_listen"], "localhost:9150"),
     'global.metrics_listen: expected "ADDRESS:PORT" with an IP address ("[::1]:9150" for '
     'IPv6), or "" to disable, got "localhost:9150"; host names are not resolved'),
    ("metrics v6 without brackets", _set(["global", "metrics_listen"], "::1:9150"),
     'global.metrics_listen: expected "ADDRESS:PORT" with an IP address ("[::1]:9150" for '
     'IPv6), or "" to disable, got "::1:9150"'),
    ("timeout zero", _set(["global", "timeouts"], {"tcp_syn": 0}),
     "global.timeouts.tcp_syn: expected seconds >= 0.001 and <= 2147483.647, got 0"),
    ("timeout nan", _set(["global", "timeouts"], {"udp": float("nan")}),
     "global.timeouts.udp: expected seconds >= 0.001 and <= 2147483.647, got nan"),
    ("timeout string", _set(["global", "timeouts"], {"udp": "30s"}),
     'global.timeouts.udp: expected seconds (a number) >= 0.001 and <= 2147483.647, '
     'got "30s" (a string)'),
    ("duplicate VIP", lambda d: d["vip"].append(dict(d["vip"][0], name="web2")),
     "vip[2]: duplicate VIP 198.18.100.1:80/tcp, already defined at vip[0]"),
    ("duplicate VIP name", lambda d: d["vip"].append(dict(d["vip"][0], port=81)),
     'vip[2].name: duplicate VIP name "web", already used by vip[0]; expected a unique name'),
    ("duplicate backend", lambda d: web_backends(d).append({"address": "198.19.0.11",
                                                            "port": 80, "weight": 5}),
     "pool.web.backends[3]: duplicate backend 198.19.0.11:80, already at pool.web.backends[0]"),
    ("backend of another family",
     _set(["pool", "web", "backends", 1, "address"], "2001:db8:200::5"),
     'pool.web.backends[1].address: 2001:db8:200::5 is IPv6 but vip[0] ("web") that uses pool '
     '"web" is IPv4; expected an IPv4 address (NAT does not translate families)'),
    ("VIP address used as a backend",
     _set(["pool", "web", "backends", 2, "address"], "198.18.100.1"),
     "pool.web.backends[2].address: 198.18.100.1 is also the address of vip[0]; expected a "
     "backend address that is not a VIP"),
    ("bad pool name", lambda d: d["pool"].update({"we b": d["pool"].pop("web")})
     or d["vip"][0].update(pool="we b"),
     'pool."we b": expected a pool name of 1..64 letters, digits, "_", "." or "-", '
     'got "we b"'),
    ("negative slow start", _set(["pool", "web", "slow_start"], -5),
     "pool.web.slow_start: expected seconds >= 0 and <= 86400, got -5"),
    ("bad closed_port", _set(["global", "closed_port"], "rst"),
     'global.closed_port: expected "drop" or "reject", got "rst"'),
    ("negative reject_rate", _set(["global", "reject_rate"], -1),
     "global.reject_rate: expected an integer 0..10000000, got -1"),
    ("fragment cache too small", _set(["global", "fragments"], {"cache_size": 2}),
     "global.fragments.cache_size: expected an integer 4..16777216, got 2"),
    ("fragment timeout too long", _set(["global", "fragments"], {"timeout": 120}),
     "global.fragments.timeout: expected seconds >= 0.001 and <= 60, got 120"),
    ("unknown fragments key", _set(["global", "fragments"], {"size": 5}),
     'global.fragments.size: unknown key; expected one of: buffers, cache_size, timeout'),
    ("bad persistence", _set(["vip", 0, "persistence"], "sticky"),
     'vip[0].persistence: expected "none" or "source", got "sticky"'),
    ("bad limit_action", _set(["vip", 0, "limit_action"], "rst"),
     'vip[0].limit_action: expected "drop" or "reject", got "rst"'),
    ("negative max_flows", _set(["vip", 0, "max_flows"], -3),
     "vip[0].max_flows: expected an integer 0..16777216, got -3"),
    ("burst without a rate", _set(["vip", 0, "client_burst"], 10),
     "vip[0].client_burst: expected 0 (no client_rate is set), got 10; a burst needs "
     "client_rate > 0"),
    ("closed_port differs on one address",
     lambda d: d["vip"].append(dict(d["vip"][0], name="web2", port=81, closed_port="reject")),
     'vip[2].closed_port: "reject" differs from vip[0] on the same address 198.18.100.1 '
     '("drop"); expected the same closed_port for every VIP of an address (the ports no VIP '
     "serves are the address's)"),
    ("rawsock mode without [rawsock]", _set(["global", "mode"], "rawsock"),
     'rawsock: missing; mode "rawsock" needs a [rawsock] table with client_link and '
     'backend_link'),
    ("rawsock bad link", lambda d: d["global"].update(mode="rawsock")
     or d.update(rawsock={"client_link": "eth0", "backend_link": "eth 1"}),
     'rawsock.backend_link: expected a network interface name (1..15 characters), got "eth 1"'),
    ("worker_cpus, one per worker", _set(["global", "worker_cpus"], [1, 2]),
     W_CPUS + "[1, 2]; 2 CPU(s) for global.workers = 1"),
    ("worker_cpus, none twice", lambda d: d["global"].update(workers=2, worker_cpus=[3, 3]),
     W_CPUS + "[3, 3]"),
    ("worker_cpus, numbers", _set(["global", "worker_cpus"], [-1]), W_CPUS + "[-1]"),
    ("worker_cpus, not a boolean", _set(["global", "worker_cpus"], [True]), W_CPUS + "[true]"),
    ("worker_cpus, not past MAX_CPU", _set(["global", "worker_cpus"], [4096]), W_CPUS + "[4096]"),
    ("worker_cpus, an array", _set(["global", "worker_cpus"], 3),
     "global.worker_cpus: expected an array of CPU numbers 0..4095, one per worker, none "
     "twice, got 3 (an integer)"),
]


@pytest.mark.parametrize("mutate,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_message(mutate, message):
    assert one_error(mutate) == message


_STATUS = "a non-empty array of HTTP status codes 100..599, e.g. [200]"
_COMMAND = 'a non-empty array of strings (program and arguments), e.g. ["/usr/bin/true"]'
_HTTP_PATH = 'an HTTP path starting with "/", without spaces or control characters'
_LONG = "x" * (C.UDP_PAYLOAD_MAX + 1)

HEALTH_CASES = [
    # (id, the whole [pool.web.health] table, the message after "pool.web.health.")
    # the type, and which keys go with it
    ("type unknown", {"type": "icmp"},
     'type: expected "tcp" or "http" or "udp" or "exec", got "icmp"'),
    ("type misspelt", {"type": "htp"},
     'type: expected "tcp" or "http" or "udp" or "exec", got "htp"; did you mean "http"?'),
    ("type missing", {"interval": 2},
     'type: missing; expected "tcp" or "http" or "udp" or "exec"'),
    ("type unknown: other keys are not blamed", {"type": "icmp", "payload": "x", "path": "/"},
     'type: expected "tcp" or "http" or "udp" or "exec", got "icmp"'),
    ("unknown key", {"type": "tcp", "intervall": 2},
     'intervall: unknown key; did you mean "interval"?'),
    ("udp key in http", {"type": "http", "payload": "x"},
     'payload: not allowed here: only for type "udp" (this check is type "http")'),
    ("http key in tcp", {"type": "tcp", "path": "/"},
     'path: not allowed here: only for type "http" (this check is type "tcp")'),
    ("exec key in udp", {"type": "udp", "payload": "x", "command": ["/bin/true"]},
     'command: not allowed here: only for type "exec" (this check is type "udp")'),
    # keys every type has
    ("interval zero", {"type": "tcp", "interval": 0},
     "interval: expected seconds >= 0.01 and <= 3600, got 0"),
    ("interval too long", {"type": "tcp", "interval": 3601},
     "interval: expected seconds >= 0.01 and <= 3600, got 3601"),
    ("interval a string", {"type": "tcp", "interval": "2s"},
     'interval: expected seconds (a number) >= 0.01 and <= 3600, got "2s" (a string)'),
    ("timeout zero", {"type": "tcp", "timeout": 0},
     "timeout: expected seconds > 0 and <= 3600, got 0"),
    ("timeout above interval", {"type": "tcp", "interval": 2, "timeout": 3},
     "timeout: expected seconds > 0 and <= interval (2), got 3; a check must end before the "
     "next one starts"),
    ("timeout above the default interval", {"type": "tcp", "timeout": 2.5},
     "timeout: expected seconds > 0 and <= interval (2), got 2.5; a check must end before the "
     "next one starts"),
    ("rise zero", {"type": "tcp", "rise": 0}, "rise: expected an integer 1..1000, got 0"),
    ("fall zero", {"type": "tcp", "fall": 0}, "fall: expected an integer 1..1000, got 0"),
    ("fall too many", {"type": "tcp", "fall": 1001},
     "fall: expected an integer 1..1000, got 1001"),
    ("rise a float", {"type": "tcp", "rise": 2.0},
     "rise: expected an integer 1..1000, got 2.0 (a float)"),
    ("port out of range", {"type": "tcp", "port": 65536},
     "port: expected an integer 1..65535, got 65536"),
    ("port zero", {"type": "tcp", "port": 0}, "port: expected an integer 1..65535, got 0"),
    ("port a string", {"type": "tcp", "port": "80"},
     'port: expected an integer 1..65535, got "80" (a string)'),
    # http
    ("http path relative", {"type": "http", "path": "healthz"},
     f'path: expected {_HTTP_PATH}, got "healthz"'),
    ("http path injection", {"type": "http", "path": "/x HTTP/1.0\r\nX: y"},
     f'path: expected {_HTTP_PATH}, got "/x HTTP/1.0\\r\\nX: y"'),
    ("http path not a string", {"type": "http", "path": 1},
     'path: expected an HTTP path starting with "/", got 1 (an integer)'),
    ("http host with a space", {"type": "http", "host": "www example"},
     'host: expected a Host header value without spaces, got "www example"'),
    ("http host empty", {"type": "http", "host": ""},
     'host: expected a Host header value without spaces, got ""'),
    ("http host not a string", {"type": "http", "host": ["a"]},
     'host: expected a Host header value, got ["a"] (an array)'),
    ("expect_status not an array", {"type": "http", "expect_status": 200},
     f"expect_status: expected {_STATUS}, got 200 (an integer)"),
    ("expect_status empty", {"type": "http", "expect_status": []},
     f"expect_status: expected {_STATUS}, got []"),
    ("expect_status out of range", {"type": "http", "expect_status": [200, 99]},
     f"expect_status: expected {_STATUS}, got [200, 99]"),
    ("expect_status a boolean", {"type": "http", "expect_status": [True]},
     f"expect_status: expected {_STATUS}, got [true]"),
    ("expect_status strings", {"type": "http", "expect_status": ["200"]},
     f'expect_status: expected {_STATUS}, got ["200"]'),
    ("body_match not a string", {"type": "http", "body_match": 1},
     "body_match: expected a string, got 1 (an integer)"),
    # udp
    ("udp payload missing", {"type": "udp"},
     'payload: missing; expected the text to send, e.g. "ping"'),
    ("udp payload not a string", {"type": "udp", "payload": 1},
     'payload: expected the text to send, e.g. "ping", got 1 (an integer)'),
    ("udp payload too long", {"type": "udp", "payload": _LONG},
     f'payload: expected at most 65507 bytes, got "{"x" * 76}...'),
    ("udp expect not a string", {"type": "udp", "payload": "ping", "expect": 1},
     "expect: expected a string, got 1 (an integer)"),
    # exec
    ("exec command missing", {"type": "exec"}, f"command: missing; expected {_COMMAND}"),
    ("exec command a string", {"type": "exec", "command": "/usr/bin/true"},
     f'command: expected {_COMMAND}, got "/usr/bin/true" (a string)'),
    ("exec command empty", {"type": "exec", "command": []},
     f"command: expected {_COMMAND}, got []"),
    ("exec program empty", {"type": "exec", "command": ["", "x"]},
     f'command: expected {_COMMAND}, got ["", "x"]'),
    ("exec argument not a string", {"type": "exec", "command": ["/usr/bin/true", 1]},
     f'command: expected {_COMMAND}, got ["/usr/bin/true", 1]'),
    ("exec argument with NUL", {"type": "exec", "command": ["/usr/bin/true", "a\0b"]},
     f'command: expected {_COMMAND}, got ["/usr/bin/true", "a\\u0000b"]'),
]


@pytest.mark.parametrize("health,message", [c[1:] for c in HEALTH_CASES],
                         ids=[c[0] for c in HEALTH_CASES])
def test_bad_health_section(health, message):
    assert one_error(_set(["pool", "web", "health"], health)) == "pool.web.health." + message


def test_every_check_type_has_a_parser():
    assert tuple(C._HEALTH_PARSERS) == C.HEALTH_TYPES
    assert set(C._HEALTH_ONLY.values()) <= set(C.HEALTH_TYPES)


def test_every_health_type_parses():
    sections = {
        "tcp": ({"type": "tcp", "port": 8080},
                HealthCheckConfig(type="tcp", port=8080)),
        "http": ({"type": "http", "host": "www.example", "expect_status": [200, 204],
                  "body_match": "ok"},
                 HealthCheckConfig(type="http", host="www.example", expect_status=(200, 204),
                                   body_match="ok")),
        "udp": ({"type": "udp", "payload": "ping", "expect": "pong"},
                HealthCheckConfig(type="udp", payload="ping", expect="pong")),
        "exec": ({"type": "exec", "command": [sys.executable, "-c", ""]},
                 HealthCheckConfig(type="exec", command=(sys.executable, "-c", ""))),
    }
    assert set(sections) == set(C.HEALTH_TYPES)
    for typ, (section, expected) in sections.items():
        d = copy.deepcopy(BASE)
        d["pool"]["web"]["health"] = section
        cfg = config_from_dict(d)
        assert cfg.pools["web"].health == expected, typ
        assert cfg.warnings == (), typ


def test_exec_command_not_found_is_a_warning():
    d = copy.deepcopy(BASE)
    d["pool"]["web"]["health"] = {"type": "exec", "command": ["/nonexistent/check", "x"]}
    cfg = config_from_dict(d)
    assert cfg.pools["web"].health.command == ("/nonexistent/check", "x")
    assert cfg.warnings == ('pool.web.health.command: "/nonexistent/check" is not an '
                            "executable file on this host",)


def test_errors_keep_file_order_across_array_elements():
    def two(d: dict) -> None:
        web_backends(d)[0]["port"] = 0
        web_backends(d)[1]["zzz"] = 1
        d["vip"][0]["port"] = 0
        d["vip"][1] = 5
    assert [e.split(":")[0] for e in errors_of(two)] == [
        "pool.web.backends[0].port", "pool.web.backends[1].zzz", "vip[0].port", "vip[1]"]


def test_every_error_is_collected():
    def many(d: dict) -> None:
        d["global"]["workers"] = 0
        d["global"]["ring_size"] = 100
        d["vip"][0]["port"] = 70000
        d["vip"][1]["pool"] = "nope"
        web_backends(d)[0]["weight"] = -3
        web_health(d)["rise"] = 0
    errs = errors_of(many)
    assert [e.split(":")[0] for e in errs] == [
        "global.workers", "global.ring_size", "pool.web.health.rise",
        "pool.web.backends[0].weight", "vip[0].port", "vip[1].pool"]
    doc = copy.deepcopy(BASE)
    many(doc)
    with pytest.raises(ConfigError) as ei:
        config_from_dict(doc, "x.toml")
    text = str(ei.value)
    assert text.startswith("x.toml: 6 errors\n")
    assert all(f"\n  {e}" in text for e in errs)


def test_unknown_key_and_missing_key_both_reported():
    errs = errors_of(lambda d: d["vip"][0].update(adress=d["vip"][0].pop("address")))
    assert errs == ['vip[0].adress: unknown key; did you mean "address"?',
                    "vip[0].address: missing; expected an IPv4 or IPv6 address"]


# --- files and the TOML layer ---------------------------------------------------------

def test_toml_syntax_error_has_line_and_column(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[global]\nworkers = 2\nmode = "tun\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert not isinstance(ei.value, ConfigFileError)
    (err,) = ei.value.errors
    assert err.startswith("line 3, column 12: TOML syntax error: ")
    assert ei.value.source == str(f)


def test_toml_syntax_error_from_text():
    with pytest.raises(ConfigError) as ei:
        parse_config("[[vip]]\naddress = = 1\n", "inline")
    assert ei.value.errors == ["line 2, column 11: TOML syntax error: Invalid value"]


def test_file_missing(tmp_path):
    with pytest.raises(ConfigFileError) as ei:
        load_config(tmp_path / "nope.toml")
    assert ei.value.errors == ["cannot read the config file: No such file or directory"]


def test_file_is_a_directory(tmp_path):
    with pytest.raises(ConfigFileError) as ei:
        load_config(tmp_path)
    assert ei.value.errors == ["cannot read the config file: Is a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_unreadable(tmp_path):
    f = tmp_path / "secret.toml"
    f.write_text("")
    f.chmod(0)
    with pytest.raises(ConfigFileError) as ei:
        load_config(f)
    assert ei.value.errors == ["cannot read the config file: Permission denied"]


def test_file_not_utf8(tmp_path):
    f = tmp_path / "latin1.toml"
    f.write_bytes(b'[global]\ntun_name = "caf\xe9"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert ei.value.errors == ["line 2, column 16: not UTF-8 text (TOML files are UTF-8)"]


# --- lbcore check-config --------------------------------------------------------------------

def check_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lbcore", "check-config", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_ok():
    r = check_config(str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "OK: 5 VIPs, 12 backends\n"
    assert r.stderr == ""


def test_cli_ok_with_warnings(tmp_path):
    f = tmp_path / "w.toml"
    f.write_text('[[vip]]\naddress = "198.18.100.1"\nport = 80\nprotocol = "tcp"\npool = "p"\n'
                 '[pool.p]\nbackends = [{ address = "198.19.0.1", port = 80, weight = 0 }]\n')
    r = check_config(str(f))
    assert r.returncode == 0
    assert r.stdout == "OK: 1 VIPs, 1 backends\n"
    assert r.stderr == (f"{f}: warning: pool.p.backends: every backend has weight 0: VIPs using "
                        "this pool have no backend (see global.all_down)\n")


def test_cli_warns_of_worker_cpus_this_machine_lacks(tmp_path):
    """Valid (the file may be meant for a bigger machine), but `run` would refuse it here."""
    f = tmp_path / "c.toml"
    f.write_text('[global]\nworker_cpus = [4095]\n[[vip]]\naddress = "198.18.100.1"\n'
                 'port = 80\nprotocol = "tcp"\npool = "p"\n'
                 '[pool.p]\nbackends = [{ address = "198.19.0.1", port = 80 }]\n')
    r = check_config(str(f))
    assert r.returncode == 0 and r.stdout == "OK: 1 VIPs, 1 backends\n"
    assert r.stderr.startswith(f"{f}: warning: global.worker_cpus: CPU 4095 is not one this "
                               "process may run on (it may run on 0")
    assert r.stderr.endswith("): `lbcore run` refuses it on this machine\n")


def test_cli_errors_exit_1(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[global]\nworker = 2\nring_size = 65536\n'
                 '[[vip]]\naddress = "198.18.100.1"\nport = 80\nprotocol = "tcp"\npool = "p"\n')
    r = check_config(str(f))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f'{f}: global.worker: unknown key; did you mean "workers"?',
        f"{f}: global.ring_size: expected a prime number 2..16777213, got 65536; 65536 is not "
        "prime; nearest primes: 65521 or 65537",
        f'{f}: vip[0].pool: "p" is not defined: expected the name of a [pool.NAME] table; '
        "no pool is defined",
        f"check-config: 3 errors in {f}",
    ]


def test_cli_syntax_error_exit_1(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[global\n")
    r = check_config(str(f))
    assert r.returncode == 1
    assert r.stderr.startswith(f"{f}: line 1, column 8: TOML syntax error: ")


def test_cli_missing_file_exit_2(tmp_path):
    r = check_config(str(tmp_path / "nope.toml"))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "nope.toml: cannot read the config file: No such file or directory" in r.stderr


def test_cli_directory_exit_2(tmp_path):
    r = check_config(str(tmp_path))
    assert r.returncode == 2
    assert "cannot read the config file: Is a directory" in r.stderr
