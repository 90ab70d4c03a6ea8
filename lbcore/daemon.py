"""`lbcore run`: the balancer process.

One asyncio control plane in the main thread (signals, health checks, the
control socket, metrics, flow expiry) and one C worker loop per TUN queue (or
per set of AF_PACKET sockets, mode rawsock) in threads of their own, GIL
released, pinned to CPUs. Start-up order makes a failure at any step undo the
ones before it (AsyncExitStack): data plane and first table, the mode's
devices and gateway routes/rules/sysctls (lbcore.dataplane), workers, health
checks, the control socket and metrics.

The event loop never waits on slow work: building and publishing tables,
netlink changes on reload and flow-table walks (expiry, purges) run in a
worker thread (asyncio.to_thread), so health checks keep their timing while
a reload builds tables for many backends.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import _core, netconf
from .balancer import PROTO, Balancer, PublishError
from .config import Config, ConfigError, check_worker_cpus, load_config
from .control.status import StatusView
from .dataplane import Plane, make_plane, replies
from .dataplane.replies import ReplyPath
from .tabledigest import table_digests

if TYPE_CHECKING:
    # imported where first used, after the workers forward: every module imported before
    # them lengthens a restart's gap (prometheus_client alone takes ~60 ms)
    from .health import HealthMonitor
    from .sync import FlowSync

log = logging.getLogger("lbcore")

T = TypeVar("T")

EXPIRE_EVERY_S = 1.0
EXPIRE_BATCH = 16384      # flows removed per call (and reported to sync peers)
SLOW_START_STEP_S = 1.0


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    """Structured logs: `time level logger message`, or one JSON per line."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        import json

        class _Json(logging.Formatter):
            def format(self, r: logging.LogRecord) -> str:
                return json.dumps({"ts": round(r.created, 3), "level": r.levelname.lower(),
                                   "logger": r.name, "msg": r.getMessage()})
        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def worker_cpus(workers: int, chosen: Sequence[int] = ()) -> list[int | None]:
    """CPU for each worker: those of ``chosen`` (global.worker_cpus, checked against the
    process's CPUs at start), else from the highest CPU down, leaving CPU 0 - where
    interrupts and softirq work usually land - to the kernel as long as there
    are enough CPUs (a busy-polling worker on the CPU that also runs the
    kernel's receive work starves it: receive livelock)."""
    if chosen:
        return list(chosen)
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except OSError:
        return [None] * workers
    if len(cpus) <= 1:
        return [None] * workers
    order = list(reversed(cpus))
    return [order[i % len(order)] for i in range(workers)]


def control_cpus(allowed: set[int], workers: list[int | None]) -> set[int] | None:
    """CPUs for every thread but the workers: those of ``allowed`` no worker is pinned to, or
    None when there are none (then everything shares every CPU, as before). A worker that
    polls would otherwise share its core with the control plane, whose bursts (health checks,
    the status tick, netlink dumps: up to a millisecond or so of Python) preempt it and hold
    every packet that arrives meanwhile: the latency tail of a polling worker."""
    pinned = {c for c in workers if c is not None}
    rest = allowed - pinned
    return rest if pinned and rest else None


def reply_paths(bal: Balancer) -> list[ReplyPath]:
    """The (backend, protocol, port) whose replies the data plane must see."""
    return [ReplyPath(b.address, PROTO[v.proto], b.port)
            for v in bal.vips.values() for b in v.backends.values()]


class Daemon:
    """The running balancer. serve() returns the process exit code."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.dp: Any = None
        self.balancer: Balancer | None = None
        self.plane: Plane | None = None
        self.view = StatusView(self)
        self.started = time.time()
        self._stop = asyncio.Event()
        self._threads: list[threading.Thread] = []
        self._worker_error: BaseException | None = None
        self._reload_lock = asyncio.Lock()
        self._publish_lock = asyncio.Lock()
        self._publish_pending = False     # the last publish failed: housekeeping retries
        self.health: HealthMonitor | None = None
        self.announcer: Any = None          # lbcore.bgp.Announcer with a [bgp] section
        self.digests: dict[str, str] = {}   # VIP -> digest of its live Maglev table
        self.adoption: dict[str, Any] | None = None   # what adopt_flows answered at start
        self.sync: FlowSync | None = None
        self.cleanup_on_exit = False      # `run --cleanup-on-exit`: remove the reservation too
        self.tun_adopted: bool | None = None   # tun mode: attached to the last run's device
        self._reservation_found = True    # replies.reserved() at start (unknown: assume so)
        self.shed: Any = None             # lbcore.dataplane.shed.SynShed, when a plane has one
        # the CPU of each worker (None: not pinned) and the CPUs of every other thread (None:
        # all of them); empty until the workers start
        self.cpus: dict[str, Any] = {"workers": [], "control": None}

    # -- lifecycle -----------------------------------------------------------

    async def serve(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            # first, so that a SIGTERM during start-up still undoes what was done
            # (it is acted on once start-up returns to the event loop)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            stack.callback(self._remove_signal_handlers, loop)

            if cfg.flow_file:
                stack.callback(os.close, lock_flow_file(cfg.flow_file))
            self.dp = _core.Dataplane(
                cfg.workers, cfg.flow_table_size, timeouts=cfg.timeouts.as_ms(),
                flow_file=cfg.flow_file or None,
                frag_entries=cfg.fragments.cache_size, frag_buffers=cfg.fragments.buffers,
                frag_timeout_ms=max(1, int(round(cfg.fragments.timeout * 1000.0))),
                client_entries=cfg.client_table_size, reject_rate=cfg.reject_rate,
                reject_burst=cfg.reject_burst, busy_poll_us=cfg.busy_poll_us)
            self.balancer = Balancer(self.dp, cfg.hash_seed, cfg.ring_size,
                                     clock_ms=_core.now_ms)
            for change in self.balancer.configure(cfg):
                log.debug("%s", change)
            spec = self.balancer.table_spec()
            self.balancer.publish()
            if cfg.flow_file:
                # before the workers: every flow of the last run keeps its backend,
                # whatever the table just published would pick for it
                self.adoption = await asyncio.to_thread(self.dp.adopt_flows)
                self.dp.commit_flow_file()
                log_adoption(cfg.flow_file, self.adoption)
            if cfg.sync is not None:
                self.dp.sync_attach(cfg.sync.ring_size)

            # the reply path's reservation (rules, blackholes) outlives the run; see
            # _release_replies for when it goes (after the plane's undo: pushed first)
            stack.push(lambda et, ev, tb: self._release_replies(
                self._reservation_found, et is not None))
            self.plane = make_plane(cfg, self.dp, [v.address for v in cfg.vips],
                                    reply_paths(self.balancer))
            stack.push(lambda et, ev, tb: self._undo_plane(et is not None))
            stack.callback(self._stop_workers)
            # A device the last run left (tun mode's persistent TUN) comes with its routes and
            # rules: the workers forward as soon as its queues are attached, and the netlink
            # work below (reconciling routes and rules with this config) runs meanwhile.
            open_queues = getattr(self.plane, "open_queues", None)
            self.tun_adopted = bool(open_queues()) if open_queues is not None else None
            if self.tun_adopted:
                self._start_workers(loop)
            self._reservation_found = await asyncio.to_thread(replies.reserved)
            self.plane.setup()
            if not self.tun_adopted:
                self._start_workers(loop)

            # the workers forward from here on; what follows is outside a restart's gap
            self.shed = getattr(self.plane, "shed", None)
            if self.shed is not None:        # SYN shedding before the queue: dataplane.shed
                stack.callback(self.shed.close)
                stack.callback(asyncio.ensure_future(self.shed.run()).cancel)
            self.digests = table_digests(spec, self.balancer.seed)
            if cfg.sync is not None:
                from .sync import FlowSync
                self.sync = FlowSync(self.dp, cfg.sync)
                self.sync.start()
                stack.callback(self.sync.close)

            await self._start_control(stack)
            await self._start_announcer(stack)

            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))

            housekeeping = asyncio.ensure_future(self._housekeeping())
            stack.callback(housekeeping.cancel)

            log.info("ready: %d VIP(s), %d backend(s), %d worker(s), mode %s",
                     len(cfg.vips), cfg.backend_count, cfg.workers, cfg.mode)
            await self._stop.wait()
            log.info("stopping")
            if self.announcer is not None:
                await self.announcer.leave()   # withdraw first, forward through the grace
        if self._worker_error is not None:
            log.error("a worker failed: %s", self._worker_error)
            return 1
        log.info("stopped cleanly")
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _release_replies(self, found: bool, failed: bool) -> None:
        """After the plane's undo: the reply rules and blackholes stay (the next run takes
        them over; until then replies are dropped, not sent un-translated), unless the
        operator asked for a full clean-up on exit, or this run failed to start and found no
        reservation (a first start that fails leaves the gateway as it was)."""
        if not (self.cleanup_on_exit or (failed and not found)):
            if not failed:
                log.info("the reply path stays reserved (policy rules, blackhole routes): "
                         "`lbcore cleanup` removes them")
            return
        try:
            n = replies.remove_all()
            log.info("removed the reply path's %d rule(s) and blackhole route(s)", n)
        except Exception as e:  # noqa: BLE001 - on the way out; `lbcore cleanup` retries
            log.error("removing the reply rules and blackholes failed: %s", e)

    def _start_workers(self, loop: asyncio.AbstractEventLoop) -> None:
        cpus = worker_cpus(self.config.workers, self.config.worker_cpus)
        self._keep_control_off(cpus)
        for i, cpu in enumerate(cpus):
            t = threading.Thread(target=self._run_worker, args=(i, cpu, loop),
                                 name=f"lbcore-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _keep_control_off(self, workers: list[int | None]) -> None:
        """Move every thread of the process (the workers are not started yet) to the CPUs no
        worker takes; threads started later inherit that from the thread that starts them,
        and each worker then pins itself to its own CPU."""
        try:
            rest = control_cpus(os.sched_getaffinity(0), workers)
        except OSError:
            rest = None
        if rest is not None:
            for tid in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError, ValueError):  # a thread may have just ended
                    os.sched_setaffinity(int(tid), rest)
        self.cpus = {"workers": workers, "control": sorted(rest) if rest is not None else None}
        log.info("workers on CPU(s) %s; the control plane on %s",
                 ", ".join("any" if c is None else str(c) for c in workers),
                 "CPU(s) " + ", ".join(map(str, sorted(rest))) if rest is not None
                 else "every CPU (no CPU is left without a worker)")

    def _undo_plane(self, failed: bool) -> None:
        """The plane's undo, after the workers stopped. Tun mode's device stays for the next
        run unless the operator asked for a clean-up on exit, or this run created it and
        failed to start (a first start that fails leaves the gateway as it was)."""
        if self.plane is None:
            return
        if hasattr(self.plane, "remove_device"):
            self.plane.remove_device = (self.cleanup_on_exit
                                        or (failed and not getattr(self.plane, "adopted", True)))
        self.plane.undo()

    def _run_worker(self, i: int, cpu: int | None, loop: asyncio.AbstractEventLoop) -> None:
        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {cpu})   # 0 = this thread
        try:
            assert self.plane is not None
            self.plane.run_worker(i)
        except BaseException as e:  # noqa: BLE001 - reported, then shut down
            self._worker_error = e
            loop.call_soon_threadsafe(self._stop.set)

    def _stop_workers(self) -> None:
        if self.dp is None:
            return
        self.dp.stop()
        for t in self._threads:
            t.join(timeout=5)
            if t.is_alive():
                log.error("%s did not stop", t.name)
        self._threads.clear()

    @staticmethod
    def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    async def _start_control(self, stack: contextlib.AsyncExitStack) -> None:
        """Health checks, then the control socket and metrics."""
        from .control.metrics import start_metrics
        from .control.server import start_control
        from .health import HealthMonitor, targets_from_config
        self.health = HealthMonitor(on_change=self._on_health)
        stack.push_async_callback(self.health.close)
        self.health.update(targets_from_config(self.config))
        await start_control(self, self.view, stack)
        start_metrics(self.config.metrics_listen, self.view, stack)

    async def _start_announcer(self, stack: contextlib.AsyncExitStack) -> None:
        """With [bgp]: the anchor device and BIRD, then the first announcements. Last of the
        start-up, so nothing is announced before the workers forward; first of the way out
        (the stack unwinds in reverse), so the anchor closes before forwarding stops."""
        if self.config.bgp is None:
            return
        from .bgp import Announcer, usable_addresses
        self.announcer = Announcer(self.config.bgp)
        stack.callback(self.announcer.stop)
        await asyncio.to_thread(self.announcer.start)
        assert self.balancer is not None
        self.announcer.update(usable_addresses(self.balancer.vips.values()))

    def drain_gateway(self) -> list[str]:
        """`lbcore drain-gateway`: withdraw every VIP; keep forwarding what still arrives."""
        if self.announcer is None:
            raise ValueError("no [bgp] section: this gateway announces nothing to drain")
        return self.announcer.drain()

    def _on_health(self, key, up: bool, reason: str) -> None:
        """A backend of pool key[0] changed state (after rise/fall): every VIP
        of that pool gets a new table."""
        pool, address, port = key
        assert self.balancer is not None
        changed = False
        for v in self.balancer.vips.values():
            b = v.backends.get((address, port)) if v.pool == pool else None
            if b is not None:
                changed |= self.balancer.set_health(v, b, up, reason)
        if changed:
            asyncio.ensure_future(self._republish_quietly())

    def health_of(self, vip, backend) -> dict:
        """Health-check status of one backend of one VIP, for `status`."""
        if self.health is None:
            return {}
        key = (vip.pool, backend.address, backend.port)
        if key not in self.health:
            return {}
        st = self.health.status(key)
        return {"check": st.check_type, "last_result": st.last_result,
                "last_check_at": st.last_check_at, "successes": st.successes,
                "failures": st.failures}

    async def _housekeeping(self) -> None:
        """Flow expiry every second (a lap of the table, in a worker thread), and of the
        fragment cache (so held fragments of abandoned datagrams free their buffers without
        traffic); table rebuilds while a slow start ramps."""
        last_slow = 0.0
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            await self._expire()
            await asyncio.to_thread(self.dp.frag_expire)
            assert self.balancer is not None
            now = time.monotonic()
            if self._publish_pending or (now - last_slow >= SLOW_START_STEP_S
                                         and self.balancer.in_slow_start()):
                await self._republish_quietly()
                last_slow = now

    async def _expire(self) -> None:
        """One lap of flow expiry; the flows that ended are reported to the peers."""
        while True:
            removed, ended = await asyncio.to_thread(self.dp.expire_flows, _core.now_ms(),
                                                     EXPIRE_BATCH)
            if self.sync is not None:
                self.sync.send(ended, "end", reason="expired")
            if removed < EXPIRE_BATCH:
                return

    # -- changes -------------------------------------------------------------

    async def republish(self) -> None:
        """Publish the balancer's current state (after drain/weight/health/reload).

        The table spec is taken on the event loop (the Python state cannot change under it);
        building the Maglev rings and waiting for the workers to pass a quiescent point run in
        a worker thread, one publish at a time, and so do the flow purges that follow."""
        bal = self.balancer
        assert bal is not None
        async with self._publish_lock:
            spec, purges = bal.table_spec(), bal.take_purges()
            t0 = time.perf_counter()
            try:
                await asyncio.to_thread(self.dp.publish, spec, bal.seed)
            except TimeoutError as e:
                # swapped in; only the old table could not be freed (leaked, not in use)
                log.warning("table published, but %s", e)
            except Exception as e:
                bal.publish_failed(e, purges)
                self._publish_pending = True
                raise PublishError(bal.last_publish_error or str(e)) from e
            self._publish_pending = False
            bal.published(time.perf_counter() - t0)
            self.digests = await asyncio.to_thread(table_digests, spec, bal.seed)
            if self.announcer is not None:
                from .bgp import usable_addresses
                self.announcer.update(usable_addresses(bal.vips.values()))
            if purges:
                await asyncio.to_thread(bal.purge, purges)

    async def _republish_quietly(self) -> None:
        """republish() for changes nobody waits on (health, slow start): a failure is logged
        and counted there, and housekeeping tries again a second later."""
        with contextlib.suppress(PublishError):
            await self.republish()

    async def change(self, mutate: Callable[[], T]) -> T:
        """Apply an operator's change to the balancer as a transaction: ``mutate()`` (which
        validates its arguments before it changes anything), then publish; if either fails
        the balancer goes back to the state of the live table, and the error is raised.
        One change (or reload) at a time."""
        async with self._reload_lock:
            return await self._transaction(mutate)

    async def _transaction(self, mutate: Callable[[], T]) -> T:
        bal = self.balancer
        assert bal is not None
        snap = bal.snapshot()
        try:
            result = mutate()
            await self.republish()
        except BaseException:
            bal.restore(snap)
            self._resync_health()
            raise
        return result

    def _resync_health(self) -> None:
        """After a restore: health transitions reported meanwhile apply to the restored state
        too (the monitor reports only transitions, so they would be lost)."""
        if self.health is None or self.balancer is None:
            return
        for v in self.balancer.vips.values():
            for b in v.backends.values():
                key = (v.pool, b.address, b.port)
                if key in self.health and self.health.state(key) != b.up:
                    self.balancer.set_health(v, b, self.health.state(key),
                                             self.health.status(key).reason)

    async def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config, validate, diff, apply. An invalid config is
        refused with its errors and the running one stays."""
        async with self._reload_lock:
            if not self.config_path:
                return False, ["no config file to reload"]
            try:
                new = load_config(self.config_path)
            except ConfigError as e:
                log.error("reload refused, keeping the running config:\n%s", e)
                return False, list(getattr(e, "errors", [str(e)]))
            problems = _unreloadable(self.config, new)
            if problems:
                log.error("reload refused: %s", "; ".join(problems))
                return False, problems
            assert self.balancer is not None and self.plane is not None
            old_vips, old_replies = [v.address for v in self.config.vips], reply_paths(
                self.balancer)
            snap = self.balancer.snapshot()
            try:
                changes = self.balancer.configure(new)
                new_vips, new_replies = [v.address for v in new.vips], reply_paths(
                    self.balancer)
                # Before the new table: routes of VIPs that go are removed, reply rules of
                # backends that come are added; after it: routes of the VIPs that come, and
                # the rules of backends that went. So no packet reaches a table that lacks
                # its VIP, and no reply of a new backend bypasses the data plane.
                await asyncio.to_thread(self.plane.update,
                                        [a for a in old_vips if a in new_vips],
                                        list(dict.fromkeys(old_replies + new_replies)))
                await self.republish()
            except Exception as e:  # noqa: BLE001 - reported; the running config stays
                # the live table is the old one: so are the state, the routes and the rules
                self.balancer.restore(snap)
                self._resync_health()
                try:
                    await asyncio.to_thread(self.plane.update, old_vips, old_replies)
                except Exception as e2:  # noqa: BLE001 - logged; the next reload retries
                    log.error("reload: restoring the routes and rules failed: %s", e2)
                why = str(e) if isinstance(e, PublishError) else f"{type(e).__name__}: {e}"
                log.error("reload failed, keeping the running config: %s", why)
                return False, [f"applying the new config failed ({why}); the running "
                               "config stays"]
            await asyncio.to_thread(self.plane.update, new_vips, new_replies)
            self.config = new
            if self.dp is not None and self.dp.busy_poll_us != new.busy_poll_us:
                log.info("busy poll window %d -> %d us", self.dp.busy_poll_us,
                         new.busy_poll_us)
                self.dp.busy_poll_us = new.busy_poll_us
            if self.shed is not None:
                from .dataplane.shed import guarded_vips
                self.shed.reconfigure(guarded_vips(new))
            if self.health is not None:
                from .health import targets_from_config
                self.health.update(targets_from_config(new))
            for c in changes:
                log.info("reload: %s", c)
            log.info("reload applied: %d change(s)", len(changes))
            return True, changes


def lock_flow_file(path: str) -> int:
    """Hold path + ".lock" for the life of the process (returns its fd): two
    balancers adopting and writing one flow table file would corrupt it. The
    directory is made root-only if missing (systemd's RuntimeDirectory is)."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RuntimeError(f"another lbcore runs with global.flow_file {path!r}") from None
    return fd


def log_adoption(path: str, res: dict[str, Any]) -> None:
    """Say what was taken over from the last run, or why nothing was."""
    if "refused" in res:
        if res.get("code") == "open" and "No such file" in res["refused"]:
            log.info("flow table: no %s to adopt, starting empty", path)
        else:
            log.warning("flow table: not adopting %s: %s; starting empty", path,
                        res["refused"])
        return
    log.info("flow table: adopted %d flow(s) from %s in %.3f s (skipped: %d expired, "
             "%d of backends or VIPs no longer configured, %d invalid, %d duplicate, "
             "%d over capacity)", res["adopted"], path, res["seconds"], res["expired"],
             res["unbound"], res["invalid"], res["duplicate"], res["full"])


def _unreloadable(old: Config, new: Config) -> list[str]:
    """Settings fixed at start (sizes, devices): changing them needs a restart."""
    out = []
    for key in ("mode", "workers", "worker_cpus", "flow_table_size", "tun_name", "control_socket",
                "rawsock", "bgp", "flow_file", "sync", "timeouts", "fragments", "client_table_size",
                "reject_rate", "reject_burst", "metrics_listen", "log_level"):
        if getattr(old, key) != getattr(new, key):
            where = key if key in ("rawsock", "bgp", "sync") else f"global.{key}"
            out.append(f"{where} changed ({getattr(old, key)!r} -> "
                       f"{getattr(new, key)!r}): needs a restart")
    return out


def cmd_run(args) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"lbcore: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log_level, args.log_json)
    for w in config.warnings:
        log.warning("config: %s", w)
    if os.geteuid() != 0:
        print("lbcore: run needs root (TUN device or AF_PACKET sockets, routes, policy rules)",
              file=sys.stderr)
        return 2
    why = check_worker_cpus(config.worker_cpus, os.sched_getaffinity(0))
    if why is not None:
        print(f"lbcore: {why}", file=sys.stderr)
        return 2
    daemon = Daemon(config, args.config)
    daemon.cleanup_on_exit = bool(getattr(args, "cleanup_on_exit", False))
    try:
        return asyncio.run(daemon.serve())
    except Exception as e:  # noqa: BLE001 - every network change is undone by now
        log.error("lbcore failed: %s", e)
        log.debug("details", exc_info=True)
        return 1


def cmd_cleanup(args) -> int:
    """`lbcore cleanup`: remove what a stopped lbcore leaves on purpose (the reply rules, the
    blackholes of RULE_TABLE and of the VIPs, and in tun mode the persistent TUN with its
    routes), after which the gateway routes the backends' replies and the VIPs normally again.
    Refused while an lbcore answers on the config's control socket (its replies would leave
    un-translated)."""
    from .control.server import _socket_alive
    from .dataplane.tun.device import TunError, remove_persistent
    if os.geteuid() != 0:
        print("lbcore cleanup: needs root (routes and policy rules)", file=sys.stderr)
        return 2
    cfg = None
    if args.config and os.path.exists(args.config):
        try:
            cfg = load_config(args.config)
        except ConfigError:
            pass
    sock = cfg.control_socket if cfg is not None else None
    if sock and _socket_alive(sock):
        print(f"lbcore cleanup: lbcore is running (it answers on {sock}); stop it first",
              file=sys.stderr)
        return 1
    rc = 0
    if cfg is not None and cfg.mode == "tun":
        # first: while the device exists its routes still take the VIPs' packets
        try:
            if remove_persistent(cfg.tun_name):
                print(f"removed TUN device {cfg.tun_name} and its routes")
        except (TunError, ValueError) as e:
            print(f"lbcore cleanup: {e}", file=sys.stderr)
            rc = 1
    if cfg is not None and cfg.mode == "rawsock" and cfg.rawsock is not None:
        # a stop removes them; a crashed run's stay (they drop only what the blackholes would)
        from .dataplane.rawsock import KERNEL_DROP_PREF
        for link in dict.fromkeys([cfg.rawsock.client_link, cfg.rawsock.backend_link]):
            if netconf.ingress_bpf_del(link, pref=KERNEL_DROP_PREF):
                print(f"removed the tc ingress filter on {link}")
    n = replies.remove_all()
    print(f"removed {n} reply rule(s) and blackhole route(s)")
    return rc
