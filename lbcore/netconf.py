"""Network configuration through netlink (pyroute2): the one place lbcore talks to the kernel.

The balancer's gateway set-up (TUN routes, the return-path policy rule, sysctls) and the lab
(namespaces, veth links, a bridge, addresses, routes) need the same few primitives. Every
function here is

* **netns-aware**: it takes ``netns`` (a name under /var/run/netns, or a path); ``None`` means the
  caller's own namespace. A namespace that does not exist is an error (``FileNotFoundError``),
  never silently created.
* **idempotent**: adding what is already there is not an error (add-or-replace) and deleting what
  is absent is a no-op that returns ``False`` (absent also when its interface or its namespace is
  gone). After a change the function polls until the kernel shows it, because RTNL changes may
  become visible a little after the call returns (the reason for pyroute2's ``ensure()``); the
  next step can rely on what the previous one did. Proxy neighbour entries are the exception: a
  neighbour dump does not show them, so they are neither checked nor polled.
* **undoable**: pass a :class:`NetChanges` as ``changes`` and it records how to revert what the
  call did; ``changes.undo()`` reverts everything in reverse order, so that a failure half-way
  leaves nothing behind.

What undo reverts (the ownership rule):

* namespaces and links: removed only if this call created them (one that already existed may carry
  state that is not ours);
* addresses, routes, rules, neighbours: removed, also when they were already there (a leftover of
  a crashed run of ours is then cleaned by the next run's exit);
* link attributes (state, mtu, txqueuelen, master) and sysctls: set back to their old value.

What blocks: everything. The API is synchronous: a function that changes something returns only
once the kernel shows the change. A call is a few netlink round trips plus, after a change, the
poll (usually done within milliseconds; at most ``POLL_TIMEOUT``, 5 s, then TimeoutError). In
the caller's own namespace that is a few milliseconds. With ``netns`` set, pyroute2 also forks a
short-lived child process to open the netlink socket inside that namespace, so a call takes tens
of milliseconds; :func:`netns_create` forks one too.

Called from a thread that runs an asyncio loop, a netlink function moves its work to a
short-lived helper thread, because pyroute2's synchronous facade would try to run an event loop
of its own inside the running one. The caller then join()s that thread, so its loop still stops
for the whole call: the hop is for correctness, not concurrency. A loop that must keep serving
meanwhile calls these through ``asyncio.to_thread``. The functions without netlink block as
well: :func:`sysctl_get`/:func:`sysctl_set` with ``netns`` and :func:`run_in_netns` wait for a
helper thread that enters the namespace (and, for run_in_netns, for whatever the callable does),
and :func:`netns_pids` scans /proc. Nothing here shells out to ip, tc or sysctl.

Processes and threads inside a namespace: :func:`run_in_netns` runs a Python callable in a fresh
thread that has done ``setns()`` (the namespace is per thread, so the caller's thread never
moves); :func:`popen_in_netns` starts a subprocess whose child does ``setns()`` before ``exec``.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2 import netns as _pyroute2_netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, nla, nlmsg
from pyroute2.netlink.exceptions import NetlinkError

__all__ = [
    "GONE_ERRNOS", "NETNS_DIR", "NetChanges", "LinkInfo", "RouteInfo", "RuleInfo", "is_gone",
    "netns_path", "netns_exists", "netns_list", "netns_create", "netns_remove", "netns_pids",
    "veth_add", "bridge_add", "link_set", "link_del", "link_index", "links", "tun_info",
    "addr_add", "addr_del", "addresses", "route_add", "route_del", "route_nexthops", "routes",
    "rule_add", "rule_del", "rules", "neigh_add", "neigh_del", "neighbours", "neigh_resolve",
    "neigh_proxy_add", "neigh_proxy_del", "change_notifier", "ingress_bpf_set",
    "ingress_bpf_del", "ingress_qdisc_del", "ingress_drops",
    "drain_notifier",
    "sysctl_get", "sysctl_set", "run_in_netns", "popen_in_netns",
]

log = logging.getLogger("lbcore.netconf")

NETNS_DIR = "/var/run/netns"
POLL_TIMEOUT = 5.0          # seconds: how long a change may take to become visible
POLL_MAX_INTERVAL = 0.05    # seconds: polling backs off from 1 ms up to this
MAIN_TABLE = 254            # RT_TABLE_MAIN
CLONE_NEWNET = 0x40000000
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RT_SCOPE_HOST = 254
NUD_PERMANENT = 0x80
NTF_USE = 0x01              # neighbour "used": start resolution as a queued packet would
NTF_PROXY = 0x08            # a proxy (pneigh) entry: answer ARP/NDP for the address

#: Errors that mean "it is not there (any more)": an idempotent delete or an undo ignores them.
GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL,
                         errno.ENONET, errno.ENXIO})

_libc = ctypes.CDLL(None, use_errno=True)
_libc_setns = _libc.setns  # resolved here, so that a forked child only calls it
_libc_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc_setns.restype = ctypes.c_int

P = ParamSpec("P")
T = TypeVar("T")


def is_gone(exc: BaseException) -> bool:
    """True if ``exc`` says that the object (link, address, namespace...) does not exist."""
    if isinstance(exc, NetlinkError):
        return exc.code in GONE_ERRNOS
    if isinstance(exc, OSError):
        return exc.errno in GONE_ERRNOS
    return False


# --------------------------------------------------------------------------- undo log

@dataclass
class _Change:
    what: str
    undo: Callable[[], object]


@dataclass
class NetChanges:
    """An undo log of network changes.

    Every function of this module that takes ``changes=`` appends how to revert what it did.
    ``undo()`` reverts all recorded changes in reverse order; errors that mean the object is
    already gone are ignored, others are logged and returned, and the undo carries on.

    As a context manager it is a scope: on exit, normal or not, whatever is still recorded is
    undone. Call ``commit()`` to keep the changes (it forgets them)::

        with NetChanges() as ch:          # the lab: undo only if set-up fails half-way
            netns_create("x", changes=ch)
            ...
            ch.commit()

        with NetChanges() as ch:          # the balancer: undo on every exit
            route_add("198.18.100.1/32", oif="lbc0", changes=ch)
            serve()
    """

    _log: list[_Change] = field(default_factory=list)

    def record(self, what: str, undo: Callable[[], object]) -> None:
        """Remember that ``undo()`` reverts the change described by ``what``."""
        log.debug("change: %s", what)
        self._log.append(_Change(what, undo))

    @property
    def descriptions(self) -> list[str]:
        """What is recorded, oldest first."""
        return [c.what for c in self._log]

    def __len__(self) -> int:
        return len(self._log)

    def commit(self) -> None:
        """Keep every recorded change: forget how to undo them."""
        self._log.clear()

    def undo(self) -> list[str]:
        """Revert every recorded change, newest first. Returns the failures ("what: error")."""
        failures = []
        while self._log:
            change = self._log.pop()
            try:
                change.undo()
            except Exception as e:  # noqa: BLE001 - undo must go on with the rest
                if is_gone(e):
                    continue
                log.warning("could not undo %s: %s", change.what, e)
                failures.append(f"{change.what}: {e}")
        return failures

    def __enter__(self) -> NetChanges:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()


# --------------------------------------------------------------------------- threads/processes

def netns_path(name: str) -> str:
    """The bind-mount path of a namespace name (a name with a "/" is a path already)."""
    return name if "/" in name else os.path.join(NETNS_DIR, name)


def _open_netns(name: str) -> int:
    path = netns_path(name)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"network namespace {name!r} does not exist",
                                path) from None


def _setns(fd: int) -> None:
    if _libc_setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _in_thread(fd: int | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a fresh thread (after setns(fd) if fd is given); re-raise its exception.

    A fresh thread each time: the thread that entered a namespace ends with the call, so no
    thread of the process is left in a foreign namespace.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if fd is not None:
                _setns(fd)
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="lbcore-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_in_netns(netns: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` with the network namespace ``netns`` and return its result.

    The call runs in a short-lived thread that has done setns(); sockets it creates belong to
    ``netns`` and stay there (they may be used from any thread afterwards), and files it opens
    under /proc/sys/net are that namespace's. The caller's thread never changes namespace.
    ``netns=None`` calls ``fn`` directly. Raises what ``fn`` raises, or FileNotFoundError.
    """
    if netns is None:
        return fn(*args, **kwargs)
    fd = _open_netns(netns)
    try:
        return _in_thread(fd, fn, *args, **kwargs)
    finally:
        os.close(fd)


def popen_in_netns(netns: str | None, argv: Sequence[str], **popen_kwargs: Any
                   ) -> subprocess.Popen:
    """Start ``argv`` as a subprocess inside ``netns`` (``subprocess.Popen`` keyword arguments).

    The namespace file is opened here, so a missing namespace raises FileNotFoundError in the
    caller; the child only calls setns() on the inherited descriptor between fork and exec
    (``preexec_fn``), which is all a forked child of a threaded parent may safely do.
    """
    if "preexec_fn" in popen_kwargs:
        raise TypeError("popen_in_netns sets preexec_fn itself")
    if netns is None:
        return subprocess.Popen(list(argv), **popen_kwargs)
    fd = _open_netns(netns)

    def enter() -> None:
        _setns(fd)

    try:
        return subprocess.Popen(list(argv), preexec_fn=enter, **popen_kwargs)
    finally:
        os.close(fd)


def _off_loop(fn: Callable[P, T]) -> Callable[P, T]:
    """Run ``fn`` in a helper thread when called from inside a running asyncio loop, and wait
    for it there: pyroute2 must not see the running loop, but the loop still waits."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        return _in_thread(None, fn, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _ipr(netns: str | None) -> Iterator[IPRoute]:
    """An RTNL socket in ``netns``; never creates the namespace (flags=0)."""
    if netns is not None and not os.path.exists(netns_path(netns)):
        raise FileNotFoundError(errno.ENOENT, f"network namespace {netns!r} does not exist",
                                netns_path(netns))
    ipr = IPRoute(netns=netns, flags=0) if netns is not None else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _poll(check: Callable[[], object], what: str, timeout: float = POLL_TIMEOUT) -> None:
    """Wait until ``check()`` is true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not visible after {timeout} s")
        time.sleep(delay)
        delay = min(delay * 2, POLL_MAX_INTERVAL)


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


def _index(ipr: IPRoute, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise OSError(errno.ENODEV, f"no interface {ifname!r}{_where(netns)}")
    return found[0]


def _index_or_none(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _ip_family(address: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


# The add and delete halves of every primitive below. An object is named by a key that
# find(ipr) resolves (an interface index, a route or rule spec); present(ipr, key) asks the
# kernel whether the object is there; add/delete(ipr, key) sends the request.
_Find = Callable[[IPRoute], Any]
_Present = Callable[[IPRoute, Any], bool]
_Request = Callable[[IPRoute, Any], object]


def _ensure_present(netns: str | None, what: str, find: _Find, present: _Present | None,
                    add: _Request, *, replace: bool = False) -> bool:
    """Make one object exist in ``netns``, then poll until the kernel shows it.

    ``find`` raises if what the object hangs on is missing (no such interface). Without
    ``replace``, ``add`` is called only when ``present`` is false, and an EEXIST (a racing add)
    counts as already there. With ``replace`` it is always called: a netlink "replace"
    overwrites what is there. ``present=None``: the kernel cannot be asked (proxy neighbours
    are not in a neighbour dump), so there is no check and no poll.
    Returns True if this call added the object (always, with ``replace``).
    """
    with _ipr(netns) as ipr:
        key = find(ipr)
        if not replace and present is not None and present(ipr, key):
            return False
        try:
            add(ipr, key)
            added = True
        except NetlinkError as e:
            if replace or e.code != errno.EEXIST:
                raise
            added = False
        if present is not None:
            _poll(lambda: present(ipr, key), f"{what}{_where(netns)}")
    return added


def _ensure_absent(netns: str | None, what: str, find: _Find, present: _Present | None,
                   delete: _Request) -> bool:
    """Make one object not exist in ``netns``, then poll until the kernel shows it gone.

    Returns False, and changes nothing, if it was not there: the namespace is gone, ``find``
    returns None (its interface is gone), ``present`` is false, or ``delete`` fails with a
    "gone" error (something else deleted it first). ``present=None`` skips the check and the
    poll, as in :func:`_ensure_present`.
    """
    try:
        with _ipr(netns) as ipr:
            key = find(ipr)
            if key is None or (present is not None and not present(ipr, key)):
                return False
            try:
                delete(ipr, key)
            except NetlinkError as e:
                if is_gone(e):
                    return False
                raise
            if present is not None:
                _poll(lambda: not present(ipr, key), f"deleting {what}{_where(netns)}")
    except FileNotFoundError:
        return False  # the namespace is gone, and everything that was in it
    return True


# --------------------------------------------------------------------------- namespaces

def netns_exists(name: str) -> bool:
    """True if the named namespace exists."""
    return os.path.exists(netns_path(name))


def netns_list(prefix: str = "") -> list[str]:
    """Names of the namespaces under /var/run/netns that start with ``prefix``, sorted."""
    return sorted(n for n in _pyroute2_netns.listnetns() if n.startswith(prefix))


@_off_loop
def netns_create(name: str, *, lo_up: bool = True, changes: NetChanges | None = None) -> bool:
    """Create a namespace (with its loopback up). False if it existed (and is left as it is)."""
    if netns_exists(name):
        return False
    _pyroute2_netns.create(name)
    if changes is not None:
        changes.record(f"netns {name}", lambda: netns_remove(name))
    if lo_up:
        link_set("lo", netns=name, state="up")
    return True


def netns_pids(names: Sequence[str] | None = None) -> dict[str, list[int]]:
    """PIDs of the processes living in each named namespace (of ``names``, or all)."""
    found = _pyroute2_netns.ns_pids()
    return {n: sorted(p) for n, p in found.items() if names is None or n in names}


def netns_remove(name: str) -> bool:
    """Remove a namespace. False if it did not exist.

    Its interfaces (and veth peers elsewhere) disappear with it once no process lives in it.
    """
    if not netns_exists(name):
        return False
    try:
        _pyroute2_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


# --------------------------------------------------------------------------- links

@dataclass(frozen=True)
class LinkInfo:
    """One interface as seen in its namespace."""

    name: str
    index: int
    kind: str
    up: bool
    operstate: str
    mtu: int
    txqueuelen: int
    master: str | None
    mac: str | None


def _link_info(msg: Any, names: dict[int, str]) -> LinkInfo:
    linkinfo = msg.get("IFLA_LINKINFO")
    kind = (linkinfo.get("IFLA_INFO_KIND") if linkinfo else None) or ""
    master = msg.get("IFLA_MASTER")
    return LinkInfo(
        name=msg.get("IFLA_IFNAME"), index=msg["index"], kind=kind,
        up=bool(msg["flags"] & IFF_UP), operstate=msg.get("IFLA_OPERSTATE") or "",
        mtu=msg.get("IFLA_MTU") or 0, txqueuelen=msg.get("IFLA_TXQLEN") or 0,
        master=names.get(master) if master else None, mac=msg.get("IFLA_ADDRESS"))


@_off_loop
def links(netns: str | None = None) -> list[LinkInfo]:
    """All interfaces of ``netns``, by index."""
    with _ipr(netns) as ipr:
        msgs = list(ipr.link("dump"))
    names = {m["index"]: m.get("IFLA_IFNAME") for m in msgs}
    return sorted((_link_info(m, names) for m in msgs), key=lambda li: li.index)


@_off_loop
def link_index(ifname: str, *, netns: str | None = None) -> int | None:
    """The index of interface ``ifname`` in ``netns``, or None."""
    with _ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _this_thread_netns() -> str:
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


@_off_loop
def veth_add(name: str, peer: str, *, netns: str | None = None, peer_netns: str | None = None,
             mtu: int | None = None, up: bool = True, changes: NetChanges | None = None
             ) -> bool:
    """Create a veth pair: ``name`` in ``netns``, ``peer`` in ``peer_netns``.

    False if ``name`` already exists in ``netns`` (then nothing is changed). With ``up`` both
    ends are brought up; ``mtu`` is set on both. Undo deletes the pair (only if created here).
    """
    with _ipr(netns) as ipr:
        if ipr.link_lookup(ifname=name):
            return False
        if peer_netns == netns:
            peer_spec: dict[str, Any] = {"ifname": peer}
        else:
            target = peer_netns if peer_netns is not None else _this_thread_netns()
            if peer_netns is not None and not netns_exists(peer_netns):
                raise FileNotFoundError(errno.ENOENT,
                                        f"network namespace {peer_netns!r} does not exist")
            peer_spec = {"ifname": peer, "net_ns_fd": netns_path(target)}
        ipr.link("add", ifname=name, kind="veth", peer=peer_spec)
        _poll(lambda: ipr.link_lookup(ifname=name), f"veth {name}{_where(netns)}")
    if changes is not None:
        changes.record(f"veth {name}{_where(netns)} <-> {peer}{_where(peer_netns)}",
                       lambda: link_del(name, netns=netns))
    _poll(lambda: link_index(peer, netns=peer_netns), f"veth peer {peer}{_where(peer_netns)}")
    if mtu is not None or up:
        state = "up" if up else None
        link_set(name, netns=netns, mtu=mtu, state=state)
        link_set(peer, netns=peer_netns, mtu=mtu, state=state)
    return True


@_off_loop
def bridge_add(name: str, *, netns: str | None = None, up: bool = True,
               changes: NetChanges | None = None) -> bool:
    """Create a bridge (STP off, so ports forward at once). False if ``name`` existed."""
    with _ipr(netns) as ipr:
        if ipr.link_lookup(ifname=name):
            return False
        ipr.link("add", ifname=name, kind="bridge", br_stp_state=0)
        _poll(lambda: ipr.link_lookup(ifname=name), f"bridge {name}{_where(netns)}")
    if changes is not None:
        changes.record(f"bridge {name}{_where(netns)}", lambda: link_del(name, netns=netns))
    if up:
        link_set(name, netns=netns, state="up")
    return True


@_off_loop
def link_set(ifname: str, *, netns: str | None = None, state: str | None = None,
             mtu: int | None = None, txqueuelen: int | None = None, master: str | None = None,
             changes: NetChanges | None = None) -> dict[str, Any]:
    """Set attributes of an interface; returns the old values of those that changed.

    ``state`` is "up" or "down"; ``master`` is a bridge name in the same namespace, or "" to
    detach. Attributes left None are not touched. Undo sets the old values back.
    """
    if state not in (None, "up", "down"):
        raise ValueError(f"state must be 'up' or 'down', not {state!r}")
    with _ipr(netns) as ipr:
        idx = _index(ipr, ifname, netns)
        names = {m["index"]: m.get("IFLA_IFNAME") for m in ipr.link("dump")}
        cur = _link_info(ipr.link("get", index=idx)[0], names)
        want: dict[str, Any] = {}
        old: dict[str, Any] = {}
        if state is not None and cur.up != (state == "up"):
            want["state"], old["state"] = state, "up" if cur.up else "down"
        if mtu is not None and cur.mtu != mtu:
            want["mtu"], old["mtu"] = mtu, cur.mtu
        if txqueuelen is not None and cur.txqueuelen != txqueuelen:
            want["txqlen"], old["txqueuelen"] = txqueuelen, cur.txqueuelen
        if master is not None and (cur.master or "") != master:
            want["master"] = _index(ipr, master, netns) if master else 0
            old["master"] = cur.master or ""
        if not want:
            return {}
        ipr.link("set", index=idx, **want)

        def visible() -> bool:
            now = _link_info(ipr.link("get", index=idx)[0], names)
            return ((state is None or now.up == (state == "up"))
                    and (mtu is None or now.mtu == mtu)
                    and (txqueuelen is None or now.txqueuelen == txqueuelen)
                    and (master is None or (now.master or "") == master))

        _poll(visible, f"link {ifname}{_where(netns)} {want}")
    if changes is not None:
        changes.record(f"link {ifname}{_where(netns)} {want} (was {old})",
                       lambda: link_set(ifname, netns=netns, **old))
    return old


@_off_loop
def link_del(ifname: str, *, netns: str | None = None) -> bool:
    """Delete an interface (a veth takes its peer with it). False if it was not there."""
    return _ensure_absent(netns, f"link {ifname}",
                          find=lambda ipr: _index_or_none(ipr, ifname),
                          present=lambda ipr, idx: bool(ipr.link_lookup(ifname=ifname)),
                          delete=lambda ipr, idx: ipr.link("del", index=idx))


@dataclass(frozen=True)
class TunInfo:
    """What the kernel says about a TUN/TAP device (IFLA_INFO_DATA of kind "tun")."""

    index: int
    tap: bool               # IFLA_TUN_TYPE: a TAP (Ethernet frames), not a TUN
    pi: bool                # packet information header (IFF_NO_PI unset)
    vnet_hdr: bool
    multi_queue: bool
    persist: bool
    queues: int             # queues some process has attached now


@_off_loop
def tun_info(ifname: str, *, netns: str | None = None) -> TunInfo | None | bool:
    """The TUN/TAP details of interface ``ifname``: None if there is no such interface, False
    if it is not a TUN/TAP device (or the kernel reports no details for it)."""
    with _ipr(netns) as ipr:
        idx = _index_or_none(ipr, ifname)
        if idx is None:
            return None
        msg = ipr.link("get", index=idx)[0]
    info = msg.get("IFLA_LINKINFO")
    if not info or info.get("IFLA_INFO_KIND") != "tun":
        return False
    data = info.get("IFLA_INFO_DATA")
    if not data:
        return False

    def attr(name: str) -> int:
        return int(data.get(name) or 0)

    return TunInfo(index=idx, tap=attr("IFLA_TUN_TYPE") == 2, pi=bool(attr("IFLA_TUN_PI")),
                   vnet_hdr=bool(attr("IFLA_TUN_VNET_HDR")),
                   multi_queue=bool(attr("IFLA_TUN_MULTI_QUEUE")),
                   persist=bool(attr("IFLA_TUN_PERSIST")), queues=attr("IFLA_TUN_NUM_QUEUES"))


# --------------------------------------------------------------------------- addresses

def _iface(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    return ipaddress.ip_interface(address)


@_off_loop
def addresses(netns: str | None = None, ifname: str | None = None) -> list[tuple[str, str]]:
    """(interface, "address/prefixlen") of every address in ``netns`` (or on ``ifname``)."""
    with _ipr(netns) as ipr:
        names = {m["index"]: m.get("IFLA_IFNAME") for m in ipr.link("dump")}
        out = []
        for m in ipr.addr("dump"):
            name = names.get(m["index"], str(m["index"]))
            if ifname is None or name == ifname:
                out.append((name, f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}"))
    return out


def _addr_present(ipr: IPRoute, idx: int, ip: ipaddress._BaseAddress, plen: int) -> bool:
    for m in ipr.addr("dump", index=idx):
        if (m["prefixlen"] == plen and m.get("IFA_ADDRESS")
                and ipaddress.ip_address(m.get("IFA_ADDRESS")) == ip):
            return True
    return False


@_off_loop
def addr_add(ifname: str, address: str, *, netns: str | None = None, host_scope: bool = False,
             changes: NetChanges | None = None) -> bool:
    """Add "ip/prefixlen" (no prefix: a host address) to ``ifname``. False if it was there.

    IPv6 addresses skip duplicate address detection (IFA_F_NODAD): the addresses lbcore sets
    are unique by construction, and DAD would keep them unusable for a second or two.
    ``host_scope``: scope host, so the kernel never picks it as a packet's source address.
    Undo deletes the address (also one that was already there, see the module docstring).
    """
    iface = _iface(address)
    ip, plen = iface.ip, iface.network.prefixlen
    kw: dict[str, Any] = {"flags": IFA_F_NODAD} if ip.version == 6 else {}
    if host_scope:
        kw["scope"] = RT_SCOPE_HOST
    added = _ensure_present(
        netns, f"address {address} on {ifname}", find=lambda ipr: _index(ipr, ifname, netns),
        present=lambda ipr, idx: _addr_present(ipr, idx, ip, plen),
        add=lambda ipr, idx: ipr.addr("add", index=idx, address=str(ip), prefixlen=plen, **kw))
    if changes is not None:
        changes.record(f"address {ip}/{plen} on {ifname}{_where(netns)}",
                       lambda: addr_del(ifname, f"{ip}/{plen}", netns=netns))
    return added


@_off_loop
def addr_del(ifname: str, address: str, *, netns: str | None = None) -> bool:
    """Delete "ip/prefixlen" from ``ifname``. False if it (or the interface) was not there."""
    iface = _iface(address)
    ip, plen = iface.ip, iface.network.prefixlen
    return _ensure_absent(
        netns, f"address {address} on {ifname}", find=lambda ipr: _index_or_none(ipr, ifname),
        present=lambda ipr, idx: _addr_present(ipr, idx, ip, plen),
        delete=lambda ipr, idx: ipr.addr("del", index=idx, address=str(ip), prefixlen=plen))


# --------------------------------------------------------------------------- routes

@dataclass(frozen=True)
class RouteInfo:
    """One route: ``dst`` is "a.b.c.d/len" or "default"."""

    family: int
    dst: str
    gateway: str | None
    oif: str | None
    table: int
    type: int
    proto: int = 0          # who installed it (RTPROT_*; lbcore tags its own)
    priority: int = 0       # the metric (0 when the kernel reports none)

    @property
    def prefix(self) -> str:
        """``dst`` as a prefix, "default" spelt out as 0.0.0.0/0 or ::/0."""
        if self.dst != "default":
            return self.dst
        return "::/0" if self.family == socket.AF_INET6 else "0.0.0.0/0"


def _dst(dst: str, gateway: str | None, family: int | None
         ) -> tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]:
    if dst == "default":
        if gateway is not None:
            dst = "::/0" if ipaddress.ip_address(gateway).version == 6 else "0.0.0.0/0"
        elif family is not None:
            dst = "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"
        else:
            raise ValueError("dst 'default' needs a gateway or a family (or say 0.0.0.0/0, ::/0)")
    net = ipaddress.ip_network(dst, strict=False)
    return (socket.AF_INET6 if net.version == 6 else socket.AF_INET), net


def _route_spec(ipr: IPRoute, dst: str, gateway: str | None, oif: str | None, table: int | None,
                family: int | None, netns: str | None) -> dict[str, Any]:
    fam, net = _dst(dst, gateway, family)
    spec: dict[str, Any] = {"family": fam, "dst_len": net.prefixlen,
                            "table": table if table is not None else MAIN_TABLE}
    if net.prefixlen:
        spec["dst"] = str(net.network_address)
    if gateway is not None:
        spec["gateway"] = gateway
    if oif is not None:
        spec["oif"] = _index(ipr, oif, netns)
    return spec


# route attributes that tell apart routes to one dst in one table (a blackhole beside a route
# with a better metric); given to route_add/route_del, they take part in the match
_ROUTE_KEYS = ("priority", "proto", "type")
_RTN = {"unicast": 1, "local": 2, "blackhole": 6, "unreachable": 7, "prohibit": 8}


def _route_keys(spec: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """spec plus the distinguishing attributes of extra (type by its number)."""
    out = dict(spec)
    for k in _ROUTE_KEYS:
        if k in extra:
            out[k] = _RTN.get(extra[k], extra[k]) if k == "type" else extra[k]
    return out


def _route_present(ipr: IPRoute, spec: dict[str, Any]) -> bool:
    for m in ipr.route("dump", family=spec["family"], table=spec["table"]):
        if (m["dst_len"] == spec["dst_len"]
                and (m.get("RTA_DST") or None) == spec.get("dst")
                and m.get("RTA_TABLE", m["table"]) == spec["table"]
                and ("gateway" not in spec or _same_ip(m.get("RTA_GATEWAY"), spec["gateway"]))
                and ("oif" not in spec or m.get("RTA_OIF") == spec["oif"])
                and ("priority" not in spec or (m.get("RTA_PRIORITY") or 0) == spec["priority"])
                and ("proto" not in spec or m["proto"] == spec["proto"])
                and ("type" not in spec or m["type"] == spec["type"])):
            return True
    return False


def _same_ip(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


@_off_loop
def routes(netns: str | None = None, *, family: int | None = None, table: int | None = MAIN_TABLE
           ) -> list[RouteInfo]:
    """Routes of ``netns`` (``table=None``: every table, local ones included)."""
    with _ipr(netns) as ipr:
        names = {m["index"]: m.get("IFLA_IFNAME") for m in ipr.link("dump")}
        kw: dict[str, Any] = {}
        if family is not None:
            kw["family"] = family
        if table is not None:
            kw["table"] = table
        out = []
        for m in ipr.route("dump", **kw):
            dst = m.get("RTA_DST")
            out.append(RouteInfo(
                family=m["family"], dst=f"{dst}/{m['dst_len']}" if dst else "default",
                gateway=m.get("RTA_GATEWAY"), oif=names.get(m.get("RTA_OIF")),
                table=m.get("RTA_TABLE", m["table"]), type=m["type"], proto=m["proto"],
                priority=m.get("RTA_PRIORITY") or 0))
    return out


@_off_loop
def route_nexthops(dst: str, *, netns: str | None = None, table: int = MAIN_TABLE) -> list[str]:
    """The gateways of the route to exactly ``dst`` ("a.b.c.d/len"): one for a plain route,
    each next hop of a multipath (ECMP) route, none when there is no such route."""
    fam, net = _dst(dst, None, None)
    out: list[str] = []
    with _ipr(netns) as ipr:
        for m in ipr.route("dump", family=fam, table=table):
            if (m["dst_len"] != net.prefixlen
                    or (m.get("RTA_DST") or None) != (str(net.network_address)
                                                      if net.prefixlen else None)):
                continue
            if m.get("RTA_GATEWAY"):
                out.append(m.get("RTA_GATEWAY"))
            for nh in m.get("RTA_MULTIPATH") or []:
                gw = nh.get_attr("RTA_GATEWAY")
                if gw:
                    out.append(gw)
    return out


@_off_loop
def route_add(dst: str, *, gateway: str | None = None, oif: str | None = None,
              table: int | None = None, family: int | None = None, netns: str | None = None,
              changes: NetChanges | None = None, **extra: Any) -> None:
    """Add or replace the route to ``dst`` ("a.b.c.d/len", "::/0", or "default" + gateway).

    ``oif`` is an interface name, ``table`` a routing table id (default main). ``extra`` goes to
    pyroute2 as is (e.g. ``priority`` for the metric, ``scope``, ``proto``). Replace semantics:
    a route to the same dst in the same table is overwritten. Undo deletes the route.
    """
    keys = {k: v for k, v in extra.items() if k not in _ROUTE_KEYS}
    _ensure_present(netns, f"route {dst}",
                    find=lambda ipr: _route_keys(
                        _route_spec(ipr, dst, gateway, oif, table, family, netns), extra),
                    present=_route_present,
                    add=lambda ipr, spec: ipr.route("replace", **spec, **keys), replace=True)
    fam, _ = _dst(dst, gateway, family)
    if changes is not None:
        changes.record(
            f"route {dst} via {gateway or '-'} dev {oif or '-'} "
            f"table {table if table is not None else MAIN_TABLE}{_where(netns)}",
            lambda: route_del(dst, gateway=gateway, oif=oif, table=table, family=fam,
                              netns=netns, **{k: extra[k] for k in _ROUTE_KEYS if k in extra}))


@_off_loop
def route_del(dst: str, *, gateway: str | None = None, oif: str | None = None,
              table: int | None = None, family: int | None = None, netns: str | None = None,
              **extra: Any) -> bool:
    """Delete the route to ``dst`` (same arguments as route_add; ``priority``, ``proto`` and
    ``type`` in ``extra`` pick one of several routes to dst). False if it was not there."""
    def find(ipr: IPRoute) -> dict[str, Any] | None:
        try:
            return _route_keys(_route_spec(ipr, dst, gateway, oif, table, family, netns), extra)
        except OSError as e:
            if is_gone(e):  # its interface is gone, and the route with it
                return None
            raise

    return _ensure_absent(netns, f"route {dst}", find=find, present=_route_present,
                          delete=lambda ipr, spec: ipr.route("del", **spec))


# --------------------------------------------------------------------------- policy rules

@dataclass(frozen=True)
class RuleInfo:
    """One policy routing rule (only the selectors lbcore uses)."""

    family: int
    priority: int
    table: int
    src: str | None
    dst: str | None
    iif: str | None
    oif: str | None
    ipproto: int | None
    sport: str | None
    dport: str | None
    fwmark: int | None


# The protocol names rule_add accepts. netconf imports nothing else of lbcore, so it keeps its
# own table.
_IPPROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP,
            "icmpv6": socket.IPPROTO_ICMPV6}


def _port_range(p: int | tuple[int, int]) -> str:
    lo, hi = (p, p) if isinstance(p, int) else p
    return f"{lo}:{hi}"


def _rule_spec(priority: int, table: int, src: str | None, dst: str | None, iif: str | None,
               oif: str | None, ipproto: int | str | None, sport: int | tuple[int, int] | None,
               dport: int | tuple[int, int] | None, fwmark: int | None, family: int | None
               ) -> dict[str, Any]:
    spec: dict[str, Any] = {"priority": priority, "table": table, "action": "to_tbl"}
    fams = set()
    for key, value in (("src", src), ("dst", dst)):
        if value is not None:
            net = ipaddress.ip_network(value, strict=False)
            spec[key], spec[f"{key}_len"] = str(net.network_address), net.prefixlen
            fams.add(socket.AF_INET6 if net.version == 6 else socket.AF_INET)
    if family is not None:
        fams.add(family)
    if len(fams) > 1:
        raise ValueError("rule selectors of different address families")
    spec["family"] = fams.pop() if fams else socket.AF_INET
    if iif is not None:
        spec["iifname"] = iif
    if oif is not None:
        spec["oifname"] = oif
    if ipproto is not None:
        spec["ip_proto"] = _IPPROTO[ipproto] if isinstance(ipproto, str) else ipproto
    if sport is not None:
        spec["sport_range"] = _port_range(sport)
    if dport is not None:
        spec["dport_range"] = _port_range(dport)
    if fwmark is not None:
        spec["fwmark"] = fwmark
    return spec


def _rule_info(m: Any) -> RuleInfo:
    src, dst = m.get("FRA_SRC"), m.get("FRA_DST")
    return RuleInfo(
        family=m["family"], priority=m.get("FRA_PRIORITY") or 0,
        table=m.get("FRA_TABLE", m["table"]),
        src=f"{src}/{m['src_len']}" if src else None, dst=f"{dst}/{m['dst_len']}" if dst else None,
        iif=m.get("FRA_IIFNAME"), oif=m.get("FRA_OIFNAME"), ipproto=m.get("FRA_IP_PROTO"),
        sport=m.get("FRA_SPORT_RANGE"), dport=m.get("FRA_DPORT_RANGE"),
        fwmark=m.get("FRA_FWMARK"))


def _rule_matches(r: RuleInfo, spec: dict[str, Any]) -> bool:
    def net(key: str) -> str | None:
        return f"{spec[key]}/{spec[key + '_len']}" if key in spec else None

    return (r.family == spec["family"] and r.priority == spec["priority"]
            and r.table == spec["table"] and _same_net(r.src, net("src"))
            and _same_net(r.dst, net("dst")) and r.iif == spec.get("iifname")
            and r.oif == spec.get("oifname") and (r.ipproto or None) == spec.get("ip_proto")
            and r.sport == spec.get("sport_range") and r.dport == spec.get("dport_range")
            and (r.fwmark or None) == spec.get("fwmark"))


def _same_net(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return ipaddress.ip_network(a, strict=False) == ipaddress.ip_network(b, strict=False)


def _rule_present(ipr: IPRoute, spec: dict[str, Any]) -> bool:
    return any(_rule_matches(_rule_info(m), spec) for m in ipr.rule("dump", family=spec["family"]))


@_off_loop
def rules(netns: str | None = None, *, family: int | None = None) -> list[RuleInfo]:
    """Policy routing rules of ``netns``, by priority."""
    with _ipr(netns) as ipr:
        kw = {"family": family} if family is not None else {}
        return sorted((_rule_info(m) for m in ipr.rule("dump", **kw)),
                      key=lambda r: (r.family, r.priority))


@_off_loop
def rule_add(*, priority: int, table: int, src: str | None = None, dst: str | None = None,
             iif: str | None = None, oif: str | None = None, ipproto: int | str | None = None,
             sport: int | tuple[int, int] | None = None,
             dport: int | tuple[int, int] | None = None, fwmark: int | None = None,
             family: int | None = None, netns: str | None = None,
             changes: NetChanges | None = None) -> bool:
    """Add a rule "selectors -> lookup ``table``" at ``priority``. False if it was there.

    Selectors: ``src``/``dst`` prefixes, ``iif``/``oif`` interface names, ``ipproto`` ("tcp",
    "udp" or a number), ``sport``/``dport`` a port or an inclusive (lo, hi) range, ``fwmark``.
    The family comes from src/dst, else ``family``, else IPv4. Undo deletes the rule.
    """
    spec = _rule_spec(priority, table, src, dst, iif, oif, ipproto, sport, dport, fwmark, family)
    added = _ensure_present(netns, f"rule {spec}", find=lambda ipr: spec, present=_rule_present,
                            add=lambda ipr, spec: ipr.rule("add", **spec))
    if changes is not None:
        kw = dict(priority=priority, table=table, src=src, dst=dst, iif=iif, oif=oif,
                  ipproto=ipproto, sport=sport, dport=dport, fwmark=fwmark, family=family)
        changes.record(f"rule {spec}{_where(netns)}", lambda: rule_del(netns=netns, **kw))
    return added


@_off_loop
def rule_del(*, priority: int, table: int, src: str | None = None, dst: str | None = None,
             iif: str | None = None, oif: str | None = None, ipproto: int | str | None = None,
             sport: int | tuple[int, int] | None = None,
             dport: int | tuple[int, int] | None = None, fwmark: int | None = None,
             family: int | None = None, netns: str | None = None) -> bool:
    """Delete the rule rule_add made with the same arguments. False if it was not there."""
    spec = _rule_spec(priority, table, src, dst, iif, oif, ipproto, sport, dport, fwmark, family)
    return _ensure_absent(netns, f"rule {spec}", find=lambda ipr: spec, present=_rule_present,
                          delete=lambda ipr, spec: ipr.rule("del", **spec))


# --------------------------------------------------------------------------- neighbours

def _neigh_present(ipr: IPRoute, idx: int, dst: str, lladdr: str | None) -> bool:
    for m in ipr.neigh("dump", ifindex=idx):
        if m.get("NDA_DST") and _same_ip(m.get("NDA_DST"), dst):
            return lladdr is None or (m.get("NDA_LLADDR") or "").lower() == lladdr.lower()
    return False


@_off_loop
def neighbours(netns: str | None = None, ifname: str | None = None
               ) -> list[tuple[str, str, str | None, int]]:
    """(interface, ip, lladdr, NUD state) of the neighbour entries of ``netns``."""
    with _ipr(netns) as ipr:
        names = {m["index"]: m.get("IFLA_IFNAME") for m in ipr.link("dump")}
        out = []
        for m in ipr.neigh("dump"):
            name = names.get(m["ifindex"], str(m["ifindex"]))
            if m.get("NDA_DST") and (ifname is None or name == ifname):
                out.append((name, m.get("NDA_DST"), m.get("NDA_LLADDR"), m["state"]))
    return out


@_off_loop
def neigh_add(ifname: str, dst: str, lladdr: str, *, netns: str | None = None,
              changes: NetChanges | None = None) -> None:
    """Add or replace a permanent neighbour entry ``dst`` -> ``lladdr`` on ``ifname``."""
    fam = _ip_family(dst)
    _ensure_present(netns, f"neighbour {dst} on {ifname}",
                    find=lambda ipr: _index(ipr, ifname, netns),
                    present=lambda ipr, idx: _neigh_present(ipr, idx, dst, lladdr),
                    add=lambda ipr, idx: ipr.neigh("replace", ifindex=idx, dst=dst, lladdr=lladdr,
                                                   state=NUD_PERMANENT, family=fam),
                    replace=True)
    if changes is not None:
        changes.record(f"neighbour {dst} lladdr {lladdr} on {ifname}{_where(netns)}",
                       lambda: neigh_del(ifname, dst, netns=netns))


@_off_loop
def neigh_del(ifname: str, dst: str, *, netns: str | None = None) -> bool:
    """Delete the neighbour entry for ``dst`` on ``ifname``. False if it was not there."""
    fam = _ip_family(dst)
    return _ensure_absent(netns, f"neighbour {dst} on {ifname}",
                          find=lambda ipr: _index_or_none(ipr, ifname),
                          present=lambda ipr, idx: _neigh_present(ipr, idx, dst, None),
                          delete=lambda ipr, idx: ipr.neigh("del", ifindex=idx, dst=dst,
                                                            family=fam))


@_off_loop
def neigh_resolve(ifname: str, dst: str, *, netns: str | None = None) -> None:
    """Make the kernel resolve ``dst`` on ``ifname`` now, as a packet queued to it would (an
    entry flagged NTF_USE: ARP/NS for a new or failed entry, a probe for a stale one). Returns
    at once; the answer shows up in :func:`neighbours`. Nothing to undo: the entry is the
    kernel's own, and ages out like any other."""
    with _ipr(netns) as ipr:
        idx = _index(ipr, ifname, netns)
        ipr.neigh("replace", ifindex=idx, dst=dst, flags=NTF_USE, state=0, family=_ip_family(dst))


@_off_loop
def neigh_proxy_add(ifname: str, dst: str, *, netns: str | None = None,
                    changes: NetChanges | None = None) -> None:
    """Add a proxy neighbour entry: the kernel answers NDP (and ARP, where proxying applies) for
    ``dst`` on ``ifname``. Undo deletes it. Not polled: proxy entries are not in a neighbour
    dump."""
    fam = _ip_family(dst)
    _ensure_present(netns, f"proxy neighbour {dst} on {ifname}",
                    find=lambda ipr: _index(ipr, ifname, netns), present=None,
                    add=lambda ipr, idx: ipr.neigh("replace", ifindex=idx, dst=dst,
                                                   flags=NTF_PROXY, family=fam),
                    replace=True)
    if changes is not None:
        changes.record(f"proxy neighbour {dst} on {ifname}{_where(netns)}",
                       lambda: neigh_proxy_del(ifname, dst, netns=netns))


@_off_loop
def neigh_proxy_del(ifname: str, dst: str, *, netns: str | None = None) -> bool:
    """Delete the proxy neighbour entry for ``dst`` on ``ifname``. False if it was not there
    (known only from the kernel's answer: proxy entries are not in a neighbour dump)."""
    fam = _ip_family(dst)
    return _ensure_absent(netns, f"proxy neighbour {dst} on {ifname}",
                          find=lambda ipr: _index_or_none(ipr, ifname), present=None,
                          delete=lambda ipr, idx: ipr.neigh("del", ifindex=idx, dst=dst,
                                                            flags=NTF_PROXY, family=fam))


# rtnetlink multicast groups (linux/rtnetlink.h RTMGRP_*)
_RTMGRP_CHANGES = (0x1 | 0x4 | 0x10 | 0x40 | 0x100 | 0x400)   # link neigh ifaddr route4/6


def change_notifier(netns: str | None = None) -> socket.socket:
    """A non-blocking rtnetlink socket of ``netns`` subscribed to link, address, route and
    neighbour changes: it becomes readable when one happens. Its messages are not meant to be
    parsed (read and discard them, see :func:`drain_notifier`): the caller re-reads the state
    it needs with the functions above, so a lost event (the socket overflowed) costs nothing
    but the wait until the next change or the caller's own periodic re-read."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                          socket.NETLINK_ROUTE)
        s.bind((0, _RTMGRP_CHANGES))
        s.setblocking(False)
        return s
    return run_in_netns(netns, make)


def drain_notifier(s: socket.socket) -> int:
    """Read and discard whatever the notifier holds; returns how many datagrams."""
    n = 0
    while True:
        try:
            s.recv(65536)
        except BlockingIOError:
            return n
        except OSError as e:   # ENOBUFS: events were lost; the caller re-reads anyway
            if e.errno != errno.ENOBUFS:
                raise
        n += 1


# --------------------------------------------------------------------------- tc ingress

TC_INGRESS_PARENTS = {"clsact": 0xFFFFFFF2, "ingress": 0xFFFF0000}   # filters' parent, by qdisc
TC_H_INGRESS = 0xFFFFFFF1   # where an ingress or clsact qdisc hangs
ETH_P_ALL = 0x0003
TCA_BPF_FLAG_ACT_DIRECT = 1
RTM_NEWTFILTER, RTM_DELTFILTER = 44, 45


class _ClassicBpfFilter(nlmsg):
    """A tc filter message of kind "bpf" with a classic-BPF program (TCA_BPF_OPS). pyroute2's
    own "bpf" filter knows only eBPF programs by file descriptor; a class of its own, not a
    subclass of pyroute2's tcmsg, keeps pyroute2's compiled attribute maps out of it."""

    prefix = "TCA_"
    fields = (("family", "B"), ("pad1", "B"), ("pad2", "H"), ("index", "i"), ("handle", "I"),
              ("parent", "I"), ("info", "I"))
    nla_map = (("TCA_UNSPEC", "none"), ("TCA_KIND", "asciiz"), ("TCA_OPTIONS", "options"))

    class options(nla):
        nla_map = (("TCA_BPF_UNSPEC", "none"), ("TCA_BPF_ACT", "none"),
                   ("TCA_BPF_POLICE", "none"), ("TCA_BPF_CLASSID", "uint32"),
                   ("TCA_BPF_OPS_LEN", "uint16"), ("TCA_BPF_OPS", "cdata"),
                   ("TCA_BPF_FD", "uint32"), ("TCA_BPF_NAME", "asciiz"),
                   ("TCA_BPF_FLAGS", "uint32"))


def _tc_request(netns: str | None, msg: nlmsg, msg_type: int, flags: int) -> None:
    """Send one tc message and wait for the kernel's answer (a NetlinkError if it refuses).
    Through pyroute2's asyncio core: its blocking wrapper of a raw request is broken in
    pyroute2 0.9 (KeyError 'nlm_generator')."""
    async def send() -> None:
        kw: dict[str, Any] = {"netns": netns, "flags": 0} if netns is not None else {}
        async with AsyncIPRoute(**kw) as ipr:
            async for _ in await ipr.nlm_request(msg, msg_type=msg_type, msg_flags=flags):
                pass

    asyncio.run(send())


def _ingress_qdisc(ipr: IPRoute, idx: int | None) -> Any:
    """The device's ingress-side qdisc ("clsact", "ingress": its TCA_KIND), or None."""
    if idx is None:
        return None
    for q in ipr.get_qdiscs(index=idx):
        if q["parent"] == TC_H_INGRESS:
            return q
    return None


def _ingress_kind(ipr: IPRoute, idx: int | None) -> str | None:
    q = _ingress_qdisc(ipr, idx)
    return q.get_attr("TCA_KIND") if q is not None else None


@_off_loop
def ingress_bpf_set(ifname: str, prog: Sequence[tuple[int, int, int, int]], *, pref: int,
                    name: str, netns: str | None = None,
                    changes: NetChanges | None = None) -> None:
    """Run the classic-BPF program ``prog`` ((code, jt, jf, k) instructions) on every frame
    ``ifname`` receives, as a direct-action tc filter at priority ``pref`` of its ingress
    qdisc: the program's return value is the verdict (TC_ACT_SHOT = 2 drops the frame,
    TC_ACT_UNSPEC = 0xFFFFFFFF goes on to the next filter and the stack). The kernel runs it
    after the packet sockets (taps) got their copy and before IP. A filter already at ``pref``
    is replaced in one step; a clsact qdisc is added if the device has no ingress qdisc. Undo
    deletes the filter and the qdisc if it was added here."""
    ops = b"".join(struct.pack("=HBBI", c, jt, jf, k) for c, jt, jf, k in prog)
    with _ipr(netns) as ipr:
        idx = _index(ipr, ifname, netns)
        kind = _ingress_kind(ipr, idx)
        if kind is None:
            ipr.tc("add", "clsact", idx)
            if changes is not None:
                changes.record(f"clsact qdisc on {ifname}{_where(netns)}",
                               lambda: ingress_qdisc_del(ifname, netns=netns))
            kind = "clsact"
    if kind not in TC_INGRESS_PARENTS:
        raise OSError(errno.EOPNOTSUPP, f"{ifname}: ingress qdisc {kind!r} takes no filters")
    msg = _ClassicBpfFilter()
    msg["index"] = idx
    msg["handle"] = 1
    msg["parent"] = TC_INGRESS_PARENTS[kind]
    msg["info"] = (pref << 16) | socket.htons(ETH_P_ALL)
    msg["attrs"] = [("TCA_KIND", "bpf"), ("TCA_OPTIONS", {"attrs": [
        ("TCA_BPF_OPS_LEN", len(prog)), ("TCA_BPF_OPS", ops), ("TCA_BPF_NAME", name),
        ("TCA_BPF_FLAGS", TCA_BPF_FLAG_ACT_DIRECT)]})]
    _tc_request(netns, msg, RTM_NEWTFILTER,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)
    if changes is not None:
        changes.record(f"tc ingress filter {name} (pref {pref}) on {ifname}{_where(netns)}",
                       lambda: ingress_bpf_del(ifname, pref=pref, netns=netns))


@_off_loop
def ingress_bpf_del(ifname: str, *, pref: int, netns: str | None = None) -> bool:
    """Delete the ingress filters at priority ``pref`` of ``ifname``. False if there were
    none (or no ingress qdisc, or no device)."""
    with _ipr(netns) as ipr:
        idx = _index_or_none(ipr, ifname)
        kind = _ingress_kind(ipr, idx)
    if kind not in TC_INGRESS_PARENTS:
        return False
    msg = _ClassicBpfFilter()
    msg["index"] = idx
    msg["parent"] = TC_INGRESS_PARENTS[kind]
    msg["info"] = (pref << 16) | socket.htons(ETH_P_ALL)
    try:
        _tc_request(netns, msg, RTM_DELTFILTER, NLM_F_REQUEST | NLM_F_ACK)
    except NetlinkError as e:
        if is_gone(e):
            return False
        raise
    return True


@_off_loop
def ingress_qdisc_del(ifname: str, *, netns: str | None = None) -> bool:
    """Delete ``ifname``'s clsact qdisc (and so every ingress and egress filter on it). False if
    it had none."""
    with _ipr(netns) as ipr:
        idx = _index_or_none(ipr, ifname)
        if _ingress_kind(ipr, idx) != "clsact":
            return False
        ipr.tc("del", "clsact", idx)
    return True


@_off_loop
def ingress_drops(ifname: str, *, netns: str | None = None) -> int | None:
    """Frames the ingress filters of ``ifname`` dropped so far (the drop counter of its
    ingress/clsact qdisc), or None without such a qdisc."""
    with _ipr(netns) as ipr:
        q = _ingress_qdisc(ipr, _index_or_none(ipr, ifname))
    if q is None:
        return None
    st = q.get_attr("TCA_STATS2")
    qs = st.get_attr("TCA_STATS_QUEUE") if st is not None else None
    if qs is not None:
        return int(qs["drops"])
    old = q.get_attr("TCA_STATS")
    return int(old["drop"]) if old is not None else 0


# --------------------------------------------------------------------------- sysctls

def sysctl_path(key: str) -> str:
    """The /proc/sys file of a key: "net.ipv4.ip_forward", or with slashes
    "net/ipv4/conf/eth0.100/rp_filter" (use slashes when an interface name has a dot)."""
    rel = key[len("/proc/sys/"):] if key.startswith("/proc/sys/") else key
    if "/" not in rel:
        rel = rel.replace(".", "/")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad sysctl key {key!r}")
    return "/proc/sys/" + rel


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def sysctl_get(key: str, *, netns: str | None = None) -> str:
    """Read a sysctl as the namespace ``netns`` sees it (/proc/sys/net is per namespace)."""
    path = sysctl_path(key)
    if netns is None:
        return _read(path)
    return run_in_netns(netns, _read, path)


def sysctl_set(key: str, value: str | int, *, netns: str | None = None,
               changes: NetChanges | None = None) -> str:
    """Write a sysctl in ``netns``; returns the old value. Undo writes the old value back.

    The write happens in a thread that has entered ``netns``; nothing is written (or recorded)
    when the value is already the wanted one.
    """
    path, new = sysctl_path(key), str(value)

    def swap() -> str:
        old = _read(path)
        if old.split() != new.split():   # "1024 65535" reads back as "1024\t65535"
            _write(path, new)
        return old

    old = swap() if netns is None else run_in_netns(netns, swap)
    if old.split() != new.split() and changes is not None:
        changes.record(f"sysctl {key}={new} (was {old}){_where(netns)}",
                       lambda: sysctl_set(key, old, netns=netns))
    return old
