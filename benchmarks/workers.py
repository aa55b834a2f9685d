"""Worker scaling: trisocks with ``--workers 1`` and ``--workers 2``, and the ratio.

    python benchmarks/workers.py [--duration S] [--repeat N] [--markdown FILE]

Uses bench.py's harness (origin server, loadgen processes, the trisocks launch of peers.py:
password auth, admin API, accounting) and adds ``--workers``. Per worker count it measures

* connections/s with 64 concurrent clients (2 loadgen processes x 32 threads): the load that
  a single trio loop saturates first (handshake, auth cache, CONNECT, accounting per session);
* bulk download MB/s with 8 parallel streams (one stream lives in one worker, so a single
  stream cannot scale with workers; 8 spread over both).

Each figure is the median of ``--repeat`` runs, each on a freshly started server, the worker
counts interleaved. With two
workers the server also runs fleet mode (directory publishes, the local kill channel) on the
shared SQLite file: that cost is part of what is measured.

On a machine with few cores the load generators and the origin compete with the workers for
the same cores, so expect less than 2x; the point is to measure it honestly, not to promise it.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench
import peers
import report

WORKER_COUNTS = (1, 2)
SETTLE = 2.0
"""Seconds after the first worker accepts before measuring: every worker must be listening,
or the kernel sends all connections to the ones that are."""


def with_workers(count: int) -> peers.Server:
    def prepare(port: int, workdir: Path) -> peers.Launch:
        launch = peers.trisocks(port, workdir)
        return dataclasses.replace(launch, argv=[*launch.argv, "--workers", str(count)])

    return peers.Server(f"trisocks --workers {count}", prepare, peers.trisocks_missing)


def measure_once(server: peers.Server, ports: bench.Ports, s: bench.Settings,
                 workdir: Path) -> dict[str, float]:
    """Each figure on a freshly started server."""
    probes: dict[str, Callable[[bench.Target], float]] = {
        "conn64": lambda t: bench.connrate(t, ports.oneshot, 64, 2, s),
        "bulk8": lambda t: bench.bulk(t, ports.bulk, 8, s)[0],
    }
    figures = {}
    for name, probe in probes.items():
        with bench.running(server, workdir) as target:
            time.sleep(SETTLE)
            figures[name] = probe(target)
    return figures


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def render(results: dict[int, dict[str, list[float]]], s: bench.Settings, repeat: int) -> str:
    one, two = ({k: statistics.median(v) for k, v in results[n].items()} for n in WORKER_COUNTS)
    lines = [
        f"# Worker scaling ({report.machine_line()})",
        "",
        f"Median (min-max) of {repeat} runs, {s.duration:g} s windows after {s.warmup:g} s "
        "warm-up, worker counts interleaved; origin, load generators and trisocks share the "
        "machine's cores (other sessions' load too: see the load average).",
        "",
        "| | conn/s, 64 clients | bulk MB/s, 8 streams |",
        "|---|---:|---:|",
    ]
    for count in WORKER_COUNTS:
        row = results[count]
        lines.append(f"| `--workers {count}` | {cell(row['conn64'])} | {cell(row['bulk8'])} |")
    lines.append(f"| ratio of medians 2/1 | {two['conn64'] / one['conn64']:.2f}x | "
                 f"{two['bulk8'] / one['bulk8']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per window")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table")
    args = parser.parse_args()
    s = dataclasses.replace(bench.FULL, duration=args.duration)
    workdir = Path(tempfile.mkdtemp(prefix="trisocks-workers-bench-"))
    results: dict[int, dict[str, list[float]]] = {n: {} for n in WORKER_COUNTS}
    with bench.origin_server(workdir) as ports:
        # Interleaved (1, 2, 1, 2, ...) so that a change in the machine's other load during
        # the run hits both worker counts alike.
        for run in range(args.repeat):
            for count in WORKER_COUNTS:
                bench.log(f"run {run + 1}/{args.repeat}: trisocks --workers {count}")
                for name, value in measure_once(with_workers(count), ports, s, workdir).items():
                    results[count].setdefault(name, []).append(value)
    table = render(results, s, args.repeat) + (
        f"\nCommand: `python benchmarks/workers.py --duration {args.duration:g} "
        f"--repeat {args.repeat}`; load average at the end: "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}\n")
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
