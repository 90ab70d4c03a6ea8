"""The status page and `lbcore top` looked at as an operator would, on the lab.

A real headless Debian chromium, inside lbc-gw (where the listener is, on 127.0.0.1:9150),
opens the page once and keeps it open; the test reads the page's DOM and computed colours over
the DevTools protocol (on a pipe: no port, nothing to download), saves screenshots under
build/artifacts/, stops a backend's servers and watches that backend's rows turn down without
reloading the page. `lbcore top` runs in a tmux server of its own (-L), the test reads its
screen with capture-pane, watches another backend turn down there, and leaves with q and with
Ctrl-C. Where chromium or tmux is missing the test skips and says which (`make test`
installs them).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_monitoring import check_against, exported

from lbcore import lab as lab_mod
from lbcore import netconf
from lbcore.lab.ns import http_requests, udp_requests

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "artifacts"
PAGE = f"http://{lab_mod.METRICS_LISTEN}/"
N = 3
VIPS = 4  # the lab's VIPs: web (tcp 80), dns (udp 5300), sink, source; each on all backends
# health checks: interval 1 s, fall 2 -> down within ~3 s; the page refreshes every second.
# A loaded machine may be slow, so a generous bound: this asserts behaviour, not speed.
DOWN_WITHIN = 30.0
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"not {what} within {timeout:.0f} s (last: {last!r})")


# --------------------------------------------------------------------------- the browser

# Chromium's --remote-debugging-pipe talks on fds 3 (in) and 4 (out); the pipe ends are moved
# there between the namespace switch and chromium's exec.
_ON_FDS_3_4 = """
import os, sys
r, w = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2]))
os.dup2(r, 3)
os.dup2(w, 4)
# dup() may have returned 3 or 4 itself (close-on-exec), and dup2 onto the same fd keeps that
os.set_inheritable(3, True)
os.set_inheritable(4, True)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Browser:
    """Headless chromium in ``netns``, driven over the DevTools protocol on a pipe (messages are
    JSON, each ended by a NUL byte). One page, attached in flat mode."""

    def __init__(self, netns: str, chromium: str, profile: Path, log: Path,
                 size: tuple[int, int] = (1400, 1000)) -> None:
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        argv = [sys.executable, "-c", _ON_FDS_3_4, str(to_r), str(from_w), chromium,
                *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                f"--window-size={size[0]},{size[1]}", "about:blank"]
        with open(log, "ab") as logf:
            self.proc = netconf.popen_in_netns(netns, argv, pass_fds=(to_r, from_w),
                                               stdin=subprocess.DEVNULL, stdout=logf,
                                               stderr=subprocess.STDOUT,
                                               start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, page=False)
            self.session = self.call("Target.attachToTarget", {
                "targetId": target["targetId"], "flatten": True}, page=False)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def call(self, method: str, params: dict | None = None, page: bool = True,
             timeout: float = 30.0) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                m = json.loads(raw)
                if m.get("id") == self._id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m["result"]
                if "method" in m:
                    self.events.append(m)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed its pipe (exit {self.proc.poll()})")
            self._buf += chunk

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        wait_for(lambda: self.js("document.readyState") == "complete", 30, "loaded")

    def screenshot(self, path: Path) -> None:
        """The whole page (beyond the window) as PNG."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        r = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                     "scale": 1}})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))

    def close(self) -> None:
        """Ask chromium to quit; then end its process group (all of it started here)."""
        with contextlib.suppress(Exception):
            self.call("Browser.close", page=False, timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)   # its own session: its helpers only
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        for fd in (self._to, self._from):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def browser(netns: str) -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium missing (Debian package chromium; `make test` installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lbt-chromium-") as profile:
        b = Browser(netns, chromium, Path(profile), ARTIFACTS / "chromium.log")
        try:
            yield b
        finally:
            b.close()


# --------------------------------------------------------------------------- the lab

@pytest.fixture(scope="module")
def lab():
    with lab_mod.lease(backends=N) as state:
        yield state


@pytest.fixture
def traffic(lab):
    """Some flows through the VIPs, so that flows, rates and counters are not all zero."""
    r = http_requests(lab_mod.CLIENT_NS, lab_mod.VIP_V4, n=60)
    assert r["ok"] == 60, r["error_samples"]
    u = udp_requests(lab_mod.CLIENT_NS, lab_mod.VIP_V4, n=60)
    assert u["ok"] > 0


@contextlib.contextmanager
def stopped(i: int) -> Iterator[None]:
    """Backend i's servers stopped for the block, started again after (and back up)."""
    lab_mod.stop_backend(i)
    try:
        yield
    finally:
        lab_mod.start_backend(i)
        sock = str(lab_mod.paths()["control_socket"])
        from lbcore.control import request
        addr = lab_mod.backend_v4(i)
        wait_for(lambda: all(b["state"] == "up" for v in request(sock, {"cmd": "status"})["vips"]
                             for b in v["backends"] if b["address"] == addr), 60, "up again")


ROWS_JS = """Array.from(document.querySelectorAll("tr[data-backend]")).map(r => ({
  vip: r.closest("section").dataset.vip, backend: r.dataset.backend, state: r.dataset.state,
  text: r.innerText, background: getComputedStyle(r).backgroundColor,
  pill: getComputedStyle(r.querySelector(".pill")).backgroundColor}))"""


def rows(b: Browser) -> list[dict]:
    return b.js(ROWS_JS) or []


def test_status_page_in_a_browser(lab, traffic):
    be2 = f"{lab_mod.backend_v4(2)}:"
    with browser(lab_mod.GW_NS) as b:
        b.goto(PAGE)
        # all backends of all VIPs shown, up; the rates appear from the second look on
        got = wait_for(lambda: [r for r in rows(b) if r["state"] == "up"], 30, "rows up")
        assert len(got) == N * VIPS, rows(b)
        assert all("UP" in r["text"] for r in got)
        wait_for(lambda: "Rates over the last" in b.js("document.body.innerText"), 30, "rates")
        text = b.js("document.body.innerText")
        assert "lbcore" in text and "Drops by reason" in text and "Flow table events" in text
        b.screenshot(ARTIFACTS / "status-page.png")

        # the same page, not reloaded, shows a stopped backend's rows down, in red
        b.js("window.lbtMarker = 42")
        with stopped(2):
            def be2_down():
                rs = [r for r in rows(b) if r["backend"].startswith(be2)]
                return len(rs) == VIPS and all(r["state"] == "down" for r in rs) and rs
            down = wait_for(be2_down, DOWN_WITHIN, "backend 2 down on the page")
            assert b.js("window.lbtMarker") == 42, "the page was reloaded, not refreshed"
            for r in down:
                assert "DOWN" in r["text"]
                assert r["pill"] == "rgb(207, 34, 46)"          # red
                assert r["background"] == "rgb(255, 235, 233)"  # light red
            others = [r for r in rows(b) if not r["backend"].startswith(be2)]
            assert others and all(r["state"] == "up" for r in others)
            assert b.js("document.title") == f"lbcore: {VIPS} backends down"
            b.screenshot(ARTIFACTS / "status-page-down.png")

            # the JSON twin says the same, and /metrics has every name the dashboard and the
            # alert rules use (fetched by the page's own origin, inside lbc-gw)
            st = b.js("fetch('/status.json').then(r => r.json())")
            states = {(v["name"], b_["address"]): b_["state"] for v in st["vips"]
                      for b_ in v["backends"]}
            assert {s for (_, a), s in states.items() if a == lab_mod.backend_v4(2)} == {"down"}
            # the lab's single gateway has no [bgp], no [sync], no VIP with a new_flow_rate
            # and runs mode tun: its BGP, flow sync, SYN-shed (with the TUN drops counted
            # beside them) and rawsock series are empty
            check_against(exported(b.js("fetch('/metrics').then(r => r.text())")),
                          absent_ok=("lbcore_bgp_", "lbcore_sync_", "lbcore_shed_",
                                     "lbcore_tun_dropped", "lbcore_rawsock_"))
        # nothing was refused by the page's Content-Security-Policy, no script error
        problems = [e for e in b.events if e.get("method") in ("Log.entryAdded",
                                                               "Runtime.exceptionThrown")
                    and "favicon" not in json.dumps(e)]
        assert problems == []


# --------------------------------------------------------------------------- lbcore top

class Tmux:
    """A tmux server of our own (-L name, a config of its own, no status line)."""

    def __init__(self, name: str, conf: Path) -> None:
        conf.write_text("set -g status off\n")
        self.base = ["tmux", "-L", name, "-f", str(conf)]
        self.env = {**lab_mod.child_env(), "TERM": "xterm-256color"}
        self.server_pid: int | None = None

    def run(self, *args: str) -> str:
        r = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=30,
                           env=self.env)
        assert r.returncode == 0, f"tmux {args}: {r.stderr}"
        return r.stdout

    def start(self, session: str, argv: list[str], size: tuple[int, int] = (150, 45)) -> None:
        self.run("new-session", "-d", "-s", session, "-x", str(size[0]), "-y", str(size[1]),
                 *argv)
        self.server_pid = int(self.run("display-message", "-p", "-t", session, "#{pid}"))

    def screen(self, session: str, ansi: bool = False) -> str:
        return self.run("capture-pane", "-p", *(["-e"] if ansi else []), "-t", session)

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30,
                       env=self.env)
        if self.server_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.server_pid, signal.SIGKILL)


@contextlib.contextmanager
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux missing (Debian package tmux; `make test` installs it)")
    with tempfile.TemporaryDirectory(prefix="lbt-tmux-") as d:
        t = Tmux(f"lbt-top-{os.getpid()}", Path(d) / "tmux.conf")
        try:
            yield t
        finally:
            t.close()


def top_lines(t: Tmux, session: str, backend: str) -> list[str]:
    return [line for line in t.screen(session).splitlines() if f"{backend}:" in line]


def test_lbcore_top_in_tmux(lab, traffic):
    sock = str(lab_mod.paths()["control_socket"])
    be3 = lab_mod.backend_v4(3)
    # the shell prints top's exit status on the terminal once top has given it back, and
    # stays a while so that the screen can be read (the server is killed at the end); its
    # trap keeps it alive through the Ctrl-C that the whole foreground group gets, while top
    # gets SIGINT's default (a trap's handler is not inherited)
    argv = ["sh", "-c", f'trap "true" INT; "$0" -m lbcore top -s {sock}; '
            'echo "top exited with status $?"; sleep 600', sys.executable]
    with tmux() as t:
        t.start("top", argv)
        wait_for(lambda: len(top_lines(t, "top", be3)) == VIPS
                 and all(" UP " in line for line in top_lines(t, "top", be3)), 30, "top shows be3")
        screen = t.screen("top")
        assert "lbcore top" in screen and "usable" in screen and "q quits" in screen
        with stopped(3):
            wait_for(lambda: all(" DOWN " in line for line in top_lines(t, "top", be3)),
                     DOWN_WITHIN, "be3 down in top")
            # the capture (plain and with colours) is kept as an artefact
            wait_for(lambda: "/s" in t.screen("top") and "–" not in t.screen("top"), 10,
                     "rates on screen")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "lbcore-top.txt").write_text(t.screen("top"))
            (ARTIFACTS / "lbcore-top.ansi").write_text(t.screen("top", ansi=True))
        assert re.search(rf"{re.escape(lab_mod.backend_v4(1))}:80\s+UP", t.screen("top"))
        # q leaves cleanly: exit status 0, the terminal's normal screen back (no table on it)
        t.run("send-keys", "-t", "top", "q")
        wait_for(lambda: "top exited with status" in t.screen("top"), 15, "top gone after q")
        assert "top exited with status 0" in t.screen("top")
        assert "VIP / backend" not in t.screen("top")

        # so does Ctrl-C
        t.start("top2", argv)
        wait_for(lambda: "VIP / backend" in t.screen("top2"), 30, "the second top")
        t.run("send-keys", "-t", "top2", "C-c")
        wait_for(lambda: "top exited with status" in t.screen("top2"), 15,
                 "top gone after Ctrl-C")
        assert "top exited with status 0" in t.screen("top2")
        assert "Traceback" not in t.screen("top2") and "VIP / backend" not in t.screen("top2")
