"""Health checkers against servers on 127.0.0.1, and the monitor's state machine.

Loopback only. Intervals are short (0.02-0.2 s) and every wait is bounded by
generous limits: the tests assert order and eventual state, never speed. The
hysteresis tests use a scripted checker so that they count exactly.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import pytest

from lbcore.config import HealthCheckConfig, load_config
from lbcore.health import (
    JITTER,
    HealthMonitor,
    HealthTarget,
    check_exec,
    check_http,
    check_tcp,
    check_udp,
    initial_delay,
    next_delay,
    run_check,
    targets_from_config,
)

LO = ipaddress.IPv4Address("127.0.0.1")
BOUND = 20.0          # seconds: the most any single test may wait for an event


def run(coro: Awaitable, timeout: float = 60.0):
    """Run a coroutine in a fresh loop, bounded in time, and check it left no task."""
    async def main():
        try:
            return await asyncio.wait_for(coro, timeout)
        finally:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            assert others == [], others
    return asyncio.run(main())


async def eventually(pred: Callable[[], bool], timeout: float = BOUND, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


class ZeroRng(random.Random):
    """Every draw 0: first checks at once, intervals at their lower bound."""

    def random(self) -> float:
        return 0.0


def _from_health(task: asyncio.Task) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and code.co_filename.endswith(os.path.join("lbcore", "health.py"))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid: int) -> bool:
    """True once the process no longer exists: killed *and reaped* (a zombie
    still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def dead(pid: int) -> bool:
    """True once the process is gone or a zombie that is not ours to reap (a
    grandchild of the test, reparented to init, which reaps it in its own time)."""
    if gone(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except FileNotFoundError:
        return True
    return state == "Z" and int(ppid) != os.getpid()


class _Handlers:
    """Tracks a server's connection handlers, so that a test can wait for them
    to end: `Server.wait_closed()` of Python 3.11 does not."""

    def __init__(self) -> None:
        self.handlers: set[asyncio.Task] = set()

    def _track(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)

    async def _drain_handlers(self) -> None:
        await asyncio.sleep(0)             # let just-created handler tasks start
        live = {t for t in self.handlers if not t.done()}
        if live:
            _, pending = await asyncio.wait(live, timeout=10.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


class TcpServer(_Handlers):
    """Accepts and closes connections; can be stopped and restarted on its port."""

    def __init__(self) -> None:
        super().__init__()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._track()
        self.accepted += 1
        w.close()
        with contextlib.suppress(ConnectionError):
            await w.wait_closed()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        await self._drain_handlers()


class HttpServer(_Handlers):
    """A tiny HTTP/1.1 server: routes path -> raw response bytes, or None for
    "never answer". Records each request head."""

    def __init__(self, routes: dict[str, bytes | None]) -> None:
        super().__init__()
        self.routes = routes
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._track()
        try:
            head = await r.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            path = head.split(b" ")[1].decode()
            resp = self.routes.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            if resp is None:
                await r.read()            # hold the connection until the client gives up
            else:
                w.write(resp)
                await w.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def __aenter__(self) -> HttpServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        await self._drain_handlers()       # they end once their clients have closed


class UdpServer(asyncio.DatagramProtocol):
    """Replies `prefix + datagram`, or stays silent if `reply` is False."""

    def __init__(self, prefix: bytes = b"", reply: bool = True) -> None:
        self.prefix = prefix
        self.reply = reply
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.append(data)
        if self.reply and self.transport is not None:
            self.transport.sendto(self.prefix + data, addr)


@contextlib.asynccontextmanager
async def udp_server(**kw):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: UdpServer(**kw), local_addr=("127.0.0.1", 0))
    try:
        yield proto, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


# --- tcp ---------------------------------------------------------------------------------------

def test_tcp_up_and_refused():
    async def main():
        srv = TcpServer()
        await srv.start()
        hc = HealthCheckConfig("tcp", timeout=5.0)
        assert await check_tcp(hc, LO, srv.port) == (True, "tcp connect ok")
        await eventually(lambda: srv.accepted == 1)
        await srv.stop()
        assert await check_tcp(hc, LO, srv.port) == (False, "connection refused")
        assert await run_check(hc, LO, srv.port) == (False, "connection refused")
    run(main())


def test_tcp_check_port_overrides_backend_port():
    async def main():
        srv = TcpServer()
        await srv.start()
        hc = HealthCheckConfig("tcp", timeout=5.0, port=srv.port)
        assert await run_check(hc, LO, free_port()) == (True, "tcp connect ok")
        await eventually(lambda: srv.accepted == 1)
        await srv.stop()
    run(main())


def test_tcp_connect_timeout():
    """A listener whose accept queue is full drops SYNs: connect hangs until
    the timeout, and the socket is closed."""
    async def main():
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        try:
            ok, reason = await run_check(HealthCheckConfig("tcp", timeout=0.3), LO, port)
            assert (ok, reason) == (False, "timeout after 0.3s: connect")
        finally:
            for s in fillers:
                s.close()
            lst.close()
    run(main())


# --- http --------------------------------------------------------------------------------------

OK_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nContent-Type: text/plain\r\n\r\nstatus: good"
ROUTES: dict[str, bytes | None] = {
    "/ok": OK_BODY,
    "/fail": b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
    "/nocontent": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"7\r\nstatus:\r\n6\r\n ready\r\n0\r\n\r\n"),
    "/eof": b"HTTP/1.0 200 OK\r\n\r\nbody until close: alive",
    "/garbage": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "/slow": None,
}


@pytest.mark.parametrize("kw,result", [
    ({"path": "/ok"}, (True, "http status 200")),
    ({"path": "/ok", "body_match": "good"}, (True, "http status 200, body matched")),
    ({"path": "/ok", "body_match": "bad"},
     (False, "http status 200, body does not contain 'bad'")),
    ({"path": "/fail"}, (False, "http status 503, expected 200")),
    ({"path": "/fail", "expect_status": (200, 503)}, (True, "http status 503")),
    ({"path": "/nocontent", "expect_status": (204,)}, (True, "http status 204")),
    ({"path": "/missing", "expect_status": (200, 204)},
     (False, "http status 404, expected 200, 204")),
    ({"path": "/chunked", "body_match": "status: ready"}, (True, "http status 200, body matched")),
    ({"path": "/eof", "body_match": "alive"}, (True, "http status 200, body matched")),
    ({"path": "/garbage"}, (False, "not an HTTP response: b'SSH-2.0-OpenSSH_9.2'")),
    ({"path": "/slow", "timeout": 0.3}, (False, "timeout after 0.3s: waiting for the response")),
], ids=lambda v: v.get("path") + ("+body" if v.get("body_match") else "")
    if isinstance(v, dict) else None)
def test_http(kw, result):
    async def main():
        async with HttpServer(ROUTES) as srv:
            hc = HealthCheckConfig("http", **{"timeout": 5.0, **kw})
            assert await run_check(hc, LO, srv.port) == result
    run(main())


def test_http_request_shape():
    async def main():
        async with HttpServer(ROUTES) as srv:
            await check_http(HealthCheckConfig("http", path="/ok?x=1", timeout=5.0), LO, srv.port)
            await check_http(HealthCheckConfig("http", path="/ok", host="www.example.com",
                                               timeout=5.0), LO, srv.port)
        first, second = srv.requests
        lines = first.split(b"\r\n")
        assert lines[0] == b"GET /ok?x=1 HTTP/1.1"
        assert f"Host: 127.0.0.1:{srv.port}".encode() in lines
        assert b"Connection: close" in lines
        assert b"Host: www.example.com" in second.split(b"\r\n")
    run(main())


def test_http_refused():
    async def main():
        hc = HealthCheckConfig("http", timeout=5.0)
        assert await run_check(hc, LO, free_port()) == (False, "connection refused")
    run(main())


# --- udp ---------------------------------------------------------------------------------------

def test_udp_echo_up():
    async def main():
        async with udp_server() as (srv, port):
            hc = HealthCheckConfig("udp", payload="ping", timeout=5.0)
            assert await check_udp(hc, LO, port) == (True, "udp reply, 4 bytes")
            assert srv.received == [b"ping"]
    run(main())


def test_udp_expect():
    async def main():
        async with udp_server(prefix=b"pong:") as (_, port):
            hc = HealthCheckConfig("udp", payload="x", expect="pong", timeout=5.0)
            assert await run_check(hc, LO, port) == (True, "udp reply, 6 bytes")
            hc = HealthCheckConfig("udp", payload="x", expect="PONG", timeout=0.3)
            assert await run_check(hc, LO, port) == (
                False, "timeout after 0.3s: 1 replies without 'PONG'")
    run(main())


def test_udp_nothing_listening_is_port_unreachable():
    """ICMP port unreachable ends the check at once: the reason says so, not
    a timeout (the timeout is far away)."""
    async def main():
        hc = HealthCheckConfig("udp", payload="ping", timeout=10.0)
        assert await run_check(hc, LO, free_port(socket.SOCK_DGRAM)) == (
            False, "port unreachable (ICMP)")
    run(main())


def test_udp_silent_server_times_out():
    async def main():
        async with udp_server(reply=False) as (srv, port):
            hc = HealthCheckConfig("udp", payload="ping", timeout=0.3)
            assert await run_check(hc, LO, port) == (False, "timeout after 0.3s: no reply")
            assert srv.received == [b"ping"]
    run(main())


# --- exec --------------------------------------------------------------------------------------

def test_exec_true_false_and_output():
    async def main():
        t = HealthCheckConfig("exec", command=("true",), timeout=10.0)
        f = HealthCheckConfig("exec", command=("false",), timeout=10.0)
        msg = HealthCheckConfig("exec", command=("sh", "-c", "echo starting; echo >&2 lag 30s;"
                                                 " exit 3"), timeout=10.0)
        assert await run_check(t, LO, 80) == (True, "exit 0")
        assert await run_check(f, LO, 80) == (False, "exit 1")
        assert await run_check(msg, LO, 80) == (False, "exit 3: lag 30s")
        missing = HealthCheckConfig("exec", command=("/nonexistent/check",), timeout=10.0)
        assert await run_check(missing, LO, 80) == (
            False, "cannot run /nonexistent/check: no such file or directory")
    run(main())


def test_exec_environment():
    async def main():
        script = ('test "$LBCORE_BACKEND_ADDRESS" = 127.0.0.1 && '
                  'test "$LBCORE_BACKEND_PORT" = 8080 && test "$LBCORE_CHECK_PORT" = 9090')
        hc = HealthCheckConfig("exec", command=("sh", "-c", script), port=9090, timeout=10.0)
        assert await check_exec(hc, LO, 8080) == (True, "exit 0")
        assert (await check_exec(hc, LO, 8081))[0] is False
    run(main())


def _pids(path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def test_exec_timeout_kills_the_process_group_and_leaves_no_zombie(tmp_path):
    """The command and a child it started in the background are both killed
    at the timeout and reaped: the pids disappear (a zombie would not)."""
    pidfile = tmp_path / "pids"
    script = f"sleep 60 & echo $$ $! > {pidfile}; wait"

    async def main():
        hc = HealthCheckConfig("exec", command=("sh", "-c", script), timeout=1.0)
        ok, reason = await run_check(hc, LO, 80)
        assert (ok, reason) == (False, "timeout after 1s: killed")
        sh, sleep = _pids(pidfile)
        await eventually(lambda: gone(sh) and dead(sleep), timeout=10.0)
    run(main())


def test_exec_background_child_holding_the_output_does_not_stall(tmp_path):
    """A command that leaves a child in another session (which keeps the
    output pipe open and survives the group kill) is still judged by its own
    exit status, at once, not at the timeout."""
    pidfile = tmp_path / "pids"
    daemon = f"{sys.executable} -c 'import os, time; os.setsid(); time.sleep(30)'"
    script = f"{daemon} & echo $! > {pidfile}; echo fine"

    async def main():
        hc = HealthCheckConfig("exec", command=("sh", "-c", script), timeout=20.0)
        return await run_check(hc, LO, 80)

    try:
        assert run(main()) == (True, "exit 0: fine")
    finally:
        for pid in _pids(pidfile):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_exec_cancelled_mid_check_kills_and_reaps(tmp_path):
    pidfile = tmp_path / "pids"
    script = f"sleep 60 & echo $$ $! > {pidfile}; wait"

    async def main():
        hc = HealthCheckConfig("exec", command=("sh", "-c", script), timeout=30.0)
        task = asyncio.create_task(run_check(hc, LO, 80))
        await eventually(lambda: len(_pids(pidfile)) == 2, timeout=10.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sh, sleep = _pids(pidfile)
        await eventually(lambda: gone(sh) and dead(sleep), timeout=10.0)
    run(main())


# --- jitter ------------------------------------------------------------------------------------

def test_jitter_bounds():
    rng = random.Random(1)
    firsts = [initial_delay(2.0, rng) for _ in range(5000)]
    assert all(0.0 <= x < 2.0 for x in firsts)
    assert min(firsts) < 0.05 and max(firsts) > 1.95            # spread over the interval
    nexts = [next_delay(2.0, rng) for _ in range(5000)]
    assert all(2.0 * (1 - JITTER) <= x < 2.0 * (1 + JITTER) for x in nexts)
    assert min(nexts) < 1.82 and max(nexts) > 2.18


def test_first_checks_are_spread_over_the_interval():
    """20 targets with interval 1 s: each first check starts no earlier than
    its random offset (drawn in target order from the seeded rng)."""
    rng = random.Random(7)
    offsets = [rng.random() for _ in range(20)]
    assert max(offsets) - min(offsets) > 0.5

    async def main():
        loop = asyncio.get_running_loop()
        first: dict[int, float] = {}

        async def checker(hc, address, port):
            first.setdefault(port, loop.time())
            return True, "ok"

        mon = HealthMonitor(rng=random.Random(7), checker=checker)
        hc = HealthCheckConfig("tcp", interval=1.0, timeout=0.5)
        t0 = loop.time()
        mon.update([HealthTarget(i, hc, LO, i) for i in range(20)])
        await eventually(lambda: len(first) == 20)
        await mon.close()
        for i in range(20):
            assert first[i] - t0 >= offsets[i] - 0.01, (i, first[i] - t0, offsets[i])
        order = sorted(range(20), key=lambda i: first[i])
        assert order[0] == min(range(20), key=lambda i: offsets[i])
    run(main())


# --- the monitor: hysteresis with a scripted checker ----------------------------------------------

class Script:
    """A checker that returns a scripted sequence of results per port (then
    repeats the last one) and counts calls."""

    def __init__(self, results: dict[int, list[bool]]) -> None:
        self.results = results
        self.calls: dict[int, int] = {p: 0 for p in results}

    async def __call__(self, hc, address, port):
        n = self.calls[port] = self.calls[port] + 1
        seq = self.results[port]
        return seq[min(n, len(seq)) - 1], f"#{n}"


FAST = HealthCheckConfig("tcp", interval=0.02, timeout=0.01, rise=2, fall=3)


def monitor_run(script: Script, targets: list[HealthTarget], until_calls: int,
                **kw) -> tuple[list[tuple], HealthMonitor]:
    changes: list[tuple] = []

    async def main():
        mon = HealthMonitor(lambda k, up, why: changes.append((k, up, why)),
                            checker=script, rng=random.Random(0), **kw)
        mon.update(targets)
        # one call past the last scripted one, so that its result is recorded
        await eventually(lambda: all(n > until_calls for n in script.calls.values()))
        await mon.close()
        return mon
    return changes, run(main())


def test_hysteresis_counts_exactly_rise_and_fall():
    T, F = True, False
    # up (provisional) -> #1 ok confirms; 2 failures are not enough; 3 in a row
    # (#5-#7) take it down; a lone success (#8) is not enough; #10-#11 bring it up.
    script = Script({1: [T, F, F, T, F, F, F, T, F, T, T, T]})
    changes, mon = monitor_run(script, [HealthTarget("a", FAST, LO, 1)], 12)
    assert changes == [("a", False, "#7"), ("a", True, "#11")]
    st = mon.status("a")
    assert st.up and st.reason == "#11" and st.failures == 0 and st.successes >= 2


def test_initial_up_first_failure_takes_it_down_at_once():
    script = Script({1: [False, True, True]})
    changes, mon = monitor_run(script, [HealthTarget("a", FAST, LO, 1)], 3)
    assert changes == [("a", False, "first check: #1"), ("a", True, "#3")]


def test_initial_down_needs_rise_successes():
    script = Script({1: [True, False, True, True], 2: [True, True]})
    targets = [HealthTarget("a", FAST, LO, 1), HealthTarget("b", FAST, LO, 2, initial="up")]
    changes, mon = monitor_run(script, targets, 4, initial="down")
    assert changes == [("a", True, "#4")]          # "b" started up and stayed up
    assert mon.state("a") and mon.state("b")


def test_rise_and_fall_of_one():
    hc = HealthCheckConfig("tcp", interval=0.02, timeout=0.01, rise=1, fall=1)
    script = Script({1: [True, False, True, False, False, True]})
    changes, _ = monitor_run(script, [HealthTarget("a", hc, LO, 1)], 6)
    assert changes == [("a", False, "#2"), ("a", True, "#3"), ("a", False, "#4"),
                       ("a", True, "#6")]


def test_async_callback_and_a_failing_callback(caplog):
    calls: list[tuple] = []

    async def on_change(key, up, reason):
        await asyncio.sleep(0)
        calls.append((key, up, reason))
        raise RuntimeError("callback bug")

    async def main():
        script = Script({1: [False, True, True, False]})
        hc = HealthCheckConfig("tcp", interval=0.02, timeout=0.01, rise=2, fall=1)
        mon = HealthMonitor(on_change, checker=script, rng=random.Random(0))
        mon.update([HealthTarget("a", hc, LO, 1)])
        await eventually(lambda: script.calls[1] > 4)
        await mon.close()

    with caplog.at_level(logging.INFO, logger="lbcore.health"):
        run(main())
    # the exception did not stop the checks: every transition was delivered
    assert calls == [("a", False, "first check: #1"), ("a", True, "#3"), ("a", False, "#4")]
    assert any("on_change callback failed" in r.getMessage() for r in caplog.records)


def test_one_log_line_per_change(caplog):
    script = Script({1: [True, False, False, False, True, True]})
    with caplog.at_level(logging.DEBUG, logger="lbcore.health"):
        monitor_run(script, [HealthTarget(("web", LO, 1), FAST, LO, 1)], 6)
    lines = [r for r in caplog.records if r.name == "lbcore.health"]
    assert [r.getMessage() for r in lines] == [
        'health change backend=web/127.0.0.1:1 address=127.0.0.1:1 check=tcp state=down '
        'failures=3 reason="#4"',
        'health change backend=web/127.0.0.1:1 address=127.0.0.1:1 check=tcp state=up '
        'successes=2 reason="#6"',
    ]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.INFO]
    assert lines[0].state == "down" and lines[0].reason == "#4"       # structured fields


# --- the monitor against real servers ----------------------------------------------------------

def test_monitor_tcp_down_after_fall_and_up_after_rise():
    async def main():
        srv = TcpServer()
        await srv.start()
        changes: list[tuple] = []
        got = asyncio.Event()

        def on_change(key, up, reason):
            changes.append((key, up, reason))
            got.set()

        hc = HealthCheckConfig("tcp", interval=0.2, timeout=0.2, rise=2, fall=2)
        async with HealthMonitor(on_change, initial="down") as mon:
            mon.update([HealthTarget("be1", hc, LO, srv.port)])
            await asyncio.wait_for(got.wait(), BOUND)
            assert changes == [("be1", True, "tcp connect ok")]
            assert mon.state("be1") and mon.status("be1").successes == 2

            got.clear()
            await srv.stop()
            await asyncio.wait_for(got.wait(), BOUND)
            assert changes[-1] == ("be1", False, "connection refused")
            st = mon.status("be1")
            assert not st.up and st.failures == 2 and st.last_result == "connection refused"

            got.clear()
            await srv.start()                 # same port again
            await asyncio.wait_for(got.wait(), BOUND)
            assert changes[-1] == ("be1", True, "tcp connect ok")
            assert len(changes) == 3
            await srv.stop()
    run(main())


def test_monitor_http_and_udp_and_exec_targets():
    async def main():
        async with HttpServer(ROUTES) as http, udp_server() as (_, uport):
            fast = {"interval": 0.5, "timeout": 0.5, "rise": 1, "fall": 1}
            targets = [
                HealthTarget("http-ok", HealthCheckConfig("http", path="/ok", body_match="good",
                                                          **fast), LO, http.port),
                HealthTarget("http-503", HealthCheckConfig("http", path="/fail", **fast),
                             LO, http.port),
                HealthTarget("udp-echo", HealthCheckConfig("udp", payload="hi", **fast),
                             LO, uport),
                HealthTarget("udp-none", HealthCheckConfig("udp", payload="hi", **fast),
                             LO, free_port(socket.SOCK_DGRAM)),
                HealthTarget("exec-true", HealthCheckConfig(
                    "exec", command=("true",), interval=2.0, timeout=2.0, rise=1), LO, 1),
                HealthTarget("exec-false", HealthCheckConfig(
                    "exec", command=("false",), interval=2.0, timeout=2.0, fall=1), LO, 1),
                HealthTarget("none", None, LO, 1),
            ]
            async with HealthMonitor(initial="down", rng=ZeroRng()) as mon:
                mon.update(targets)
                assert mon.state("none") and mon.status("none").reason == "no health check"
                await eventually(lambda: all(s.checks >= 1 for k, s in mon.snapshot().items()
                                             if k != "none"))
                snap = mon.snapshot()
        assert {k: s.up for k, s in snap.items()} == {
            "http-ok": True, "http-503": False, "udp-echo": True, "udp-none": False,
            "exec-true": True, "exec-false": False, "none": True}
        assert snap["http-503"].last_result == "http status 503, expected 200"
        assert snap["udp-none"].last_result == "port unreachable (ICMP)"
        assert snap["exec-false"].check_type == "exec"
    run(main())


# --- update() and close() ------------------------------------------------------------------

def test_update_keeps_unchanged_targets():
    async def main():
        script = Script({1: [False], 2: [True], 3: [False], 4: [True]})
        changes: list[tuple] = []
        mon = HealthMonitor(lambda *c: changes.append(c), checker=script, rng=random.Random(0))
        hc = HealthCheckConfig("tcp", interval=0.02, timeout=0.01, rise=2, fall=3)
        a, b, d = (HealthTarget("a", hc, LO, 1), HealthTarget("b", hc, LO, 2),
                   HealthTarget("d", hc, LO, 4))
        mon.update([a, b, d])
        await eventually(lambda: not mon.state("a") and mon.status("b").checks >= 3)
        before = mon.snapshot()
        d_task = mon._slots["d"].task

        b2 = HealthTarget("b", HealthCheckConfig("tcp", interval=0.03, timeout=0.01, rise=2,
                                                 fall=3), LO, 2)
        c = HealthTarget("c", hc, LO, 3)
        mon.update([a, b2, c])                  # a unchanged, b changed, c new, d removed
        assert set(mon.keys()) == {"a", "b", "c"}
        after = mon.snapshot()
        assert after["a"] == before["a"]        # untouched: same state and counters
        assert not after["a"].up
        assert after["b"].up and after["b"].checks == 0 and after["b"].successes == 0
        assert after["b"].changed_at == before["b"].changed_at
        assert after["c"].up and after["c"].reason == "initial state"
        await eventually(lambda: d_task.done())
        assert d_task.cancelled()
        # "a" keeps counting from where it was, "b" restarts its counters
        n_a = before["a"].checks
        await eventually(lambda: mon.status("a").checks > n_a + 2)
        assert mon.status("a").failures > before["a"].failures
        await eventually(lambda: mon.status("c").checks >= 1)
        assert not mon.state("c")               # first check failed: down at once
        await mon.close()
        assert ("a", False, "first check: #1") in changes
        assert not [c for c in changes if c[0] == "d"]   # a removal is not a state change
    run(main())


def test_update_before_the_first_check_stays_provisional():
    """A target changed before its first check is still "never checked": its
    first failure takes it down at once, as at start."""
    async def main():
        script = Script({1: [False], 2: [False]})
        changes: list[tuple] = []
        mon = HealthMonitor(lambda *c: changes.append(c), checker=script, rng=ZeroRng())
        mon.update([HealthTarget("a", FAST, LO, 1)])
        mon.update([HealthTarget("a", FAST, LO, 2)])       # other port: a changed target
        await eventually(lambda: len(changes) == 1)
        await mon.close()
        assert changes == [("a", False, "first check: #1")]
        assert script.calls[1] == 0
    run(main())


def test_update_removing_a_check_brings_the_target_up():
    async def main():
        script = Script({1: [False]})
        changes: list[tuple] = []
        mon = HealthMonitor(lambda *c: changes.append(c), checker=script, rng=random.Random(0))
        mon.update([HealthTarget("a", FAST, LO, 1)])
        await eventually(lambda: not mon.state("a"))
        mon.update([HealthTarget("a", None, LO, 1)])
        assert mon.state("a") and mon.status("a").reason == "health check removed"
        await eventually(lambda: len(changes) == 2)
        assert changes == [("a", False, "first check: #1"), ("a", True, "health check removed")]
        await mon.close()
    run(main())


def test_update_rejects_duplicate_keys_and_bad_initial():
    async def main():
        mon = HealthMonitor()
        with pytest.raises(ValueError, match="duplicate"):
            mon.update([HealthTarget("a", None, LO, 1), HealthTarget("a", None, LO, 2)])
        with pytest.raises(ValueError, match="initial"):
            mon.update([HealthTarget("a", FAST, LO, 1, initial="maybe")])
        await mon.close()
    run(main())
    with pytest.raises(ValueError, match="initial"):
        HealthMonitor(initial="sideways")


def test_close_ends_every_task_and_process(tmp_path):
    """close() while checks are in flight (an exec sleeping, an http request
    waiting): no task is left, the process is reaped, update() refuses."""
    pidfile = tmp_path / "pids"

    async def main():
        async with HttpServer(ROUTES) as http:
            mon = HealthMonitor(rng=ZeroRng())
            mon.update([
                HealthTarget("exec", HealthCheckConfig(
                    "exec", command=("sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"),
                    interval=30.0, timeout=30.0), LO, 1),
                HealthTarget("http", HealthCheckConfig("http", path="/slow", interval=30.0,
                                                       timeout=30.0), LO, http.port),
            ])
            # both checks start at once (offset 0) and hang
            await eventually(lambda: len(_pids(pidfile)) == 1 and http.requests)
            (pid,) = _pids(pidfile)
            await mon.close()
            assert [t for t in asyncio.all_tasks() if _from_health(t)] == []
            await eventually(lambda: gone(pid), timeout=10.0)
            with pytest.raises(RuntimeError, match="closed"):
                mon.update([])
    run(main())


def test_targets_from_config():
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "lbcore.toml"))
    targets = targets_from_config(cfg)
    assert len(targets) == cfg.backend_count
    assert len({t.key for t in targets}) == len(targets)
    web = [t for t in targets if t.key[0] == "web"]
    assert [t.address for t in web] == [b.address for b in cfg.pools["web"].backends]
    assert all(t.check == cfg.pools["web"].health for t in web)
    # a backend in two pools ("dns" and "dns-tcp") is two targets with their own checks
    dns = {t.key[0]: t.check.type for t in targets if str(t.address) == "198.19.0.21"}
    assert dns == {"dns": "udp", "dns-tcp": "tcp"}
