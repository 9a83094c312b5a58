"""The bench's table and summary line: its rows, the goals, and how they are printed."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from loadtest.common import machine

GOALS = {  # issue 16
    "library/raw": (0.9, ">="),
    "http/bare": (0.6, ">="),
    "library/pg": (30.0, ">="),
    "bytes/reservation": (250, "<="),
    "reaper/s": (50_000, ">="),
    "writer/s": (50_000, ">="),
    "cluster/standalone": (0.8, ">="),
    "soldout/bare": (0.8, ">="),
    "locations/plain": (0.8, ">="),  # issue 24
    "overload_p99/capacity_p99": (3.0, "<="),
    "goodput_4x/capacity": (0.9, ">="),  # issue 23
    "request_layer_us": (10.0, "<="),
    "ratelimit_us": (2.0, "<="),  # no goal in the issue: a fifth of the layer's budget
    "cluster_cpu/standalone_cpu": (1.5, "<="),  # issue 23: the worse of 1- and 2-item
    "hot_sku_cluster/standalone": (0.8, ">="),  # issue 22
    "busiest_master_share": (0.40, "<="),
    "calls_per_hot_order": (1.1, "<="),
}
# the summary line's keys, in order, and how each is printed
SUMMARY = {
    "library/raw": "{:.2f}", "http/bare": "{:.2f}", "library/pg": "{:.1f}",
    "bytes/reservation": "{:.0f}", "reaper/s": "{:.0f}", "writer/s": "{:.0f}",
    "cluster/standalone": "{:.2f}", "soldout/bare": "{:.2f}",
    "overload_p99/capacity_p99": "{:.2f}", "goodput_4x/capacity": "{:.2f}",
    "request_layer_us": "{:.1f}", "ratelimit_us": "{:.1f}",
    "cluster_cpu/standalone_cpu": "{:.2f}",
    "hot_sku_cluster/standalone": "{:.2f}", "busiest_master_share": "{:.2f}",
    "calls_per_hot_order": "{:.2f}",
    "locations/plain": "{:.2f}",
}  # fmt: skip


def summary_line(summary: dict[str, float]) -> str:
    """``bench: key=value (met) ...``; a key whose row did not run shows ``n/a``."""
    parts = []
    for key, form in SUMMARY.items():
        if key not in summary:
            parts.append(f"{key}=n/a")
            continue
        verdict = f" ({'met' if met(key, summary[key]) else 'NOT met'})" if key in GOALS else ""
        parts.append(f"{key}={form.format(summary[key])}{verdict}")
    return "bench: " + " ".join(parts)


def met(key: str, value: float) -> bool:
    """Whether ``value`` meets the goal of ``key`` (``GOALS``)."""
    goal, sense = GOALS[key]
    return value >= goal if sense == ">=" else value <= goal


@dataclass
class Row:
    """One line of the table."""

    what: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Report:
    """The table's rows and the summary line's figures."""

    rows: list[Row] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    load_at_start: str = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    def add(self, what: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(Row(what, value, unit, note))
        print(f"  {what}: {_fmt(value)} {unit}  {note}".rstrip(), flush=True)


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def samples(values: list[float]) -> str:
    """The runs behind a best-of figure."""
    return "runs " + " / ".join(f"{v:,.0f}" for v in values)


def log(text: str) -> None:
    """A progress line on stderr (the table and the summary go to stdout)."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def print_table(report: Report, args: argparse.Namespace) -> None:
    box = machine()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print()
    print(
        f"machine: {box['cores']} cores, {box['memory']} memory, {box['cpu']}; "
        f"load average at the start {report.load_at_start}, at the end {load}; "
        f"concurrency C={args.concurrency}; throughput: best of {args.repeat} runs of "
        f"{args.seconds:.0f} s, the two sides of each ratio alternating"
    )
    width = max(len(r.what) for r in report.rows)
    print(f"| {'measurement':<{width}} | {'result':>10} | {'unit':<8} | note |")
    print(f"|{'-' * (width + 2)}|{'-' * 12}:|{'-' * 10}|------|")
    for r in report.rows:
        print(f"| {r.what:<{width}} | {_fmt(r.value):>10} | {r.unit:<8} | {r.note} |")
    print()
    for name, (goal, sense) in GOALS.items():
        if name not in report.summary:
            print(f"goal {name} {sense} {goal}: not measured in this run")
            continue
        value = report.summary[name]
        verdict = "met" if met(name, value) else "NOT met"
        print(f"goal {name} {sense} {goal}: {verdict} ({_fmt(value)})")
