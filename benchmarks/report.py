"""Results tables: one row per server, trisocks' ratios, footnotes, machine line.

The same tables are rendered as aligned plain text (printed) and as Markdown
(``--markdown FILE``). A cell holds a number, ``None`` (not applicable, e.g.
proxy memory for the no-proxy row) or a ``Failure`` whose message becomes a
numbered footnote.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from pathlib import Path

SUBJECT = "trisocks"


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    higher_is_better: bool
    fmt: str


@dataclass(frozen=True)
class Failure:
    message: str


Cell = float | Failure | None


def columns(idle_counts: tuple[int, ...]) -> list[Column]:
    idle = [
        Column(
            f"idle{n}",
            f"KiB/idle conn @{n // 1000}k" if n % 1000 == 0 else f"KiB/idle conn @{n}",
            False,
            "{:.1f}",
        )
        for n in idle_counts
    ]
    return [
        Column("bulk1", "bulk 1 stream MB/s", True, "{:,.0f}"),
        Column("bulk8", "bulk 8 streams MB/s", True, "{:,.0f}"),
        Column("bursty", "bursty origin MB/s", True, "{:,.0f}"),
        Column("conn1", "conn/s sequential", True, "{:,.0f}"),
        Column("conn64", "conn/s 64 clients", True, "{:,.0f}"),
        Column("cpuconn", "CPU µs/conn (64 clients)", False, "{:,.0f}"),
        Column("rtt50", "RTT p50 µs", False, "{:.0f}"),
        Column("rtt99", "RTT p99 µs", False, "{:.0f}"),
        *idle,
        Column("cpu", "proxy CPU s/GiB", False, "{:.2f}"),
        Column("burstycpu", "bursty origin CPU s/GiB", False, "{:.2f}"),
    ]


@dataclass
class Results:
    cols: list[Column]
    rows: dict[str, dict[str, Cell]]  # server name -> column key -> cell
    notes: dict[str, list[str]]  # server name -> footnotes about it

    def render(self) -> tuple[list[tuple[str, list[list[str]]]], list[str]]:
        """Tables as (caption, rows of cells with the header first), and footnotes."""
        failures: list[str] = []

        def show(server: str, col: Column, row: dict[str, Cell]) -> str:
            if col.key not in row:
                return "-"
            cell = row[col.key]
            if cell is None:
                return "n/a"
            if isinstance(cell, Failure):
                failures.append(f"{server}, {col.title}: {' '.join(cell.message.split())}")
                return f"error [{len(failures)}]"
            return col.fmt.format(cell)

        header = ["server", *(c.title for c in self.cols)]
        main = [header] + [
            [name, *(show(name, c, row) for c in self.cols)] for name, row in self.rows.items()
        ]
        tables = [("Results", main)]
        ratios = self.ratios()
        if ratios:
            arrows = [
                "trisocks ÷",
                *(f"{c.title} {'↑' if c.higher_is_better else '↓'}" for c in self.cols),
            ]
            tables.append(
                (
                    "trisocks ÷ other (↑ column: higher is better, so > 1 favours trisocks; "
                    "↓ column: lower is better, so < 1 favours trisocks)",
                    [arrows, *ratios],
                )
            )
        notes = [f"[{i}] {msg}" for i, msg in enumerate(failures, 1)]
        notes += [
            f"{name}: {note}" for name, server_notes in self.notes.items() for note in server_notes
        ]
        return tables, notes

    def ratios(self) -> list[list[str]]:
        subject = self.rows.get(SUBJECT)
        if subject is None or not any(isinstance(v, float) for v in subject.values()):
            return []
        peers = {name: row for name, row in self.rows.items() if name not in (SUBJECT, "no proxy")}

        def ratio(col: Column, other: Cell) -> str:
            mine = subject.get(col.key)
            if not isinstance(mine, float) or not isinstance(other, float) or other == 0:
                return "-"
            return f"{mine / other:.2f}x"

        lines = [
            [f"vs {name}", *(ratio(c, row.get(c.key)) for c in self.cols)]
            for name, row in peers.items()
        ]
        if peers:
            best = []
            for c in self.cols:
                values = [v for row in peers.values() if isinstance(v := row.get(c.key), float)]
                best.append(
                    ratio(c, (max if c.higher_is_better else min)(values)) if values else "-"
                )
            lines.append(["vs best peer", *best])
        if "no proxy" in self.rows:
            direct = self.rows["no proxy"]
            lines.append(["vs no proxy", *(ratio(c, direct.get(c.key)) for c in self.cols)])
        return lines


def machine_line() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (
        f"Machine: {model}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {date}, load average {load}"
    )


def as_text(results: Results, preamble: list[str], method: list[str]) -> str:
    tables, notes = results.render()
    out = [*preamble, ""]
    for caption, rows in tables:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out.append(caption + ":")
        for j, row in enumerate(rows):
            out.append(
                "  ".join(
                    cell.ljust(w) if i == 0 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(row, widths, strict=True))
                )
            )
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append("")
    out += ["Notes:", *(f"  {n}" for n in notes), "", "Method:", *(f"  {m}" for m in method)]
    return "\n".join(out)


def as_markdown(results: Results, preamble: list[str], method: list[str]) -> str:
    tables, notes = results.render()
    out = ["# trisocks benchmark results", "", *(f"{line}  " for line in preamble), ""]
    for caption, rows in tables:
        out += [f"**{caption}**", ""]
        for j, row in enumerate(rows):
            out.append("| " + " | ".join(row) + " |")
            if j == 0:
                out.append("|" + "|".join([":---"] + ["---:"] * (len(row) - 1)) + "|")
        out.append("")
    out += [
        "Notes:",
        "",
        *(f"- {n}" for n in notes),
        "",
        "Method:",
        "",
        *(f"- {m}" for m in method),
        "",
    ]
    return "\n".join(out)
