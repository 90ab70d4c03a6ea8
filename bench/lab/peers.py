"""Configurations of the systems lbcore is compared with, and lbcore's own bench config.

Pure text generation (tested without root); run.py applies them in the lab's gateway.

Every system gets the same three services on the VIP, so that every workload runs unchanged
against every system:

* TCP 8080 -> nginx on every backend (the HTTP cells: a C server, so that the cells measure the
  forwarders and not the lab's Python servers, which stay on :80 for the lab's own checks);
* UDP 5300 -> the backends' UDP port 5300 (all backends);
* TCP 5201 -> iperf3 on backend 1 only. iperf3's control connection and its data connections
  must reach the same server, but they are different 5-tuples, which a 5-tuple hash (lbcore,
  nftables jhash) or round robin (HAProxy) would send to different backends. So the bulk VIP
  port has a one-backend pool in every system; kernel forwarding talks to that backend directly.
"""
from __future__ import annotations

from collections.abc import Sequence

HTTP_PORT = 80                  # the lab's Python servers (health checks, the VIP probe)
NGINX_PORT = 8080               # nginx on every backend: what the HTTP cells measure
UDP_PORT = 5300
BULK_PORT = 5201
NFT_TABLE = "lbcbench"          # the table this bench adds (gateway: DNAT; backends: counters)
JHASH_SEED = 0x6c62636f         # fixed, so that repeated runs spread the same flows alike
FLOOD_SPORT0 = 20000            # udpflood's first source port (below the ephemeral range)
FLOOD_FLOWS = 64


def _nft_map(backends: Sequence[str]) -> str:
    return "{ " + ", ".join(f"{i} : {b}" for i, b in enumerate(backends)) + " }"


def nftables_dnat(vip: str, backends: Sequence[str]) -> str:
    """The gateway's ruleset for nftables DNAT balancing.

    As nftlb and kube-proxy's nftables mode do it: a ``jhash`` of the client address and port
    picks the backend of a new flow, conntrack keeps every later packet of the flow on it and
    un-NATs the replies. No masquerade: the backends route back through the gateway, so they see
    the client's real address (as with lbcore). The empty postrouting chain registers the NAT
    hook there too, as older kernels need for DNAT-only rulesets.
    """
    n = len(backends)
    m = _nft_map(backends)
    return (
        f"table ip {NFT_TABLE} {{\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority dstnat; policy accept;\n"
        f"        ip daddr {vip} tcp dport {HTTP_PORT} dnat to jhash ip saddr . tcp sport "
        f"mod {n} seed {JHASH_SEED:#x} map {m}\n"
        f"        ip daddr {vip} tcp dport {NGINX_PORT} dnat to jhash ip saddr . tcp sport "
        f"mod {n} seed {JHASH_SEED:#x} map {m}\n"
        f"        ip daddr {vip} udp dport {UDP_PORT} dnat to jhash ip saddr . udp sport "
        f"mod {n} seed {JHASH_SEED:#x} map {m}\n"
        f"        ip daddr {vip} tcp dport {BULK_PORT} dnat to {backends[0]}\n"
        "    }\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority srcnat; policy accept;\n"
        "    }\n"
        "}\n"
    )


def backend_counter(sport0: int = FLOOD_SPORT0, flows: int = FLOOD_FLOWS) -> str:
    """A backend's ruleset that counts (and then drops) the UDP flood's packets.

    "Delivered" means the packet reached the backend's IP layer; dropping it there, before the
    socket, keeps the lab's Python UDP server from burning CPU 0 (the generators' core) on
    answers nobody reads. The match on udpflood's source ports leaves the balancers' UDP health
    checks (ephemeral ports) alone.
    """
    return (
        f"table inet {NFT_TABLE} {{\n"
        "    counter flood { }\n"
        "    chain prerouting {\n"
        "        type filter hook prerouting priority raw; policy accept;\n"
        f"        udp dport {UDP_PORT} udp sport {sport0}-{sport0 + flows - 1} "
        "counter name flood drop\n"
        "    }\n"
        "}\n"
    )


SENDER_TABLE = "lbcbench_sender"


def sender_drop(dest: str) -> str:
    """The gateway's ruleset for the sender-alone run: count and drop the flood to ``dest``
    at the first hook (prerouting, raw priority; no conntrack)."""
    return (
        f"table ip {SENDER_TABLE} {{\n"
        "    counter dropped { }\n"
        "    chain prerouting {\n"
        "        type filter hook prerouting priority raw; policy accept;\n"
        f"        ip daddr {dest} udp dport {UDP_PORT} counter name dropped drop\n"
        "    }\n"
        "}\n"
    )


HAPROXY_SETTINGS = ("mode tcp, balance roundrobin, nbthread 1 (the one core the forwarder "
                    "gets: CPU 1), maxconn as high as the file-descriptor limit allows (2 "
                    "descriptors per proxied connection), tcp health checks every 1 s on the web "
                    "pool, no logging, no splicing (HAProxy's defaults otherwise)")


def haproxy_maxconn(nofile_hard: int) -> int:
    """The highest maxconn the descriptor limit allows: HAProxy needs two descriptors per
    proxied connection plus a few for itself, and refuses to start otherwise."""
    return max(1000, min(200000, (nofile_hard - 500) // 2))


def haproxy_config(vip: str, backends: Sequence[str], *, pidfile: str,
                   maxconn: int = 200000) -> str:
    """HAProxy in TCP mode with production settings (no artificial limits; see
    HAPROXY_SETTINGS). The VIP must be a local address of the gateway while HAProxy runs."""
    servers = "\n".join(f"    server be{i} {b}:{HTTP_PORT} check inter 1s"
                        for i, b in enumerate(backends, 1))
    nginx = "\n".join(f"    server be{i} {b}:{NGINX_PORT} check inter 1s"
                      for i, b in enumerate(backends, 1))
    return f"""\
global
    nbthread 1
    maxconn {maxconn}
    pidfile {pidfile}

defaults
    mode tcp
    option dontlognull
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend web
    bind {vip}:{HTTP_PORT}
    default_backend web

backend web
    balance roundrobin
{servers}

frontend nginx
    bind {vip}:{NGINX_PORT}
    default_backend nginx

backend nginx
    balance roundrobin
{nginx}

frontend bulk
    bind {vip}:{BULK_PORT}
    default_backend bulk

backend bulk
    server be1 {backends[0]}:{BULK_PORT}
"""


def lbcore_bench_config(lab_config: str, vip: str, bulk_backend: str,
                        backends: Sequence[str] = ()) -> str:
    """The lab's own balancer config plus the bulk VIP port (a one-backend pool without a
    health check: iperf3 would take a check's connection for a test) and, given the backends,
    the nginx port over all of them (checked like the lab's web pool)."""
    text = lab_config.rstrip() + f"""

# Added by bench/lab: iperf3 on backend 1 (see bench/lab/peers.py for why one backend).
[[vip]]
address = "{vip}"
port = {BULK_PORT}
protocol = "tcp"
pool = "bulk"

[pool.bulk]
backends = [
    {{ address = "{bulk_backend}", port = {BULK_PORT}, weight = 1 }},
]
"""
    if backends:
        rows = "\n".join(f'    {{ address = "{b}", port = {NGINX_PORT}, weight = 1 }},'
                         for b in backends)
        text += f"""
# Added by bench/lab: nginx on every backend, what the HTTP cells measure.
[[vip]]
address = "{vip}"
port = {NGINX_PORT}
protocol = "tcp"
pool = "nginx"

[pool.nginx]
backends = [
{rows}
]

[pool.nginx.health]
type = "tcp"
interval = 1
timeout = 0.5
rise = 1
fall = 2
"""
    return text


NGINX_SETTINGS = ("nginx from Debian, one per backend on :8080, started by the bench in the "
                  "backend's namespace (CPU 0, with the generators): worker_processes 1, "
                  "access_log off, keep-alive on (keepalive_requests 1000000, timeout 65 s), "
                  "every request answered `200` with a 4-byte body (the backend's name) from "
                  "the config itself (no file read), as the lab's own servers answer")


def nginx_config(name: str, prefix: str, port: int = NGINX_PORT) -> str:
    """One backend's nginx.conf: a C server answering every request with a tiny static body.

    Everything nginx writes (pid file, temp directories) stays under ``prefix``, a temporary
    directory of the bench; the error log goes to stderr, which the bench reads if nginx fails
    to start. ``daemon off`` keeps the master in the foreground, so the PID the bench started
    is nginx's master and stopping it (SIGTERM: fast shutdown) ends its worker too.
    keepalive_requests is raised from its default (1000) so that the keep-alive cell measures
    requests, not reconnections.
    """
    if not name.replace("-", "").isalnum():
        raise ValueError(f"backend name must be alphanumeric: {name!r}")
    return f"""\
# Written by bench/lab for one lab backend; removed with its temporary directory.
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 8192;
    multi_accept on;
}}

http {{
    access_log off;
    server_tokens off;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    server {{
        listen {port} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "{name}\\n";
        }}
    }}
}}
"""


WRK_DELAY_LUA = """\
-- bench/lab latency cell: each connection waits DELAY ms after a response before its next
-- request, so that c connections offer about c * 1000 / DELAY requests per second.
function delay()
   return {delay_ms}
end
"""
