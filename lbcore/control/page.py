"""The status page: one snapshot of :class:`~lbcore.control.status.StatusView` as an HTML page.

The page is rendered here, in Python, from the same snapshot as `/status.json`, and it keeps
itself fresh with a few lines of inline JavaScript that fetch the page again every second and
swap its content in place (with JavaScript off, a ``<noscript>`` meta refresh reloads it every
few seconds). So there is one renderer, not a Python one and a JavaScript one to keep in step,
and the rates it shows are the StatusView's (see :mod:`.status`), the same as `lbcore top`'s.

The page is self-contained: its style and script are inline, it loads nothing else (a gateway
has no internet), and the server sends a Content-Security-Policy that allows exactly these
inline blocks (by hash) and requests to this origin, so a browser would refuse anything more.
Everything taken from the snapshot is escaped: backend reasons carry error messages.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from collections.abc import Sequence
from typing import Any

from .fmt import (
    Line,
    backend_state,
    clock,
    dataplane_lines,
    duration,
    hostport,
    si,
    vip_title,
    worst,
)

REFRESH_MS = 1000        # the page fetches itself this often
NOSCRIPT_REFRESH_S = 5   # without JavaScript, a full reload this often

STYLE = """
:root { --up:#1a7f37; --up-bg:#dafbe1; --down:#cf222e; --down-bg:#ffebe9; --drain:#9a6700;
  --drain-bg:#fff8c5; --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --head:#f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
  background: #fff; }
header { display: flex; flex-wrap: wrap; gap: .3em 1.5em; align-items: baseline;
  padding: .6em 1.2em; background: #24292f; color: #fff; }
header h1 { margin: 0; font-size: 1.3em; }
header .meta { color: #d0d7de; }
#live { margin-left: auto; font-variant-numeric: tabular-nums; }
#live::before { content: "\\25CF  "; color: #3fb950; }
body.stale #live::before { color: #f85149; }
body.stale #live { color: #ffb3ad; font-weight: 600; }
main { padding: .8em 1.2em 2em; }
.cards { display: flex; flex-wrap: wrap; gap: .8em; margin-bottom: 1em; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .4em .8em; min-width: 9em; }
.card .k { color: var(--muted); font-size: .85em; }
.card .v { font-size: 1.25em; font-weight: 600; font-variant-numeric: tabular-nums; }
.card.bad { border-color: var(--down); background: var(--down-bg); }
.card.warn { border-color: var(--drain); background: var(--drain-bg); }
progress { width: 100%; height: .7em; }
section.vip { margin: 1.2em 0; }
h2 { font-size: 1.1em; margin: 0 0 .3em; display: flex; flex-wrap: wrap; gap: .2em .8em;
  align-items: baseline; }
h2 small { color: var(--muted); font-weight: normal; font-size: .9em; }
h3 { font-size: 1em; margin: 1.2em 0 .3em; }
.vipline { color: var(--muted); margin-bottom: .3em; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid var(--line); padding: .25em .6em; text-align: left;
  white-space: nowrap; }
th { background: var(--head); font-weight: 600; font-size: .9em; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.reason { white-space: normal; }
/* the same columns in every VIP's table, so that the tables line up */
table.backends { table-layout: fixed; }
.backends th:nth-child(1) { width: 15%; } .backends th:nth-child(2) { width: 8%; }
.backends th:nth-child(3) { width: 13%; } .backends th:nth-child(4) { width: 15%; }
.backends th:nth-child(5) { width: 5%; } .backends th:nth-child(6) { width: 8%; }
.backends th:nth-child(7) { width: 6%; } .backends th:nth-child(8) { width: 7%; }
.backends th:nth-child(9) { width: 7%; } .backends th:nth-child(10) { width: 8%; }
.backends td { overflow: hidden; text-overflow: ellipsis; }
tr.state-up td:first-child { border-left: 5px solid var(--up); }
tr.state-down td:first-child { border-left: 5px solid var(--down); }
tr.state-draining td:first-child { border-left: 5px solid var(--drain); }
tr.state-down { background: var(--down-bg); }
tr.state-draining { background: var(--drain-bg); }
.pill { display: inline-block; min-width: 4.8em; text-align: center; border-radius: 1em;
  padding: 0 .6em; font-weight: 700; font-size: .85em; letter-spacing: .03em; }
.pill.up { background: var(--up); color: #fff; }
.pill.down { background: var(--down); color: #fff; }
.pill.draining { background: var(--drain); color: #fff; }
.badge { border-radius: 1em; padding: 0 .6em; font-size: .85em; font-weight: 600; }
.badge.ok { background: var(--up-bg); color: var(--up); }
.badge.bad { background: var(--down); color: #fff; }
.muted, .zero { color: var(--muted); }
section.dataplane ul { list-style: none; margin: 0; padding: 0; }
section.dataplane ul ul { padding-left: 1.5em; }
section.dataplane li { padding: .15em .6em; border-bottom: 1px solid var(--line);
  border-left: 5px solid transparent; font-variant-numeric: tabular-nums; }
section.dataplane ul ul li { border-bottom: 0; }
section.dataplane li.warn { border-left-color: var(--drain); background: var(--drain-bg); }
section.dataplane li.bad { border-left-color: var(--down); background: var(--down-bg); }
section.dataplane span.ok { color: var(--up); font-weight: 600; }
section.dataplane span.warn { color: var(--drain); font-weight: 600; }
section.dataplane span.bad { color: var(--down); font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(22em, 1fr)); gap: 0 2em; }
footer { color: var(--muted); padding: 0 1.2em 1.5em; }
footer a { color: inherit; }
"""

SCRIPT = """
(function () {
  "use strict";
  var live = document.getElementById("live");
  var lastGood = Date.now();
  function stale(why) {
    document.body.classList.add("stale");
    var secs = Math.round((Date.now() - lastGood) / 1000);
    live.textContent = "no answer for " + secs + " s (" + why + "); retrying";
  }
  function tick() {
    fetch(location.pathname, {cache: "no-store"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (text) {
      var doc = new DOMParser().parseFromString(text, "text/html");
      ["meta", "content", "live"].forEach(function (id) {
        var fresh = doc.getElementById(id), old = document.getElementById(id);
        if (fresh && old) { old.replaceWith(fresh); }
      });
      live = document.getElementById("live");
      document.title = doc.title;
      document.body.classList.remove("stale");
      lastGood = Date.now();
    }).catch(function (e) { stale(e.message || String(e)); })
      .finally(function () { setTimeout(tick, REFRESH_MS); });
  }
  setTimeout(tick, REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_MS))


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# What the page may load: nothing but its own inline style and script (by hash) and fetches of
# this origin. A browser enforces it, so an accidental external reference fails loudly.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SCRIPT)}; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def esc(x: object) -> str:
    return html.escape(str(x), quote=True)


# --------------------------------------------------------------------------- rendering

def _card(key: str, value: str, extra: str = "", cls: str = "") -> str:
    return (f'<div class="card {cls}"><div class="k">{esc(key)}</div>'
            f'<div class="v">{value}</div>{extra}</div>')


def _summary(s: dict[str, Any]) -> str:
    f, r = s["flows"], s["rates"]
    rt = r["totals"]
    fill = f["active"] / f["capacity"] if f["capacity"] else 0.0
    bes = [b for v in s["vips"] for b in v["backends"]]
    n_up = sum(1 for b in bes if backend_state(b) == "up")
    empty_vips = [v for v in s["vips"] if not v["usable_backends"]]
    drop_rate = sum(x for x in r["drops"].values() if x) if r["interval"] else None
    return "".join([
        '<div class="cards">',
        _card("flow table", f"{f['active']:,} / {f['capacity']:,} ({fill:.1%})",
              f'<progress max="{f["capacity"]}" value="{f["active"]}"></progress>',
              "bad" if fill >= 0.9 else "warn" if fill >= 0.75 else ""),
        _card("packets in / out", f"{si(rt['rx'], '/s')} · {si(rt['tx'], '/s')}"),
        _card("bytes in / out", f"{si(rt['rx_bytes'], 'B/s')} · {si(rt['tx_bytes'], 'B/s')}"),
        _card("new flows", si(rt["flow_new"], "/s")),
        _card("drops", si(drop_rate, "/s"), cls="warn" if drop_rate else ""),
        _card("backends up", f"{n_up} / {len(bes)}",
              cls="bad" if n_up < len(bes) else ""),
        _card("VIPs with no usable backend", str(len(empty_vips)),
              cls="bad" if empty_vips else ""),
        "</div>",
    ])


def _backend_row(b: dict[str, Any], now: float) -> str:
    st = backend_state(b)
    hp = hostport(b["address"], b["port"])
    r = b["rates"]
    pills = f'<span class="pill {st}">{st.upper()}</span>'
    if st == "down" and b["draining"]:
        pills += ' <span class="pill draining">DRAINING</span>'
    ramp = b["effective_weight"] < b["weight"] and st == "up"
    h = b.get("health") or {}
    check = esc(h.get("check") or "none")
    if h.get("last_check_at"):
        check += f' <span class="muted">{esc(duration(now - h["last_check_at"]))} ago</span>'
    return (
        f'<tr class="be state-{st}" data-backend="{esc(hp)}" data-state="{st}">'
        f"<td>{esc(hp)}</td><td>{pills}</td>"
        f'<td title="{esc(clock(b["last_change"], now))}">{esc(clock(b["last_change"], now))} '
        f'<span class="muted">({esc(duration(now - b["last_change"]))} ago)</span></td>'
        f'<td class="reason">{esc(b["reason"])}</td>'
        f'<td class="n">{b["weight"]}</td>'
        f'<td class="n">{b["effective_weight"]}{RAMP if ramp else ""}</td>'
        f'<td class="n">{si(b["active_flows"])}</td><td class="n">{si(r["new_flows"], "/s")}</td>'
        f'<td class="n">{si(r["packets"], "/s")}</td><td class="n">{si(r["bytes"], "B/s")}</td>'
        f"<td>{check}</td></tr>"
    )


RAMP = ' <span class="muted">(slow start)</span>'
BACKEND_COLUMNS = (("backend", ""), ("state", ""), ("last change", ""), ("reason", ""),
                   ("weight", "n"), ("effective", "n"), ("flows", "n"), ("new flows", "n"),
                   ("packets", "n"), ("bytes", "n"), ("health check", ""))


def _vip(v: dict[str, Any], now: float) -> str:
    n, u = len(v["backends"]), v["usable_backends"]
    r = v["rates"]
    name, where = vip_title(v)
    badge = (f'<span class="badge {"ok" if u else "bad"}">{u} of {n} backends usable</span>')
    head = "".join(f'<th class="{c}">{esc(t)}</th>' for t, c in BACKEND_COLUMNS)
    rows = "".join(_backend_row(b, now) for b in v["backends"])
    return (
        f'<section class="vip" data-vip="{esc(v["name"])}">'
        f'<h2>{esc(name or where)} <small>{esc(where + " · " if name else "")}pool '
        f'{esc(v["pool"])}</small> {badge}</h2>'
        f'<div class="vipline">{si(v["active_flows"])} flows · {si(r["new_flows"])} new/s · '
        f'{si(r["packets"])} packets/s · {si(r["bytes"], "B/s")} · '
        f'{si(v["packets"])} packets, {si(v["bytes"], "B")} in all</div>'
        f'<table class="backends"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        "</section>"
    )


def _counter_table(title: str, what: str, counts: dict[str, int],
                   rates: dict[str, float | None]) -> str:
    """A table of counters with their rates; each row carries data-<what>="<name>"."""
    rows = "".join(
        f'<tr data-{what}="{esc(k)}" class="{"" if n else "zero"}"><td>{esc(k)}</td>'
        f'<td class="n">{si(n)}</td><td class="n">{si(rates.get(k), "/s")}</td></tr>'
        for k, n in counts.items())
    return (f"<div><h3>{esc(title)}</h3><table><thead><tr><th>{esc(what)}</th>"
            f'<th class="n">total</th><th class="n">rate</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def _value(x: Any) -> str:
    if isinstance(x, dict | list):
        return esc(json.dumps(x, default=str))
    return esc(x)


def _bgp(bgp: Any) -> str:
    """The "bgp" part of a snapshot, shown as it comes: a list of dicts as a table (one row
    each), a dict of dicts likewise (keyed), anything else as key/value lines."""
    out = ['<section class="bgp"><h3>BGP</h3>']
    rows: list[dict[str, Any]] = []
    if isinstance(bgp, list) and all(isinstance(x, dict) for x in bgp):
        rows = bgp
    elif isinstance(bgp, dict) and bgp and all(isinstance(x, dict) for x in bgp.values()):
        rows = [{"name": k, **x} for k, x in bgp.items()]
    if rows:
        cols = list(dict.fromkeys(k for row in rows for k in row))
        out.append("<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols)
                   + "</tr></thead><tbody>")
        for row in rows:
            out.append("<tr>" + "".join(f"<td>{_value(row.get(c, ''))}</td>" for c in cols)
                       + "</tr>")
        out.append("</tbody></table>")
    elif isinstance(bgp, dict):
        out.append("<table><tbody>" + "".join(
            f"<tr><th>{esc(k)}</th><td>{_value(x)}</td></tr>" for k, x in bgp.items())
            + "</tbody></table>")
    else:
        out.append(f"<p>{_value(bgp)}</p>")
    out.append("</section>")
    return "".join(out)


def _line(line: Line) -> str:
    """One shared data plane line (see .fmt) as HTML: a piece with a level is a span of that
    class (the same "ok", "warn", "bad" the terminal colours)."""
    return "".join(f'<span class="{lvl}">{esc(t)}</span>' if lvl else esc(t)
                   for t, lvl in line)


def _item(line: Line, rest: Sequence[Line] = (), part: str = "") -> str:
    """A list item for ``line``, marked with its worst level and (a top-level one) with the
    snapshot's key it shows; ``rest`` nested under it."""
    lvl = worst(line)
    sub = ("<ul>" + "".join(_item(x) for x in rest) + "</ul>") if rest else ""
    attrs = (f' data-part="{esc(part)}"' if part else "") + (
        f' class="{lvl}"' if lvl in ("warn", "bad") else "")
    return f"<li{attrs}>{_line(line)}{sub}</li>"


def _dataplane(s: dict[str, Any], now: float) -> str:
    """The data plane's state beyond its counters (I/O path, busy polling, rawsock's kernel
    copies, fragments, flow continuity, SYN shedding), worded and judged as `lbcore status`
    does; empty when the snapshot has none of it. A part with several lines (the shed filter
    and its VIPs) nests the later ones under the first."""
    parts = dataplane_lines(s, now)
    if not parts:
        return ""
    items = "".join(_item(first, rest, part) for part, (first, *rest) in parts)
    return f'<section class="dataplane"><h3>Data plane</h3><ul>{items}</ul></section>'


def render(s: dict[str, Any]) -> str:
    """The whole page for snapshot ``s``."""
    now = s.get("time", time.time())
    f = s["flows"]
    events = {k: x for k, x in f.items() if k not in ("active", "capacity")}
    down = sum(1 for v in s["vips"] for b in v["backends"] if backend_state(b) == "down")
    title = f"lbcore: {down} backend{'s' if down != 1 else ''} down" if down else "lbcore: all up"
    rates = s["rates"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f'<noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH_S}"></noscript>',
        f"<style>{STYLE}</style></head><body>",
        "<header><h1>lbcore</h1>",
        f'<span class="meta" id="meta">{esc(s["version"])} · pid {s["pid"]} · mode '
        f'{esc(s["mode"])} · {s["workers"]} worker{"s" if s["workers"] != 1 else ""} · up '
        f'{esc(duration(s["uptime"]))}{esc(" · " + s["config"] if s["config"] else "")}</span>',
        f'<span id="live">updated {esc(clock(now, now))}</span></header>',
        '<main id="content">',
        _summary(s),
    ]
    parts += [_vip(v, now) for v in s["vips"]]
    if not s["vips"]:
        parts.append('<p class="muted">No VIPs configured.</p>')
    if s.get("bgp"):        # None without a [bgp] section
        parts.append(_bgp(s["bgp"]))
    if dp := _dataplane(s, now):
        parts.append(dp)
    parts.append('<div class="grid">')
    parts.append(_counter_table("Drops by reason", "reason", s["drops"], rates["drops"]))
    parts.append(_counter_table("Flow table events", "event", events, rates["flows"]))
    parts.append(_counter_table("Data plane totals", "counter", s["totals"], rates["totals"]))
    parts.append("</div>")
    build_s = s["table"].get("last_build_seconds")
    build = "" if build_s is None else f" (the last took {build_s * 1000:.1f} ms)"
    interval = ("Rates appear from the second look on." if rates["interval"] is None
                else f"Rates over the last {rates['interval']:.1f} s.")
    parts.append(f'<p class="muted">Flow table: {f["active"]} of {f["capacity"]} entries. '
                 f'Maglev tables built: {s["table"]["rebuilds"]}{esc(build)}. {interval}</p>')
    parts.append("</main>")
    parts.append('<footer>Read-only. The same data: <a href="status.json">status.json</a> · '
                 '<a href="metrics">metrics</a> (Prometheus) · <code>lbcore status</code> · '
                 "<code>lbcore top</code></footer>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)
