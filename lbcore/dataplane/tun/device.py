"""The TUN device of tun mode: one queue (fd) per worker.

Opened with ioctl on /dev/net/tun (TUN creation is not a netlink operation);
everything else about the link (up, txqueuelen, routes) goes through pyroute2
in lbcore.dataplane.tun.routes. Nothing here imports pyroute2: a restart that
adopts its device attaches the queues and starts the workers before the
netlink library is even loaded.

Persistence (:func:`attach_tun`): the data plane's device is made persistent
(TUNSETPERSIST), so it outlives the process that made it - a clean stop, a
crash or a SIGKILL - together with its routes and the reply path's routes
through it. The next `lbcore run` with the same tun_name attaches its queues to
that device (same ifindex, routes in place) instead of creating one, which takes
the device and route set-up out of a restart's gap. A changed worker count is
fine: the dead process's queues went with its fds; the new one attaches as many
as it has workers. `lbcore cleanup` and `run --cleanup-on-exit` delete it.

While no queue is attached (between two runs) the kernel keeps the device but
turns its carrier off (the last queue's detach does so): routes through it are
marked "linkdown" yet still chosen (ignore_routes_with_linkdown is off by
default), and a packet routed into it is dropped - the carrier-less device's
queueing discipline is deactivated (noop) and tun's own transmit drops what
reaches it with no queue, counted as the device's tx_dropped. Nothing is
answered (no ICMP) and nothing leaves un-translated: the same as the blackhole
routes behind the TUN's routes (lbcore.dataplane.replies).

An existing device of that name is attached to only if it is a TUN with
exactly our flags (IFF_TUN, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_VNET_HDR) and has
no queue attached (asked over netlink: sysfs would show the wrong namespace when
the process entered one by setns() alone): anything else - a veth, a TAP, a TUN of another
program, or one whose queues another running process holds - is refused, naming
the device, because attaching would share or take over someone else's traffic.

The BGP anchor (lbcore.bgp.anchor) uses :func:`open_tun`, never persistent: its
deletion when its process dies is what withdraws the announcement.

Offloads: IFF_VNET_HDR + TUNSETOFFLOAD (checksum, TSO4/6, USO4/6) let TCP
cross as 64 KiB super-packets in one read/write instead of one per MSS (the
per-packet cost, not the bytes, bounds a user-space forwarder); the C rewrite
handles their virtio_net_hdr and partial checksums.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

log = logging.getLogger("lbcore.tun")

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

IFNAMSIZ = 16
# the flags a data-plane TUN is opened with
PLANE_FLAGS = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR


class TunError(OSError):
    """The TUN device could not be created or configured."""


@dataclass
class TunQueues:
    """The queues of an opened data-plane TUN."""
    fds: list[int]
    offload: int        # TUN_F_* flags the kernel accepted
    adopted: bool       # attached to a device a previous run left, not created
    ifindex: int


def _check_name(name: str) -> None:
    if not 0 < len(name.encode()) < IFNAMSIZ or "/" in name or name in (".", ".."):
        raise ValueError(f"TUN name {name!r} must be 1..15 bytes, no '/'")


def ifindex(name: str) -> int:
    """The index of device `name` in this thread's network namespace, 0 if absent. (Not
    /sys/class/net: sysfs shows the namespace it was mounted in, and `lbcore run` is often
    started in a namespace by setns() alone.)"""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def check_adoptable(name: str) -> str | None:
    """Why the existing device `name` must not be attached to, or None if it may be."""
    from ... import netconf  # pyroute2: only when there is a device to look at
    info = netconf.tun_info(name)
    if info is None:
        return None
    if info is False:
        return (f"network device {name!r} exists and is not a TUN device; lbcore will not "
                "take it over (pick another global.tun_name, or delete the device)")
    assert not isinstance(info, bool)
    if info.tap or info.pi or not info.vnet_hdr or not info.multi_queue:
        got = ", ".join(f"{k}={getattr(info, k)}" for k in ("tap", "pi", "vnet_hdr",
                                                             "multi_queue"))
        return (f"network device {name!r} is a TUN/TAP device with other flags than lbcore's "
                f"({got}; lbcore's: tun, no_pi, vnet_hdr, multi_queue); lbcore will not "
                "take it over (pick another global.tun_name, or delete the device)")
    if not info.persist or info.queues:
        return (f"TUN device {name!r} is in use by another process ({info.queues} queue(s) "
                "attached; another lbcore running? pick another global.tun_name)")
    return None


# A process that has just died may hold its queues a little longer: its io_uring instance is
# torn down by a kernel worker after the exit, and the reads it had armed keep the queue
# files open until then. A restart right after a crash waits that long, not more; a queue
# that no process holds after it (seen on a loaded machine, the kernel still releasing it)
# is not waited for any longer: the device is deleted and made anew (_stale).
RELEASE_WAIT_S = 3.0


PF_EXITING = 0x4                  # /proc/PID/stat's flags: the process is on its way out


def queue_holders(name: str) -> list[tuple[int, str, bool]]:
    """(pid, command, exiting) of every process with a queue of TUN `name` open (from /proc's
    fdinfo, which names a TUN file's device): who holds the device, and whether it is a
    process still running or one being torn down."""
    found = []
    for pid in (d for d in os.listdir("/proc") if d.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fdinfo"):
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    if f"iff:\t{name}\n" not in f.read():
                        continue
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                flags = int(stat[stat.rindex(")") + 2:].split()[6])
                found.append((int(pid), comm, bool(flags & PF_EXITING)))
                break
        except (OSError, ValueError, IndexError):
            continue                  # gone meanwhile, or not ours to read
    return found


def _stale(name: str) -> bool:
    """The device's queues are held by no process: a dead run's, still being released by
    the kernel. Deleting the device is safe then (no reader is cut off)."""
    from ... import netconf
    info = netconf.tun_info(name)
    return (not isinstance(info, bool) and info is not None and info.persist
            and bool(info.queues) and not queue_holders(name))


_STALE = "stale"


def _settled(name: str) -> str | None:
    """None if the existing device `name` may be attached to (after waiting for a dead run's
    queues, see RELEASE_WAIT_S), _STALE if its queues are still held by no process, else why
    it must not be."""
    why = _adoptable_after_release(name)
    if why is None:
        return None
    if _stale(name):
        return _STALE
    return check_adoptable(name) and why      # released just now: None


def _delete_stale(name: str) -> None:
    from ... import netconf
    log.warning("TUN %s: its queues are held by no process (a killed run's, not yet released "
                "by the kernel); deleting the device, this start makes it anew", name)
    netconf.link_del(name)


def _adoptable_after_release(name: str, wait_s: float = RELEASE_WAIT_S) -> str | None:
    """check_adoptable, waiting up to `wait_s` for queues still attached to go."""
    from ... import netconf
    deadline = time.monotonic() + wait_s
    why = check_adoptable(name)
    while why is not None and time.monotonic() < deadline:
        info = netconf.tun_info(name)
        if isinstance(info, bool) or info is None or not info.persist or not info.queues:
            break                     # not a matter of queues still going away
        if any(not exiting for _, _, exiting in queue_holders(name)):
            break                     # a running process holds it: no use waiting
        time.sleep(0.02)
        why = check_adoptable(name)
    if why is not None and "in use" in why:
        held = ", ".join(f"pid {p} ({c}{', exiting' if x else ''})"
                         for p, c, x in queue_holders(name))
        why += f"; held by {held or 'no process (the kernel is still releasing it)'}"
    return why


def _ifr(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def _open_queues(name: str, queues: int, flags: int) -> list[int]:
    ifr = _ifr(name, flags)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        close_tun(fds)
        raise
    return fds


def open_tun(name: str, queues: int = 1, vnet_hdr: bool = True) -> tuple[list[int], int]:
    """Create TUN device `name` with `queues` queues; return (fds, offload flags set).

    Not persistent: the device goes with the last fd. Refuses a name that already
    exists: attaching queues to another process's multi-queue TUN would silently
    share its traffic.
    """
    _check_name(name)
    if ifindex(name):
        raise TunError(errno.EEXIST, f"network device {name!r} already exists "
                       "(another lbcore running? pick another global.tun_name)")
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fds = _open_queues(name, queues, flags)
    except OSError as e:
        raise TunError(e.errno, f"creating TUN {name!r}: {e.strerror}") from e
    try:
        offload = _set_offload(fds[0]) if vnet_hdr else 0
    except OSError as e:
        close_tun(fds)
        raise TunError(e.errno, f"TUN {name!r} offloads: {e.strerror}") from e
    return fds, offload


def attach_tun(name: str, queues: int) -> TunQueues:
    """The data plane's persistent TUN `name` with `queues` queues: attached to the device a
    previous run left (checked first, see :func:`check_adoptable`), or created and made
    persistent. On failure nothing is left that this call made."""
    _check_name(name)
    adopted = bool(ifindex(name))
    if adopted:
        why = _settled(name)
        if why == _STALE:
            _delete_stale(name)
            adopted = False
        elif why is not None:
            raise TunError(errno.EEXIST, why)
    try:
        fds = _open_queues(name, queues, PLANE_FLAGS)
    except OSError as e:
        verb = "attaching to" if adopted else "creating"
        raise TunError(e.errno, f"{verb} TUN {name!r}: {e.strerror}") from e
    try:
        offload = _set_offload(fds[0])
        fcntl.ioctl(fds[0], TUNSETPERSIST, 1)
    except OSError as e:
        if not adopted:
            _unpersist(fds)
        close_tun(fds)
        raise TunError(e.errno, f"TUN {name!r}: {e.strerror}") from e
    return TunQueues(fds, offload, adopted, ifindex(name))


def _unpersist(fds: list[int]) -> None:
    """Make the device non-persistent again: it goes when `fds` close."""
    if fds:
        try:
            fcntl.ioctl(fds[0], TUNSETPERSIST, 0)
        except OSError:
            pass


def close_tun(fds: list[int], remove: bool = False) -> None:
    """Close every queue. A non-persistent device goes with the last close; a persistent one
    stays (no carrier: see the module docstring) unless `remove`."""
    if remove:
        _unpersist(fds)
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def remove_persistent(name: str) -> bool:
    """Delete the persistent data-plane TUN `name` when no process holds it (for `lbcore
    cleanup`): attach one queue, clear persistence, close. False if there is no such device;
    TunError if it is not ours or in use (the same checks as attaching)."""
    _check_name(name)
    if not ifindex(name):
        return False
    why = _settled(name)
    if why == _STALE:
        _delete_stale(name)
        return True
    if why is not None:
        raise TunError(errno.EBUSY, why)
    try:
        fds = _open_queues(name, 1, PLANE_FLAGS)
    except OSError as e:
        raise TunError(e.errno, f"removing TUN {name!r}: {e.strerror}") from e
    close_tun(fds, remove=True)
    return True


def _set_offload(fd: int) -> int:
    """Ask for the richest offload set the kernel accepts (USO needs 6.2+)."""
    base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    for flags in (base | TUN_F_USO4 | TUN_F_USO6, base, TUN_F_CSUM):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return 0
