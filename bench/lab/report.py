"""The lab benchmark's report: summary of the samples, the markdown tables, the PNG charts, and
the comparison of two runs.

``python -m bench.lab.report RESULT.json`` re-renders the markdown and charts of a run;
``python -m bench.lab.report --compare OLD.json NEW.json`` prints how every figure moved.
Everything here works on the JSON document alone, so old results can be re-read later.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stats import Summary, ratio, summarize

KERNEL = "kernel"
SENDER = "sender"


def fmt_rate(v: float, unit: str = "") -> str:
    """995123 -> "995k", 1.9e6 -> "1.90M" (three significant digits)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            x = v / div
            s = f"{x:.3g}" if x < 1000 else f"{x:.0f}"
            return f"{s}{suffix}{unit}"
    return f"{v:.3g}{unit}"


def fmt_gbps(v: float) -> str:
    return f"{v:.3g} Gbit/s" if v < 100 else f"{v:.0f} Gbit/s"


def fmt_us(v: float) -> str:
    return f"{v:.0f} µs" if v < 10000 else f"{v / 1000:.1f} ms"


def fmt_pct(v: float) -> str:
    return f"{v:.1f} %"


def fmt_us_fine(v: float) -> str:
    """CPU time per packet: 2.34 µs, 0.87 µs, 12.3 µs."""
    return f"{v:.3g} µs"


def fmt_fraction(v: float) -> str:
    return f"{v:.2f}"


@dataclass(frozen=True)
class Row:
    """One line of the main table: a metric of a workload."""

    workload: str
    metric: str
    label: str
    fmt: Callable[[float], str]
    higher_is_better: bool = True
    show_ratio: bool = True
    unit: str = ""

    def title(self, summary: dict[str, Any] | None = None) -> str:
        """The label, with the sender's ceiling put in where the label asks for it (the
        sender-ceiling row names the figure its fractions are of)."""
        if "{ceiling}" not in self.label:
            return self.label
        s = _summary(summary or {}, SENDER, "udp", "offered_pps")
        return self.label.format(ceiling=(f"{fmt_rate(s.median, ' pps')} ±{100 * s.spread:.0f}%"
                                          if s is not None else "not measured"))


ROWS: tuple[Row, ...] = (
    Row("udp", "delivered_pps", "UDP 64 B, delivered at the backends",
        lambda v: fmt_rate(v, " pps"), unit="packets/s"),
    Row("udp", "offered_pps", "UDP 64 B, offered by the sender", lambda v: fmt_rate(v, " pps"),
        unit="packets/s"),
    Row("udp", "loss_pct", "UDP 64 B, loss", fmt_pct, higher_is_better=False, show_ratio=False,
        unit="%"),
    Row("udp", "cpu_us_per_pkt", "UDP 64 B, forwarder CPU per delivered packet (lower is better)",
        fmt_us_fine, higher_is_better=False, unit="µs"),
    Row("udp", "of_ceiling", "UDP 64 B, delivered / sender ceiling (udpflood alone: {ceiling})",
        fmt_fraction, show_ratio=False, unit="fraction"),
    Row("bulk1", "gbps", "TCP bulk, 1 stream (iperf3)", fmt_gbps, unit="Gbit/s"),
    Row("bulk4", "gbps", "TCP bulk, 4 streams (iperf3)", fmt_gbps, unit="Gbit/s"),
    Row("conn", "cps", "HTTP new connections/s (wrk, Connection: close)", fmt_rate,
        unit="connections/s"),
    Row("keepalive", "rps", "HTTP keep-alive requests/s (wrk)", fmt_rate, unit="requests/s"),
    Row("latency", "p50_us", "latency p50 at ~1k req/s (lower is better)", fmt_us,
        higher_is_better=False, unit="µs"),
    Row("latency", "p99_us", "latency p99 at ~1k req/s (lower is better)", fmt_us,
        higher_is_better=False, unit="µs"),
)

WORKLOAD_LABELS = {
    "udp": "UDP 64 B flood", "bulk1": "TCP bulk, 1 stream", "bulk4": "TCP bulk, 4 streams",
    "conn": "HTTP new connections", "keepalive": "HTTP keep-alive", "latency": "latency cell",
}


# --------------------------------------------------------------------------- summary

def _sender_by_rep(samples: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Per repetition, the sender-alone cell: its rate and the softirq seconds it costs per
    packet sent (the client's side of the link and the drop on entering lbc-gw)."""
    out: dict[int, dict[str, float]] = {}
    for s in samples:
        if s.get("system") != SENDER or s.get("error"):
            continue
        m, cpu = s.get("metrics") or {}, s.get("cpu") or {}
        sent, soft = m.get("sent"), cpu.get("softirq_s")
        d = {"pps": float(m.get("offered_pps") or 0.0)}
        if sent and soft is not None:
            d["cpu_s_per_pkt"] = float(soft) / float(sent)
        out[int(s.get("rep", 0))] = d
    return out


def derived_udp(sample: dict[str, Any], sender: dict[int, dict[str, float]]
                ) -> dict[str, float]:
    """The UDP figures that need the sender-alone cell of the same repetition (or, if that one
    failed, of any): the forwarder's CPU per delivered packet, in µs, and the delivered rate
    as a fraction of the sender's ceiling.

    The forwarder's CPU is its process time (none for kernel forwarding and nftables) plus the
    softirq time of every CPU during the cell, less the softirq time the sender alone costs for
    the packets it sent: the forwarder's work wherever the kernel does it, without the
    sender's system calls or other jobs' processes (whole-machine busy time would count both).
    Less, too, the time lbcore's workers spent busy polling empty queues (cpu "spin_s", its
    lbcore_worker_busy_poll_seconds): idle time spent on latency, not work per packet.
    """
    m, cpu = sample.get("metrics") or {}, sample.get("cpu") or {}
    ref = sender.get(int(sample.get("rep", 0)))
    if ref is None and sender:
        ref = next(iter(sender.values()))
    out: dict[str, float] = {}
    if ref is None:
        return out
    delivered, sent, soft = m.get("delivered"), m.get("sent"), cpu.get("softirq_s")
    if ref.get("pps") and m.get("delivered_pps") is not None:
        out["of_ceiling"] = float(m["delivered_pps"]) / ref["pps"]
    if delivered and sent is not None and soft is not None and "cpu_s_per_pkt" in ref:
        fwd_s = (float(cpu.get("forwarder_s") or 0.0) - float(cpu.get("spin_s") or 0.0)
                 + float(soft) - ref["cpu_s_per_pkt"] * float(sent))
        out["cpu_us_per_pkt"] = max(0.0, fwd_s) / float(delivered) * 1e6
    return out


def summarize_samples(samples: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{system: {workload: {metric: Summary-as-JSON}}} over the repetitions. Samples that
    failed (an "error" key) are left out of the figures and counted under "failed"."""
    values: dict[tuple[str, str, str], list[float]] = {}
    failed: dict[tuple[str, str], int] = {}
    samples = list(samples)
    sender = _sender_by_rep(samples)
    for s in samples:
        key = (s["system"], s["workload"])
        if s.get("error"):
            failed[key] = failed.get(key, 0) + 1
            continue
        flat = dict(s.get("metrics", {}))
        cpu = s.get("cpu") or {}
        if cpu.get("forwarder_pct") is not None:
            flat["forwarder_cpu_pct"] = cpu["forwarder_pct"]
        if cpu.get("spin_s") is not None and cpu.get("wall_s"):
            flat["forwarder_spin_pct"] = 100.0 * float(cpu["spin_s"]) / float(cpu["wall_s"])
        for c, d in (cpu.get("per_cpu") or {}).items():
            flat[f"cpu{c}_busy_pct"] = d.get("busy")
        if s["workload"] == "udp" and s["system"] != SENDER:
            flat.update(derived_udp(s, sender))
        for m, v in flat.items():
            if isinstance(v, int | float):
                values.setdefault((*key, m), []).append(float(v))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (system, workload, metric), vals in values.items():
        sm = summarize(vals)
        if sm is not None:
            out.setdefault(system, {}).setdefault(workload, {})[metric] = sm.to_json()
    for (system, workload), n in failed.items():
        out.setdefault(system, {}).setdefault(workload, {})["failed"] = n
    return out


def _summary(summary: dict[str, Any], system: str, workload: str, metric: str
             ) -> Summary | None:
    d = summary.get(system, {}).get(workload, {}).get(metric)
    if not isinstance(d, dict):
        return None
    return Summary(median=d["median"], lo=d["min"], hi=d["max"], n=d["n"])


# --------------------------------------------------------------------------- markdown

def _cell(row: Row, s: Summary | None, ref: Summary | None, is_ref: bool) -> str:
    if s is None:
        return "–"
    text = row.fmt(s.median)
    if s.n > 1:
        text += f" ±{100 * s.spread:.0f}%"
    if row.show_ratio and not is_ref:
        r = ratio(s.median, ref.median if ref else None)
        if r is not None:
            text += f" (**{r:.2f}x**)"
    return text


def _columns(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(system id, column title, status) of every system but the sender, kernel first.
    Neighbours that were not measured for the same reason ("lbcore rawsock, 1 worker" and
    "..., 2 workers": n/a) share one column ("lbcore rawsock")."""
    systems = doc.get("systems", {})
    order = [k for k in systems if k != SENDER]
    order.sort(key=lambda k: k != KERNEL)
    cols = [(k, systems[k].get("label", k), systems[k].get("status", "ok")) for k in order]
    out: list[tuple[str, str, str]] = []
    for sid, title, status in cols:
        if out and status != "ok" and out[-1][2] == status:
            prev_sid, prev_title, _ = out[-1]
            base = prev_title.split(",")[0]
            if base == title.split(",")[0]:
                out[-1] = (prev_sid, base, status)
                continue
        out.append((sid, title, status))
    return out


# The README's table: the rows a reader asks about first, in that order, and one column per kind
# of system (the 2-worker variants are in the run's own table).
README_ROWS: tuple[tuple[str, str], ...] = (
    ("latency", "p50_us"), ("latency", "p99_us"), ("udp", "delivered_pps"),
    ("udp", "cpu_us_per_pkt"), ("udp", "of_ceiling"), ("bulk1", "gbps"), ("bulk4", "gbps"),
    ("conn", "cps"), ("keepalive", "rps"),
)
README_SYSTEMS = ("kernel", "nftables", "haproxy", "lbcore-tun-1w", "lbcore-rawsock-1w")


def markdown_table(doc: dict[str, Any], rows: Sequence[Row] | None = None,
                   systems: Sequence[str] | None = None) -> str:
    """The main table: every figure (median ±half-range of the repetitions) and, in bold, its
    ratio to kernel forwarding measured in the same run. ``rows`` and ``systems`` narrow it
    (the README's table)."""
    summary = doc["summary"]
    cols = _columns(doc)
    if systems is not None:
        cols = [c for c in cols if c[0] in systems]
    workloads = set(doc.get("settings", {}).get("workloads", []))
    head = "| workload | " + " | ".join(title for _, title, _ in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for row in ROWS if rows is None else rows:
        if workloads and row.workload not in workloads:
            continue
        ref = _summary(summary, KERNEL, row.workload, row.metric)
        cells = []
        for sid, _, status in cols:
            if status != "ok":
                cells.append(status)
                continue
            s = _summary(summary, sid, row.workload, row.metric)
            if s is None and row.workload == "udp" and sid == "haproxy":
                cells.append("n/a (TCP only)")
                continue
            only = doc.get("systems", {}).get(sid, {}).get("only")
            if s is None and only and row.workload not in only:
                cells.append("–")
                continue
            cells.append(_cell(row, s, ref, sid == KERNEL))
        lines.append(f"| {row.title(summary)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(doc: dict[str, Any]) -> str:
    """The table of the top-level README, from a run: README_ROWS for README_SYSTEMS."""
    by_key = {(r.workload, r.metric): r for r in ROWS}
    return markdown_table(doc, [by_key[k] for k in README_ROWS], README_SYSTEMS)


def cpu_table(doc: dict[str, Any]) -> str:
    """Forwarder CPU per cell: the forwarder's process time (lbcore, HAProxy) or the softirq time
    of CPU 1 (kernel forwarding, nftables), in % of one core; then busy % of CPU 0 / CPU 1, and
    for lbcore the share of a core its workers spent busy polling empty queues."""
    summary = doc["summary"]
    cols = _columns(doc)
    workloads = [w for w in doc.get("settings", {}).get("workloads", WORKLOAD_LABELS)
                 if w in WORKLOAD_LABELS]
    lines = ["| workload | " + " | ".join(t for _, t, _ in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for w in workloads:
        cells = []
        for sid, _, status in cols:
            f = _summary(summary, sid, w, "forwarder_cpu_pct")
            c0 = _summary(summary, sid, w, "cpu0_busy_pct")
            c1 = _summary(summary, sid, w, "cpu1_busy_pct")
            sp = _summary(summary, sid, w, "forwarder_spin_pct")
            if status != "ok" or f is None:
                cells.append("–")
                continue
            busy = (f" ({c0.median:.0f} / {c1.median:.0f})" if c0 and c1 else "")
            poll = f", {sp.median:.0f} % polling" if sp is not None else ""
            cells.append(f"{f.median:.0f} %{busy}{poll}")
        lines.append(f"| {WORKLOAD_LABELS[w]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sender_line(doc: dict[str, Any]) -> str | None:
    """The sender's own ceiling (kernel forwarding is bounded by it, not by the gateway), and
    which systems reached ~90 % of it."""
    summary = doc["summary"]
    s = _summary(summary, SENDER, "udp", "offered_pps")
    if s is None:
        return None
    bound = []
    for sid, title, status in _columns(doc):
        d = _summary(summary, sid, "udp", "delivered_pps")
        if status == "ok" and d is not None and d.median >= 0.9 * s.median:
            bound.append(title)
    text = (f"Sender ceiling: udpflood alone (same core, same flows, to an address lbc-gw drops "
            f"on arrival) sends {fmt_rate(s.median, ' pps')} ±{100 * s.spread:.0f}%.")
    if bound:
        text += (" Delivered within 10 % of that, so bounded by the sender rather than the "
                 "forwarder: " + ", ".join(bound) + ".")
    return text


def wakeprobe_line(doc: dict[str, Any]) -> str | None:
    """What the machine costs a forwarder with a core of its own (bench/lab/wakeprobe.c, once
    per repetition before its labs): medians over the repetitions."""
    runs = [r for r in doc.get("wakeprobe", []) if "error" not in r]
    if not runs:
        return None

    def med(k: str) -> float:
        return statistics.median(float(r[k]) for r in runs)

    gen = doc.get("settings", {}).get("gen_cpu", 0)
    fwd = doc.get("settings", {}).get("fwd_cpu", 1)
    return (f"The machine (wakeprobe, {len(runs)} run(s), medians): a thread on the idle CPU "
            f"{fwd} woken by CPU {gen} runs after p50 {med('wake_p50_us'):.0f} µs, "
            f"p99 {med('wake_p99_us'):.0f} µs; a thread spinning on CPU {fwd} loses "
            f"{med('stall_ms_per_s'):.1f} ms per second to stalls over 100 µs "
            f"({med('stalls_over_1ms_per_s'):.1f} per second over 1 ms). A forwarder with a core "
            "of its own pays that wake-up on the first packet after a pause, once each way of a "
            "request, and holds whatever arrives during a stall; kernel forwarding stays on the "
            "sender's CPU and pays neither. That is the latency cell's floor for lbcore and "
            "HAProxy, unless the forwarder polls instead of sleeping (the busy_poll_us columns).")


def error_lines(doc: dict[str, Any]) -> list[str]:
    """Failed cells and HTTP errors, one line each (a table must not hide them)."""
    out = []
    for le in doc.get("lab_errors", []):
        lines = [x.strip() for x in str(le.get("error", "")).strip().splitlines() if x.strip()]
        text = lines[0] if lines else "?"
        if len(lines) > 1:
            text += f" … {lines[-1]}"      # the end of a log says why
        out.append(f"- lab for {le.get('group')}, repetition {le.get('rep', 0) + 1}: {text}")
    for sid, wl in doc["summary"].items():
        for w, metrics in wl.items():
            if metrics.get("failed"):
                out.append(f"- {sid} / {w}: {metrics['failed']} repetition(s) failed "
                           "(see samples[].error in the JSON)")
            e = metrics.get("errors")
            if isinstance(e, dict) and e.get("max", 0) > 0:
                out.append(f"- {sid} / {w}: up to {e['max']:.0f} HTTP errors per repetition "
                           f"(median {e['median']:.0f}; socket errors + non-2xx)")
    return out


def _busy(per_cpu: dict[str, float] | None) -> str:
    if not per_cpu:
        return "?"
    return ", ".join(f"CPU {c} {v:.0f} %" for c, v in sorted(per_cpu.items()))


def render_markdown(doc: dict[str, Any]) -> str:
    """The whole markdown report of a run."""
    m = doc.get("machine", {})
    st = doc.get("settings", {})
    lines = [
        f"# Lab benchmark, {doc.get('started', '?')}",
        "",
        f"Command: `{doc.get('command', '?')}`  ",
        f"Machine: {m.get('nproc', '?')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('mem_gib', '?')} GiB, Linux {m.get('kernel', '?')}; "
        f"lbcore {m.get('lbcore_commit', '?')}; load average at start {m.get('loadavg', '?')}, "
        f"busy before the run (other jobs): {_busy(m.get('background_busy_pct'))}.  ",
        f"Repetitions: {st.get('reps', '?')} per cell, {st.get('seconds', '?')} s each, "
        "interleaved across systems; medians, ± half the range of the repetitions, "
        "**ratio to kernel forwarding in the same run**.",
        "",
        markdown_table(doc),
        "",
    ]
    sl = sender_line(doc)
    if sl:
        lines += [sl, ""]
    wl = wakeprobe_line(doc)
    if wl:
        lines += [wl, ""]
    if doc.get("interrupted"):
        lines += ["**This run was interrupted: partial results.**", ""]
    lines += ["Forwarder CPU, % of one core (in brackets: busy % of CPU 0 / CPU 1; for lbcore, "
              "the share of a core its workers spent busy polling empty queues):", "",
              cpu_table(doc), ""]
    errs = error_lines(doc)
    if errs:
        lines += ["Errors:", "", *errs, ""]
    notes = st.get("notes", [])
    if notes:
        lines += ["How it was measured:", "", *[f"- {n}" for n in notes], ""]
    versions = m.get("versions", {})
    if versions:
        lines += ["Versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- charts

def render_charts(doc: dict[str, Any], stem: Path) -> list[Path]:
    """Two PNGs beside ``stem``: ratios to kernel forwarding, and the absolute figures with
    their min..max range. Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    cols = [(sid, t) for sid, t, st in _columns(doc) if st == "ok"]
    color = {sid: f"C{i}" for i, (sid, _) in enumerate(cols)}   # one colour per system
    rows = [r for r in ROWS if any(_summary(summary, sid, r.workload, r.metric)
                                   for sid, _ in cols)]
    written = []

    # 1. throughput as ratios to kernel forwarding (latency is in the absolute chart: a 7x
    #    p99 would squash every other bar)
    ratio_rows = [r for r in rows if r.show_ratio and r.higher_is_better
                  and r.metric != "offered_pps"]
    others = [(sid, t) for sid, t in cols if sid != KERNEL
              and any(_summary(summary, sid, r.workload, r.metric) for r in ratio_rows)]
    if ratio_rows and others:
        fig, ax = plt.subplots(figsize=(11, 1.4 + 0.32 * len(ratio_rows) * len(others)))
        height = 0.8 / len(others)
        for j, (sid, title) in enumerate(others):
            ys, xs, lo, hi = [], [], [], []
            for i, r in enumerate(ratio_rows):
                ref = _summary(summary, KERNEL, r.workload, r.metric)
                s = _summary(summary, sid, r.workload, r.metric)
                if s is None or ref is None or ref.median == 0:
                    continue
                v = s.median / ref.median
                ys.append(i + j * height)
                xs.append(v)
                lo.append(max(0.0, v - s.lo / ref.median))
                hi.append(max(0.0, s.hi / ref.median - v))
            ax.barh(ys, xs, height=height, xerr=[lo, hi], label=title, capsize=2,
                    color=color[sid])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([i + height * (len(others) - 1) / 2 for i in range(len(ratio_rows))])
        ax.set_yticklabels([r.title(summary) for r in ratio_rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ratio to kernel forwarding in the same run (higher is better; "
                      "whiskers: min..max)", fontsize=9)
        ax.set_title("lbcore lab benchmark: throughput relative to kernel forwarding")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        p = stem.with_name(stem.name + "-ratios.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    # 2. absolute figures, one panel per row
    if rows and cols:
        n = len(rows)
        ncols = 3
        nrows = (n + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(13, 3.1 * nrows), squeeze=False)
        for k, r in enumerate(rows):
            ax = axes[k // ncols][k % ncols]
            names, vals, lo, hi, colors = [], [], [], [], []
            for sid, title in cols:
                s = _summary(summary, sid, r.workload, r.metric)
                if s is None:
                    continue
                names.append(title)
                vals.append(s.median)
                lo.append(s.median - s.lo)
                hi.append(s.hi - s.median)
                colors.append(color[sid])
            ax.bar(range(len(vals)), vals, yerr=[lo, hi], capsize=3, color=colors)
            ax.set_xticks(range(len(vals)))
            ax.set_xticklabels(names, rotation=25, ha="right", fontsize=7)
            ax.set_title(textwrap.fill(r.title(summary), 50), fontsize=9)   # no overlap
            ax.set_ylabel(r.unit, fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        for k in range(n, nrows * ncols):
            axes[k // ncols][k % ncols].axis("off")
        fig.suptitle("lbcore lab benchmark: medians; whiskers span min..max of the repetitions")
        fig.tight_layout()
        p = stem.with_name(stem.name + "-absolute.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


# --------------------------------------------------------------------------- compare

def compare(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Markdown: for every row and system in both runs, the ratio to kernel forwarding in each
    run (the figure to compare across machines and days), and new/old of the raw medians."""
    lines = ["| workload | system | old (x kernel) | new (x kernel) | new/old raw |",
             "|---|---|---|---|---|"]
    systems = [k for k in new.get("systems", {}) if k in old.get("systems", {}) and k != SENDER]
    for row in ROWS:
        for sid in systems:
            o = _summary(old["summary"], sid, row.workload, row.metric)
            n = _summary(new["summary"], sid, row.workload, row.metric)
            if o is None or n is None:
                continue
            ok = _summary(old["summary"], KERNEL, row.workload, row.metric)
            nk = _summary(new["summary"], KERNEL, row.workload, row.metric)
            ro = ratio(o.median, ok.median if ok else None)
            rn = ratio(n.median, nk.median if nk else None)
            raw = ratio(n.median, o.median)
            lines.append(
                f"| {row.title()} | {sid} | {row.fmt(o.median)}"
                f"{f' ({ro:.2f}x)' if ro is not None and sid != KERNEL else ''} | "
                f"{row.fmt(n.median)}{f' ({rn:.2f}x)' if rn is not None and sid != KERNEL else ''}"
                f" | {f'{raw:.2f}' if raw is not None else '–'} |")
    return "\n".join(lines)


def write_outputs(doc: dict[str, Any], stem: Path) -> list[Path]:
    """JSON, markdown and charts of a run, named after ``stem`` (no suffix)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc["summary"] = summarize_samples(doc.get("samples", []))
    pj = stem.with_suffix(".json")
    pj.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    pm = stem.with_suffix(".md")
    pm.write_text(render_markdown(doc))
    written = [pj, pm]
    try:
        written += render_charts(doc, stem)
    except ImportError as e:  # matplotlib missing: the figures are still in JSON and markdown
        print(f"bench-lab: no charts ({e}); `pip install -e .[bench]` adds matplotlib",
              file=sys.stderr)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lab.report",
                                description="Re-render or compare lab benchmark results.")
    p.add_argument("result", nargs="?", help="a result JSON to re-render (markdown + PNG)")
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two results")
    p.add_argument("--readme", action="store_true",
                   help="print the README's table of the result instead of re-rendering it")
    a = p.parse_args(argv)
    if a.compare:
        old, new = (json.loads(Path(x).read_text()) for x in a.compare)
        print(compare(old, new))
        return 0
    if not a.result:
        p.error("give a result JSON or --compare OLD NEW")
    path = Path(a.result)
    doc = json.loads(path.read_text())
    if a.readme:
        doc["summary"] = summarize_samples(doc.get("samples", []))
        print(readme_table(doc))
        return 0
    for w in write_outputs(doc, path.with_suffix("")):
        print(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
