"""`lbcore`: the one command line for running, checking, inspecting and the lab.

Only argument parsing lives here; every verb calls into the module that owns
it (config, daemon, control.client, lab), imported lazily so that
`lbcore --help` and `check-config` stay fast and need no root.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._version import __version__

DEFAULT_CONFIG = "/etc/lbcore/lbcore.toml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lbcore",
        description="A layer-4 load balancer: VIPs spread over backends by Maglev "
        "hashing, NAT both ways, a C data plane.",
    )
    p.add_argument("--version", action="version", version=f"lbcore {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="run the balancer in the foreground",
                       description="Create the data plane (TUN device or AF_PACKET "
                       "sockets), set up routes/rules/sysctls, run health checks and "
                       "forward until SIGTERM/SIGINT. On exit the TUN device (tun mode) "
                       "stays with its routes, for the next start to attach to (a shorter "
                       "restart), and so does the reply path's reservation: the backends' "
                       "reply rules and blackhole routes for the replies and the VIPs, so "
                       "that until the next start no reply leaves un-translated (a client "
                       "would reset its connection); the rest is undone. `lbcore cleanup` "
                       "or --cleanup-on-exit removes them.")
    r.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file (TOML)")
    r.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="overrides global.log_level of the config (default info)")
    r.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    r.add_argument("--cleanup-on-exit", action="store_true",
                   help="on exit also remove the TUN device, the reply rules and "
                   "blackholes (for a gateway "
                   "that stops balancing; a restart with this flag resets connections)")
    cl = sub.add_parser("cleanup", help="remove the TUN device, reply rules and blackholes "
                        "a stopped lbcore leaves (the gateway then routes replies and VIPs "
                        "normally)")
    cl.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                    help="config file, to refuse while its lbcore runs")

    c = sub.add_parser("check-config", help="validate a config file without touching the network")
    c.add_argument("file", help="config file (TOML)")

    lab = sub.add_parser("lab", help="a whole rack in network namespaces on this machine",
                         description="Namespaces lbc-client, lbc-gw, lbc-be1..N joined by "
                         "veth links, addressed from 198.18.0.0/15; the balancer runs in "
                         "lbc-gw. The root namespace gets no lab address or route.")
    lsub = lab.add_subparsers(dest="lab_cmd", metavar="ACTION", required=True)
    up = lsub.add_parser("up", help="build the lab and start the balancer in lbc-gw")
    up.add_argument("--backends", type=int, default=3, help="number of backends (default 3)")
    up.add_argument("--ipv6", action="store_true", help="add IPv6 (2001:db8::/32) beside IPv4")
    up.add_argument("--mode", default="tun", choices=["tun", "rawsock"],
                    help="data plane mode of the balancer (default tun)")
    up.add_argument("--workers", type=int, default=1, help="data plane workers (default 1)")
    up.add_argument("--gateways", type=int, default=1,
                    help="1 (default): lbc-gw as always; 2..4: lbc-gw1..N active-active "
                    "behind the router lbc-rtr (BGP, BFD, ECMP), VRRP on the rack")
    up.add_argument("--no-balancer", action="store_true",
                    help="build the namespaces and servers only (for benchmarks)")
    lsub.add_parser("down", help="remove everything the lab made (idempotent)")
    lsub.add_parser("status", help="show the lab and where its config, socket and log are")

    def ctl(name: str, **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, **kw)
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                        help="config file, to find the control socket")
        sp.add_argument("-s", "--socket", help="control socket path (overrides the config)")
        return sp

    st = ctl("status", help="VIPs, backends, health, weights, flows and counters")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    tp = ctl("top", help="live view of VIPs, backends, rates and drops (q or Ctrl-C leaves)",
             description="The status page's picture in the terminal, redrawn every second "
             "from the control socket, like `lbcore status`.")
    tp.add_argument("-n", "--interval", type=float, default=1.0,
                    help="seconds between redraws (default 1)")
    fl = ctl("flows", help="list tracked flows")
    fl.add_argument("--vip", help="only flows of this VIP (name or ADDR[:PORT])")
    fl.add_argument("--limit", type=int, default=100,
                    help="at most this many (default 100); fetched in pages of 1000")
    fl.add_argument("--json", action="store_true")
    pk = ctl("pick", help="which backend a flow goes to, and why")
    pk.add_argument("vip", help="VIP name or ADDR[:PORT]")
    pk.add_argument("src", help="client address")
    pk.add_argument("sport", type=int, help="client port")
    pk.add_argument("--proto", choices=["tcp", "udp"], help="protocol (default: the VIP's)")
    be = ctl("backend", help="drain, undrain or re-weight a backend at runtime")
    be.add_argument("action", choices=["drain", "undrain", "weight"])
    be.add_argument("vip", help="VIP name or ADDR[:PORT]")
    be.add_argument("backend", help="backend ADDR[:PORT]")
    be.add_argument("weight", type=int, nargs="?", help="new weight (for `weight`)")
    ctl("drain-gateway", help="withdraw every VIP from BGP; keep forwarding what still "
        "arrives (before a planned stop)")
    ctl("reload", help="re-read the config and apply it without dropping flows (also SIGHUP)")

    d = sub.add_parser("demo", help="lab up, real traffic, a report, lab down")
    d.add_argument("--backends", type=int, default=3)
    d.add_argument("--requests", type=int, default=300, help="HTTP requests (new connections)")
    d.add_argument("--udp", type=int, default=300, help="UDP requests")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "check-config":
        from .config import cmd_check_config
        return cmd_check_config(args)
    if args.cmd == "run":
        from .daemon import cmd_run
        return cmd_run(args)
    if args.cmd == "cleanup":
        from .daemon import cmd_cleanup
        return cmd_cleanup(args)
    if args.cmd == "lab":
        from . import lab
        verbs = {"up": lab.cmd_up, "down": lab.cmd_down, "status": lab.cmd_status}
        return verbs[args.lab_cmd](args)
    if args.cmd == "top":
        from .control.top import cmd_top
        return cmd_top(args)
    if args.cmd in ("status", "flows", "pick", "backend", "reload", "drain-gateway"):
        from .control import client
        try:
            return getattr(client, f"cmd_{args.cmd.replace('-', '_')}")(args)
        except client.ControlError as e:
            print(f"lbcore {args.cmd}: {e}", file=sys.stderr)
            return 1
    if args.cmd == "demo":
        from .lab.demo import cmd_demo
        return cmd_demo(args)
    print(f"lbcore: unknown command {args.cmd}", file=sys.stderr)  # unreachable: argparse
    return 2
