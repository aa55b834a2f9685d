"""Worker scaling: trisocks with ``--workers 1``, ``2`` and ``auto``, and the ratios.

    python benchmarks/workers.py [--duration S] [--repeat N] [--markdown FILE]

Uses bench.py's harness (origin server, loadgen processes, the trisocks launch of peers.py:
password auth, admin API, accounting) and adds ``--workers``. Per worker count it measures

* connections/s with 64 concurrent clients (2 loadgen processes x 32 threads): the load that
  a single trio loop saturates first (handshake, auth cache, CONNECT, accounting per session);
* bulk download MB/s with 8 parallel streams (one stream lives in one worker, so a single
  stream cannot scale with workers; 8 spread over both).

Each figure is the median of ``--repeat`` runs, each on a freshly started server, the worker
counts interleaved. ``auto`` is one worker per core of this process's CPU affinity (what
trisocks resolves it to; the same count as ``2`` on a 2-core machine, measured anyway as the
form operators use). The conn/s runs also read the whole machine's busy CPU (/proc/stat) and
trisocks' own (its process group), to show how much of the machine the clients needed. With two
workers the server also runs fleet mode (directory publishes, the local kill channel) on the
shared SQLite file: that cost is part of what is measured.

On a machine with few cores the load generators and the origin compete with the workers for
the same cores, so expect less than 2x; the point is to measure it honestly, not to promise it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench
import peers
import procs
import report

WORKER_COUNTS: tuple[int | str, ...] = (1, 2, "auto")
AUTO = len(os.sched_getaffinity(0))
"""What ``--workers auto`` resolves to for the servers started here (they inherit the affinity)."""
SETTLE = 2.0
"""Seconds after the first worker accepts before measuring: every worker must be listening,
or the kernel sends all connections to the ones that are."""


def label(count: int | str) -> str:
    return f"--workers {count}" + (f" (={AUTO})" if count == "auto" else "")


def with_workers(count: int | str) -> peers.Server:
    def prepare(port: int, workdir: Path) -> peers.Launch:
        launch = peers.trisocks(port, workdir)
        return dataclasses.replace(launch, argv=[*launch.argv, "--workers", str(count)])

    return peers.Server(f"trisocks --workers {count}", prepare, peers.trisocks_missing)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine was busy since boot (all cores; /proc/stat, not idle or
    iowait)."""
    ticks = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / procs.CLK_TCK


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
            assert target.pgid is not None
            busy, own, start = (machine_busy_seconds(), procs.cpu_seconds(target.pgid),
                                time.monotonic())
            figures[name] = probe(target)
            if name == "conn64":  # cores in use over the whole probe, load generators' start too
                wall = time.monotonic() - start
                figures["busy"] = (machine_busy_seconds() - busy) / wall
                figures["own"] = (procs.cpu_seconds(target.pgid) - own) / wall
    return figures


def cell(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def idle_cores_sentence(one: dict[str, float]) -> str:
    """What ``auto`` would give with idle cores, as far as the one-worker figures tell."""
    cores = os.cpu_count() or 1
    per_core = one["conn64"] / one["own"]
    if one["busy"] >= 0.9 * cores:
        saturated = "so the machine is saturated and more workers only take CPU from the clients"
    elif one["own"] >= 0.8:
        saturated = (f"so {cores - one['busy']:.2f} of a core was idle while the one worker was "
                     "near the single core a trio loop can use: that loop was the limit")
    else:
        saturated = (f"so {cores - one['busy']:.2f} of a core was idle and neither the worker "
                     "nor the machine was at its limit")
    return (
        f"With idle cores, what `--workers auto` gives cannot be measured here: during the "
        f"one-worker conn/s runs the machine's {cores} cores were {one['busy']:.2f} busy, "
        f"trisocks using {one['own']:.2f} of them and everything else (load generators, "
        f"origin, any other load) {one['busy'] - one['own']:.2f}, {saturated}; "
        f"from the one-worker figure "
        f"({one['conn64']:,.0f} conn/s on {one['own']:.2f} cores of trisocks CPU, about "
        f"{per_core:,.0f} per core), {AUTO} workers on {AUTO} cores that clients elsewhere "
        f"leave idle are bounded by about {AUTO * per_core:,.0f} conn/s less the fleet-mode "
        f"cost: arithmetic, not a measurement."
    )


def render(results: dict[int | str, dict[str, list[float]]], s: bench.Settings,
           repeat: int) -> str:
    medians = {n: {k: statistics.median(v) for k, v in results[n].items()}
               for n in WORKER_COUNTS}
    one = medians[1]
    lines = [
        f"# Worker scaling ({report.machine_line()})",
        "",
        f"Median (min-max) of {repeat} runs, {s.duration:g} s windows after {s.warmup:g} s "
        "warm-up, worker counts interleaved; origin, load generators and trisocks share the "
        "machine's cores (other sessions' load too: see the load average).",
        "",
        "| | conn/s, 64 clients | bulk MB/s, 8 streams | cores busy in conn/s: machine, "
        "trisocks |",
        "|---|---:|---:|---:|",
    ]
    for count in WORKER_COUNTS:
        row, median = results[count], medians[count]
        lines.append(f"| `{label(count)}` | {cell(row['conn64'])} | {cell(row['bulk8'])} | "
                     f"{median['busy']:.2f}, {median['own']:.2f} |")
    for count in WORKER_COUNTS[1:]:
        other = medians[count]
        lines.append(f"| ratio of medians {count}/1 | {other['conn64'] / one['conn64']:.2f}x | "
                     f"{other['bulk8'] / one['bulk8']:.2f}x | |")
    lines += ["", idle_cores_sentence(one)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per window")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table")
    args = parser.parse_args()
    s = dataclasses.replace(bench.FULL, duration=args.duration)
    workdir = Path(tempfile.mkdtemp(prefix="trisocks-workers-bench-"))
    results: dict[int | str, dict[str, list[float]]] = {n: {} for n in WORKER_COUNTS}
    with bench.origin_server(workdir) as ports:
        # Interleaved (1, 2, auto, 1, 2, auto, ...) so that a change in the machine's other
        # load during the run hits every worker count alike.
        for run in range(args.repeat):
            for count in WORKER_COUNTS:
                bench.log(f"run {run + 1}/{args.repeat}: trisocks {label(count)}")
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
