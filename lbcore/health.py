"""Health checks: asyncio checkers and a monitor with rise/fall hysteresis.

Four checkers, each ``async (check, address, port) -> (ok, reason)`` where
`port` is the backend's port (``check.port`` overrides it for the probe):

- ``tcp``:  a TCP connect within the timeout. The socket is then closed with an
  RST (SO_LINGER 0), as HAProxy does, so the gateway does not collect a
  TIME_WAIT socket per check.
- ``http``: HTTP/1.1 ``GET path`` with a Host header and ``Connection: close``;
  up if the status is in ``expect_status`` and, when ``body_match`` is set, the
  body (de-chunked, first 64 KiB) contains it.
- ``udp``:  one datagram on a connected socket; up on a reply (containing
  ``expect``, if set) within the timeout. An ICMP port unreachable shows as
  ConnectionRefusedError: down at once, not at the timeout.
- ``exec``: the command in its own session, environment plus
  LBCORE_BACKEND_ADDRESS, LBCORE_BACKEND_PORT and LBCORE_CHECK_PORT; up on exit
  status 0. At the timeout its whole process group is SIGKILLed and reaped; the
  last line of its output is part of the reason.

Every checker owns its timeout and closes its socket / kills its process on
every path, also when the task running it is cancelled, so nothing leaks and
nothing blocks the loop. Checks run in the caller's network namespace.

`HealthMonitor` runs one task per target. The first check of a target starts
at a random offset in [0, interval) and each next one interval +-10% after the
previous one started, so the checks of many backends spread out instead of
firing together. State follows rise/fall hysteresis on *consecutive* results:
an up target goes down after `fall` failures in a row, a down one comes up
after `rise` successes in a row.

Initial state (per monitor, overridable per target):
- ``"up"`` (default), HAProxy's ``init-state up``: the backend takes traffic at
  once (no blackout when the balancer starts or reloads), but until its first
  check it is only provisionally up: that first check, if it fails, takes it
  down immediately rather than after `fall` failures, so a dead backend costs
  one interval at start, not ``fall`` intervals.
- ``"down"``: no traffic until `rise` consecutive successes (for backends
  that must prove themselves, e.g. added at a reload).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import json
import logging
import os
import random
import re
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .config import Config, HealthCheckConfig, IPAddress, _hostport, _num

log = logging.getLogger("lbcore.health")

CheckResult = tuple[bool, str]
Checker = Callable[[HealthCheckConfig, IPAddress, int], Awaitable[CheckResult]]
OnChange = Callable[[Hashable, bool, str], Any]

JITTER = 0.10            # +-10 % of the interval between two checks of a target
HTTP_HEAD_MAX = 16384    # bytes of status line + headers we accept
HTTP_BODY_MAX = 65536    # bytes of body searched for body_match
EXEC_OUTPUT_KEEP = 512   # bytes of a check command's output kept for the reason
INITIAL_STATES = ("up", "down")


def _sockaddr(address: IPAddress, port: int) -> tuple[socket.AddressFamily, tuple[str, int]]:
    fam = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return fam, (str(address), port)


def _os_reason(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    return (e.strerror or type(e).__name__).lower()


def _oserror_is_failure(checker: Checker) -> Checker:
    """A socket error (refused, unreachable, reset) is a failed check with
    its reason, not an exception: every checker returns (ok, reason)."""
    @functools.wraps(checker)
    async def wrapper(hc: HealthCheckConfig, address: IPAddress, port: int) -> CheckResult:
        try:
            return await checker(hc, address, port)
        except OSError as e:
            return False, _os_reason(e)
    return wrapper


# --- checkers -------------------------------------------------------------------------

@_oserror_is_failure
async def check_tcp(hc: HealthCheckConfig, address: IPAddress, port: int) -> CheckResult:
    """Up if a TCP connection to address:(hc.port or port) opens within hc.timeout."""
    loop = asyncio.get_running_loop()
    fam, sa = _sockaddr(address, hc.port or port)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            async with asyncio.timeout(hc.timeout):
                await loop.sock_connect(sock, sa)
        except TimeoutError:
            return False, f"timeout after {_num(hc.timeout)}s: connect"
        # Close with RST: no TIME_WAIT on the gateway per check.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return True, "tcp connect ok"
    finally:
        sock.close()


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")


def _dechunk(data: bytes) -> bytes:
    """Decode a chunked body (RFC 9112 §7.1) as far as it goes; a truncated
    one gives what it has, so a body_match can still succeed."""
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            break
        try:
            size = int(data[pos:eol].split(b";", 1)[0].strip(), 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[eol + 2: eol + 2 + size]
        pos = eol + 2 + size + 2
    return bytes(out)


@_oserror_is_failure
async def check_http(hc: HealthCheckConfig, address: IPAddress, port: int) -> CheckResult:
    """Up if ``GET hc.path`` answers a status in hc.expect_status (and a body
    containing hc.body_match, if set) within hc.timeout."""
    loop = asyncio.get_running_loop()
    cport = hc.port or port
    fam, sa = _sockaddr(address, cport)
    host = hc.host or _hostport(address, cport)
    if hc.host is None and cport == 80:             # the default port is left out
        host = host.rsplit(":", 1)[0]
    request = (f"GET {hc.path} HTTP/1.1\r\nHost: {host}\r\n"
               f"User-Agent: lbcore-health/{__version__}\r\nAccept: */*\r\n"
               "Connection: close\r\n\r\n").encode("ascii")
    stage = "connect"
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        async with asyncio.timeout(hc.timeout):
            await loop.sock_connect(sock, sa)
            stage = "sending the request"
            await loop.sock_sendall(sock, request)
            stage = "waiting for the response"
            buf = bytearray()
            eof = False
            while b"\r\n\r\n" not in buf and not eof:
                chunk = await loop.sock_recv(sock, 65536)
                eof = not chunk
                buf += chunk
                if len(buf) > HTTP_HEAD_MAX and b"\r\n\r\n" not in buf:
                    return False, f"response head longer than {HTTP_HEAD_MAX} bytes"
            head, sep, body = bytes(buf).partition(b"\r\n\r\n")
            m = _STATUS_LINE.match(head)
            if not m:
                if not head:
                    return False, "connection closed without a response"
                return False, f"not an HTTP response: {head[:40]!r}"
            status = int(m.group(1))
            if status not in hc.expect_status:
                expected = ", ".join(str(s) for s in hc.expect_status)
                return False, f"http status {status}, expected {expected}"
            if not hc.body_match:
                return True, f"http status {status}"
            stage = "reading the body"
            headers = head.lower()
            chunked = re.search(rb"\r\ntransfer-encoding:[^\r\n]*chunked", headers) is not None
            clen_m = re.search(rb"\r\ncontent-length:\s*(\d+)", headers)
            clen = int(clen_m.group(1)) if clen_m and not chunked else None
            body = bytearray(body)
            while not eof and len(body) < HTTP_BODY_MAX:
                if clen is not None and len(body) >= clen:
                    break
                if chunked and body.endswith(b"0\r\n\r\n"):
                    break
                chunk = await loop.sock_recv(sock, 65536)
                eof = not chunk
                body += chunk
            text = _dechunk(bytes(body)) if chunked else bytes(body[:clen])
            if hc.body_match.encode() in text[:HTTP_BODY_MAX]:
                return True, f"http status {status}, body matched"
            return False, f"http status {status}, body does not contain {hc.body_match!r}"
    except TimeoutError:
        return False, f"timeout after {_num(hc.timeout)}s: {stage}"
    finally:
        sock.close()


@_oserror_is_failure
async def check_udp(hc: HealthCheckConfig, address: IPAddress, port: int) -> CheckResult:
    """Up if a reply (containing hc.expect, if set) to hc.payload arrives
    within hc.timeout. Down at once on ICMP port unreachable."""
    loop = asyncio.get_running_loop()
    fam, sa = _sockaddr(address, hc.port or port)
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    replies = 0
    try:
        sock.setblocking(False)
        # Connected, so that the kernel reports ICMP errors on this socket and
        # delivers replies from this backend only.
        sock.connect(sa)
        async with asyncio.timeout(hc.timeout):
            await loop.sock_sendall(sock, hc.payload.encode())
            expect = hc.expect.encode()
            while True:
                data = await loop.sock_recv(sock, 65536)
                replies += 1
                if expect in data:
                    return True, f"udp reply, {len(data)} bytes"
    except TimeoutError:
        if replies:
            return False, (f"timeout after {_num(hc.timeout)}s: {replies} replies without "
                           f"{hc.expect!r}")
        return False, f"timeout after {_num(hc.timeout)}s: no reply"
    except ConnectionRefusedError:
        return False, "port unreachable (ICMP)"
    finally:
        sock.close()


def _killpg(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group (it runs in its own session, so
    pgid = pid): the command and the children it started."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


class _OutputTail:
    """The last EXEC_OUTPUT_KEEP bytes a command writes (stdout and stderr).

    The pipe is ours, read with add_reader, not the subprocess transport's:
    Process.wait() of Python 3.11 also waits until the transport's pipes
    close, and a background child of the command that left its process group
    (setsid) could hold them open for ever."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        self._buf = bytearray()
        self._reading = True
        loop.add_reader(self.rfd, self.read)

    def read(self) -> None:
        """Take what is in the pipe now (bounded: a writer cannot keep us here)."""
        for _ in range(16):
            if not self._reading:
                return
            try:
                chunk = os.read(self.rfd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._stop()
                return
            self._buf += chunk
            del self._buf[:-EXEC_OUTPUT_KEEP]

    def close_write_end(self) -> None:
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1

    def last_line(self) -> str:
        lines = bytes(self._buf).decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:200] if lines else ""

    def _stop(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.rfd)

    def close(self) -> None:
        self._stop()
        self.close_write_end()
        if self.rfd >= 0:
            os.close(self.rfd)
            self.rfd = -1


async def check_exec(hc: HealthCheckConfig, address: IPAddress, port: int) -> CheckResult:
    """Up if hc.command exits 0 within hc.timeout; killed (with its process
    group) and reaped at the timeout or when the task is cancelled."""
    env = dict(os.environ, LBCORE_BACKEND_ADDRESS=str(address), LBCORE_BACKEND_PORT=str(port),
               LBCORE_CHECK_PORT=str(hc.port or port))
    out = _OutputTail(asyncio.get_running_loop())
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *hc.command, stdin=asyncio.subprocess.DEVNULL, stdout=out.wfd, stderr=out.wfd,
                env=env, start_new_session=True)
        except OSError as e:
            return False, f"cannot run {hc.command[0]}: {_os_reason(e)}"
        finally:
            out.close_write_end()             # the child has its copy
        try:
            try:
                async with asyncio.timeout(hc.timeout):
                    rc = await proc.wait()
            except TimeoutError:
                return False, f"timeout after {_num(hc.timeout)}s: killed"
            out.read()                        # what it wrote just before exiting
            last = f": {out.last_line()}" if out.last_line() else ""
            if rc == 0:
                return True, f"exit 0{last}"
            if rc < 0:
                return False, f"killed by signal {-rc}{last}"
            return False, f"exit {rc}{last}"
        finally:
            # Also after a normal exit: background children of the command die
            # with it. (A pgid is not reused while any member of it is alive.)
            _killpg(proc)
            # Shielded: if we are here because of a cancellation, a second one
            # must not stop the reaping (the child watcher finishes it anyway).
            await asyncio.shield(proc.wait())
    finally:
        out.close()


CHECKERS: dict[str, Checker] = {
    "tcp": check_tcp, "http": check_http, "udp": check_udp, "exec": check_exec,
}


async def run_check(hc: HealthCheckConfig, address: IPAddress, port: int) -> CheckResult:
    """Run the checker of hc.type once. Never raises for a failed check (the
    failure is the reason); a last-resort timeout guards against a checker
    that overstays (cancellation is not swallowed)."""
    checker = CHECKERS[hc.type]
    try:
        async with asyncio.timeout(hc.timeout + 1.0):
            return await checker(hc, address, port)
    except TimeoutError:
        return False, f"timeout after {_num(hc.timeout)}s"
    except OSError as e:
        return False, _os_reason(e)
    except Exception as e:  # a checker bug must not stop the target's loop
        log.debug("health check %s of %s failed", hc.type, _hostport(address, port),
                  exc_info=True)
        return False, f"check error: {e!r}"


# --- jitter ---------------------------------------------------------------------------

def initial_delay(interval: float, rng: random.Random) -> float:
    """Offset of a target's first check: uniform in [0, interval)."""
    return interval * rng.random()


def next_delay(interval: float, rng: random.Random) -> float:
    """Time from one check's start to the next: interval +-10 %, in
    [0.9 * interval, 1.1 * interval)."""
    return interval * (1.0 + JITTER * (2.0 * rng.random() - 1.0))


# --- the monitor ----------------------------------------------------------------------

@dataclass(frozen=True)
class HealthTarget:
    """One thing to check: `key` identifies it to the caller (hashable);
    `check` None means no health check, i.e. always up."""
    key: Hashable
    check: HealthCheckConfig | None
    address: IPAddress
    port: int
    initial: str | None = None    # "up" | "down"; None: the monitor's default

    def same_probe(self, other: HealthTarget) -> bool:
        return (self.check, self.address, self.port) == (other.check, other.address, other.port)


@dataclass(frozen=True)
class HealthStatus:
    """A target's state for status output. Times are wall-clock (time.time())."""
    up: bool
    changed_at: float            # last transition, or when the target was added
    reason: str                  # why it is in this state
    last_result: str = ""        # reason of the last check ("" before the first)
    last_check_at: float | None = None
    successes: int = 0           # consecutive
    failures: int = 0            # consecutive
    checks: int = 0              # run since added or last changed
    check_type: str | None = None


@dataclass(eq=False)
class _Slot:
    target: HealthTarget
    up: bool
    changed_at: float
    reason: str
    provisional: bool = False
    last_result: str = ""
    last_check_at: float | None = None
    successes: int = 0
    failures: int = 0
    checks: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)

    def status(self) -> HealthStatus:
        return HealthStatus(self.up, self.changed_at, self.reason, self.last_result,
                            self.last_check_at, self.successes, self.failures, self.checks,
                            self.target.check.type if self.target.check else None)


def _key_str(key: Hashable) -> str:
    """A target key for logs: (pool, address, port) as "pool/address:port"."""
    if (isinstance(key, tuple) and len(key) == 3 and isinstance(key[2], int)
            and isinstance(key[1], ipaddress.IPv4Address | ipaddress.IPv6Address)):
        return f"{key[0]}/{_hostport(key[1], key[2])}"
    if isinstance(key, tuple):
        return ":".join(str(k) for k in key)
    return str(key)


def targets_from_config(config: Config) -> list[HealthTarget]:
    """One target per backend of every pool, keyed (pool name, address, port):
    a backend in two pools is checked once per pool (their checks may differ)."""
    return [HealthTarget((name, b.address, b.port), pool.health, b.address, b.port)
            for name, pool in config.pools.items() for b in pool.backends]


class HealthMonitor:
    """Runs the health checks of a set of targets and tracks their state.

    `on_change(key, up, reason)` (a function or a coroutine function) is
    called on every transition, from the target's own task, in order; an
    exception in it is logged and does not stop the checks. It is not called
    for the initial state. Use it inside a running event loop; `close()` ends
    every task.
    """

    def __init__(self, on_change: OnChange | None = None, *, initial: str = "up",
                 rng: random.Random | None = None, checker: Checker = run_check) -> None:
        if initial not in INITIAL_STATES:
            raise ValueError(f"initial must be one of {INITIAL_STATES}, got {initial!r}")
        self._on_change = on_change
        self._initial = initial
        self._rng = rng or random.Random()
        self._checker = checker
        self._slots: dict[Hashable, _Slot] = {}
        self._aux: set[asyncio.Task] = set()      # retiring tasks, pending notifications
        self._closed = False

    # -- queries
    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> list[Hashable]:
        return list(self._slots)

    def state(self, key: Hashable) -> bool:
        """True if the target is up. KeyError for an unknown key."""
        return self._slots[key].up

    def status(self, key: Hashable) -> HealthStatus:
        return self._slots[key].status()

    def snapshot(self) -> dict[Hashable, HealthStatus]:
        """Every target's status, a consistent copy."""
        return {k: s.status() for k, s in self._slots.items()}

    # -- changes
    def update(self, targets: Iterable[HealthTarget]) -> None:
        """Make the monitored set exactly `targets`: start new ones, stop
        removed ones, restart changed ones (other check, address or port) with
        their up/down state kept and their counters reset. Unchanged targets
        are left alone: their state, counters and schedule go on. Must be
        called from the running loop."""
        if self._closed:
            raise RuntimeError("HealthMonitor is closed")
        new: dict[Hashable, HealthTarget] = {}
        for t in targets:
            if t.key in new:
                raise ValueError(f"duplicate health target key {t.key!r}")
            if t.initial is not None and t.initial not in INITIAL_STATES:
                raise ValueError(f"initial must be one of {INITIAL_STATES}, got {t.initial!r}")
            new[t.key] = t
        loop = asyncio.get_running_loop()
        for key in [k for k in self._slots if k not in new]:
            self._retire(self._slots.pop(key))
        now = time.time()
        for key, t in new.items():
            old = self._slots.get(key)
            if old is not None and old.target.same_probe(t):
                old.target = t
                continue
            if old is None:
                if t.check is None:
                    slot = _Slot(t, True, now, "no health check")
                else:
                    up = (t.initial or self._initial) == "up"
                    slot = _Slot(t, up, now, "initial state", provisional=up)
            else:
                self._retire(old)
                # state kept, counters restarted; never checked yet = still provisional
                slot = _Slot(t, old.up, old.changed_at, old.reason,
                             provisional=old.provisional and t.check is not None)
                if t.check is None and not old.up:
                    slot.up, slot.changed_at, slot.reason = True, now, "health check removed"
                    self._log_change(slot)
                    self._spawn_aux(loop, self._notify(key, True, slot.reason))
            self._slots[key] = slot
            if t.check is not None:
                slot.task = loop.create_task(self._run(slot), name=f"health {_key_str(key)}")

    async def close(self) -> None:
        """Cancel every check and wait until all have ended (sockets closed,
        processes reaped)."""
        self._closed = True
        for slot in self._slots.values():
            self._retire(slot)
        while self._aux:
            tasks = list(self._aux)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> HealthMonitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals
    def _spawn_aux(self, loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> None:
        task = loop.create_task(coro)  # type: ignore[arg-type]
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    def _retire(self, slot: _Slot) -> None:
        task, slot.task = slot.task, None
        if task is not None and not task.done():
            task.cancel()
            self._aux.add(task)
            task.add_done_callback(self._aux.discard)

    async def _run(self, slot: _Slot) -> None:
        t = slot.target
        hc = t.check
        assert hc is not None
        loop = asyncio.get_running_loop()
        await asyncio.sleep(initial_delay(hc.interval, self._rng))
        while True:
            started = loop.time()
            try:
                ok, reason = await self._checker(hc, t.address, t.port)
                await self._record(slot, ok, reason)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("health check of %s failed unexpectedly", _key_str(t.key))
            delay = next_delay(hc.interval, self._rng) - (loop.time() - started)
            await asyncio.sleep(max(0.0, delay))

    async def _record(self, slot: _Slot, ok: bool, reason: str) -> None:
        if self._slots.get(slot.target.key) is not slot:
            return                              # retired while the check ran
        hc = slot.target.check
        assert hc is not None
        slot.checks += 1
        slot.last_result = reason
        slot.last_check_at = time.time()
        if ok:
            slot.successes, slot.failures = slot.successes + 1, 0
        else:
            slot.successes, slot.failures = 0, slot.failures + 1
        provisional, slot.provisional = slot.provisional, False
        going_down = slot.up and not ok and (provisional or slot.failures >= hc.fall)
        going_up = not slot.up and ok and slot.successes >= hc.rise
        if not (going_down or going_up):
            return
        slot.up = not slot.up
        slot.changed_at = slot.last_check_at
        slot.reason = reason if not provisional else f"first check: {reason}"
        self._log_change(slot)
        await self._notify(slot.target.key, slot.up, slot.reason)

    def _log_change(self, slot: _Slot) -> None:
        t = slot.target
        state = "up" if slot.up else "down"
        count = (f"successes={slot.successes}" if slot.up else f"failures={slot.failures}")
        log.log(logging.INFO if slot.up else logging.WARNING,
                "health change backend=%s address=%s check=%s state=%s %s reason=%s",
                _key_str(t.key), _hostport(t.address, t.port),
                t.check.type if t.check else "none", state, count,
                json.dumps(slot.reason, ensure_ascii=False),
                extra={"event": "health_change", "backend": _key_str(t.key),
                       "address": _hostport(t.address, t.port), "state": state,
                       "reason": slot.reason})

    async def _notify(self, key: Hashable, up: bool, reason: str) -> None:
        if self._on_change is None:
            return
        try:
            res = self._on_change(key, up, reason)
            if inspect.isawaitable(res):
                await res
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("health on_change callback failed for %s", _key_str(key))
