"""The TUN device of tun mode: one queue (fd) per worker.

Opened with ioctl on /dev/net/tun (TUN creation is not a netlink operation);
everything else about the link (up, txqueuelen, routes) goes through pyroute2
in lbcore.dataplane.tun.routes. The device is not persistent: when the last queue fd closes
- on a clean exit or when the process is SIGKILLed - the kernel removes the
device and every route through it, so a crash leaves no TUN behind.

Offloads: IFF_VNET_HDR + TUNSETOFFLOAD (checksum, TSO4/6, USO4/6) let TCP
cross as 64 KiB super-packets in one read/write instead of one per MSS (the
per-packet cost, not the bytes, bounds a user-space forwarder); the C rewrite
handles their virtio_net_hdr and partial checksums.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

IFNAMSIZ = 16


class TunError(OSError):
    """The TUN device could not be created or configured."""


def open_tun(name: str, queues: int = 1, vnet_hdr: bool = True) -> tuple[list[int], int]:
    """Create TUN device `name` with `queues` queues; return (fds, offload flags set).

    Refuses a name that already exists: attaching queues to another
    process's multi-queue TUN would silently share its traffic.
    """
    if not 0 < len(name.encode()) < IFNAMSIZ:
        raise ValueError(f"TUN name {name!r} must be 1..15 bytes")
    if os.path.exists(f"/sys/class/net/{name}"):
        raise TunError(errno.EEXIST, f"network device {name!r} already exists "
                       "(another lbcore running? pick another global.tun_name)")
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if vnet_hdr else 0)
    ifr = struct.pack("16sH22x", name.encode(), flags)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        offload = 0
        if vnet_hdr:
            offload = _set_offload(fds[0])
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise TunError(e.errno, f"creating TUN {name!r}: {e.strerror}") from e
    return fds, offload


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


def close_tun(fds: list[int]) -> None:
    """Close every queue; the last close removes the device."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
