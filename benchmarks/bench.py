"""Benchmark trisocks beside other SOCKS5 servers in one run and print a table.

    python benchmarks/bench.py [--quick] [--only NAME,...] [--duration S] [--markdown FILE]
                               [--measure KEY,...] [--baseline REV]

Starts the origin server (origin.py), then for each server in turn (no proxy,
microsocks, Dante, pproxy on uvloop, trisocks) starts it on a free loopback
port, waits until it accepts, measures, and stops it. Load comes from
loadgen.py processes, separate from this harness and from the server.

Per server it measures:

* bulk download MB/s (10^6 B/s) with 1 and with 8 parallel streams;
* bulk download MB/s with 1 stream from the origin's bursty service (paced
  16-64 KiB bursts, see origin.py), and the server's CPU seconds per GiB over it;
* connections/s (connect, SOCKS handshake + CONNECT, 4-byte request and reply,
  the origin closes and the client sees EOF), one sequential client and 64
  concurrent clients (2 processes x 32 threads);
* server CPU µs per connection: its process group's CPU time over that 64-client
  rate run (warm-up included) divided by every connection completed in it;
* round-trip latency p50/p99 (µs) of 16-byte ping/pongs over one connection;
* KiB of server memory per idle established connection with N held open,
  each N on a freshly started server (see procs.py for how memory is summed);
* server CPU seconds per GiB relayed during the 1-stream bulk run.

``--measure conn64,rtt,idle`` runs only those measurements (keys: bulk1, bulk8, bursty,
conn1, conn64, rtt, idle); ``--baseline REV`` adds a row "trisocks@REV": the same trisocks
configuration run from a git worktree of REV, so a change is measured before and after in
one run.

Everything is bounded in time and count; every child process is stopped on
exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import origin
import peers
import procs
import report
from report import Cell, Failure

HERE = Path(__file__).resolve().parent
PROCESS_SLACK = 30.0  # seconds a load generator may take beyond its measurement
IDLE_WARMUP_CONNECTIONS = 20
MEASUREMENTS = ("bulk1", "bulk8", "bursty", "conn1", "conn64", "rtt", "idle")


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    rtt_count: int
    idle_counts: tuple[int, ...]
    hold_timeout: float  # time allowed to open the idle connections
    measure: frozenset[str] = frozenset(MEASUREMENTS)


@dataclass
class Target:
    """Where load generators send traffic: a started proxy, or the origin directly."""

    proxy: str | None = None
    user: str | None = None
    password: str | None = None
    pgid: int | None = None  # the proxy's process group, for CPU/memory readings
    notes: list[str] = field(default_factory=list)
    proxy_type: str = "socks5"

    def loadgen_argv(self, mode: str, port: int, *options: str) -> list[str]:
        argv = [sys.executable, str(HERE / "loadgen.py"), mode, "--target", str(port), *options]
        if self.proxy:
            argv += ["--proxy", self.proxy, "--proxy-type", self.proxy_type]
        if self.user is not None:
            argv += ["--user", self.user, "--password", self.password or ""]
        return argv


class Ports(NamedTuple):
    """The origin's services (see origin.py)."""

    bulk: int
    echo: int
    oneshot: int
    bursty: int


class ServerStartError(RuntimeError):
    pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


@contextmanager
def origin_server(workdir: Path) -> Iterator[Ports]:
    """Run origin.py; yield its ports."""
    with open(workdir / "origin.stderr", "wb") as err:
        proc = procs.start(
            [sys.executable, str(HERE / "origin.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        line = procs.read_line(proc.stdout, 15)
        if not line.startswith("READY"):
            raise RuntimeError(f"origin failed: {line!r} {tail(workdir / 'origin.stderr')}")
        yield Ports(*map(int, line.split()[1:]))
    finally:
        procs.stop(proc)


@contextmanager
def running(server: peers.Server, workdir: Path) -> Iterator[Target]:
    """Start a server on a free port, wait until it accepts, yield a Target, stop it."""
    if server.prepare is None:
        yield Target()
        return
    port = procs.free_port()
    slug = re.sub(r"\W+", "-", server.name)
    sdir = Path(tempfile.mkdtemp(prefix=f"{slug}-", dir=workdir))  # fresh state for every start
    try:
        launch = server.prepare(port, sdir)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log(f"  preparing {server.name} failed: {exc}")
        raise ServerStartError(str(exc)) from None
    stdout, stderr = sdir / "stdout", sdir / "stderr"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = procs.start(
            launch.argv,
            env=launch.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=peers.REPO,
        )
    try:
        try:
            procs.wait_accepting(port, proc)
        except RuntimeError as exc:
            output = f"{tail(stderr)}\n{tail(stdout)}".strip()
            log(f"  {shlex.join(launch.argv)}\n  {exc}; its output:\n{output}")
            last = output.splitlines()[-1] if output else "no output"
            raise ServerStartError(f"{exc}: {last}") from None
        procs.wait_quiet(proc.pid)  # its start-up is not the first measurement's
        notes = list(launch.notes)
        if launch.check:
            notes.append(launch.check(proc.pid, sdir))
        yield Target(f"127.0.0.1:{port}", launch.user, launch.password, proc.pid, notes,
                     server.proxy_type)
    finally:
        procs.stop(proc)


def run_loadgens(argvs: list[list[str]], timeout: float) -> list[dict]:
    """Run load generator processes in parallel; return each one's JSON result."""
    started = [procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in argvs]
    try:
        deadline = time.monotonic() + timeout
        results = []
        for proc in started:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                lines = err.decode(errors="replace").strip().splitlines() or ["no output"]
                raise RuntimeError(f"load generator failed: {lines[-1]}")
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        return results
    finally:
        for proc in started:
            procs.stop(proc, timeout=2)


def bulk(target: Target, port: int, streams: int, s: Settings) -> tuple[float, int]:
    """(MB/s inside the window, total bytes received) for `streams` parallel downloads."""
    argv = target.loadgen_argv(
        "bulk",
        port,
        "--streams",
        str(streams),
        "--duration",
        str(s.duration),
        "--warmup",
        str(s.warmup),
    )
    (result,) = run_loadgens([argv], s.duration + s.warmup + PROCESS_SLACK)
    if result["errors"]:
        raise RuntimeError(result["errors"][0])
    return result["window_bytes"] / result["window_s"] / 1e6, result["total_bytes"]


def connrate(target: Target, port: int, clients: int, processes: int, s: Settings) -> float:
    """Completed connect-request-close cycles per second, over all processes."""
    return connrate_with_cpu(target, port, clients, processes, s)[0]


def connrate_with_cpu(
    target: Target, port: int, clients: int, processes: int, s: Settings
) -> tuple[float, float | None]:
    """(connections/s in the window, server CPU µs per connection over the whole run).

    The CPU is the server's process group's, read before the load generators start and after
    they exit; it is divided by every connection completed (warm-up included), not only those
    inside the window. None without a server (no proxy)."""
    cpu_before = procs.cpu_seconds(target.pgid) if target.pgid is not None else 0.0
    start_at = time.time() + 0.3
    argv = target.loadgen_argv(
        "connrate",
        port,
        "--clients",
        str(clients // processes),
        "--duration",
        str(s.duration),
        "--warmup",
        str(s.warmup),
        "--start-at",
        str(start_at),
    )
    results = run_loadgens([argv] * processes, s.duration + s.warmup + PROCESS_SLACK)
    cpu = procs.cpu_seconds(target.pgid) - cpu_before if target.pgid is not None else None
    completed = sum(r["completed"] for r in results)
    total = sum(r.get("total_completed", r["completed"]) for r in results)
    errors = sum(r["errors"] for r in results)
    first_error = next((r["first_error"] for r in results if r["first_error"]), None)
    if completed == 0:
        raise RuntimeError(f"no connection completed; {errors} errors, first: {first_error}")
    if errors:
        target.notes.append(
            f"{errors} failed connections at {clients} client(s), first: {first_error}"
        )
    return completed / s.duration, None if cpu is None else cpu / total * 1e6


def rtt(target: Target, port: int, s: Settings) -> tuple[float, float]:
    argv = target.loadgen_argv(
        "rtt", port, "--count", str(s.rtt_count), "--duration", str(s.duration)
    )
    (result,) = run_loadgens([argv], s.duration + PROCESS_SLACK)
    return result["p50_us"], result["p99_us"]


@contextmanager
def held(target: Target, port: int, count: int, timeout: float) -> Iterator[dict]:
    """Keep `count` idle sessions open (in a loadgen process) for the duration of the block."""
    argv = target.loadgen_argv("hold", port, "--count", str(count), "--duration", str(timeout))
    proc = procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = procs.read_line(proc.stdout, timeout + PROCESS_SLACK)
        if not line:
            raise RuntimeError(f"hold failed: {proc.stderr.read().decode(errors='replace')[-500:]}")
        yield json.loads(line)
        proc.stdin.close()
        proc.wait(PROCESS_SLACK)
    finally:
        procs.stop(proc, timeout=2)


def settled_pss(pgid: int) -> int:
    """Server memory once it stops moving (within 0.5 %, at most ~3 s of sampling)."""
    previous = procs.pss_kib(pgid)
    for _ in range(12):
        time.sleep(0.25)
        current = procs.pss_kib(pgid)
        if abs(current - previous) <= 0.005 * previous:
            return current
        previous = current
    return previous


def idle_memory(target: Target, port: int, count: int, s: Settings) -> float:
    """KiB of server memory per idle session, from a warmed-up fresh server."""
    with held(target, port, IDLE_WARMUP_CONNECTIONS, s.hold_timeout):
        pass
    baseline = settled_pss(target.pgid)
    with held(target, port, count, s.hold_timeout) as status:
        if status["opened"] < count:
            raise RuntimeError(
                f"held only {status['opened']} of {count}: {'; '.join(status['errors'])}"
            )
        loaded = settled_pss(target.pgid)
        processes = procs.process_count(target.pgid)
    if processes > 1:
        target.notes.append(f"{processes} processes while holding {count} connections")
    return (loaded - baseline) / count


def attempt(
    row: dict[str, Cell], keys: tuple[str, ...], measure: Callable[[], tuple | float], label: str
) -> None:
    """Store measure()'s value(s) in row[keys]; on error store a Failure instead."""
    try:
        values = measure()
    except Exception as exc:  # reported in the table; the run goes on
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        log(f"    {label}: FAILED: {message}")
        row.update({k: Failure(message) for k in keys})
        return
    values = values if isinstance(values, tuple) else (values,)
    row.update({k: None if v is None else float(v) for k, v in zip(keys, values, strict=True)})
    log(f"    {label}: " + ", ".join("n/a" if v is None else f"{v:,.1f}" for v in values))


def measure_traffic(row: dict[str, Cell], target: Target, ports: Ports, s: Settings) -> None:
    """Throughput, connection rate, latency and CPU against one running server."""

    def bulk_with_cpu(port: int = ports.bulk) -> tuple[float, float | None]:
        if target.pgid is None:
            return bulk(target, port, 1, s)[0], None
        cpu_before = procs.cpu_seconds(target.pgid)
        mbps, total = bulk(target, port, 1, s)
        return mbps, (procs.cpu_seconds(target.pgid) - cpu_before) / (total / 2**30)

    wanted = s.measure
    if "bulk1" in wanted:
        attempt(row, ("bulk1", "cpu"), bulk_with_cpu, "bulk 1 stream MB/s, CPU s/GiB")
    if "bulk8" in wanted:
        attempt(row, ("bulk8",), lambda: bulk(target, ports.bulk, 8, s)[0], "bulk 8 streams MB/s")
    if "bursty" in wanted:
        attempt(row, ("bursty", "burstycpu"), lambda: bulk_with_cpu(ports.bursty),
                "bursty origin MB/s, CPU s/GiB")
    if "conn1" in wanted:
        attempt(row, ("conn1",), lambda: connrate(target, ports.oneshot, 1, 1, s),
                "conn/s 1 client")
    if "conn64" in wanted:
        attempt(row, ("conn64", "cpuconn"),
                lambda: connrate_with_cpu(target, ports.oneshot, 64, 2, s),
                "conn/s 64, CPU µs/conn")
    if "rtt" in wanted:
        attempt(row, ("rtt50", "rtt99"), lambda: rtt(target, ports.echo, s), "RTT p50/p99 µs")


def benchmark(
    server: peers.Server, ports: Ports, s: Settings, workdir: Path
) -> tuple[dict[str, Cell], list[str]]:
    """Measure one server; return its row and its footnotes."""
    row: dict[str, Cell] = {}
    notes: list[str] = []
    try:
        with running(server, workdir) as target:
            notes = target.notes
            measure_traffic(row, target, ports, s)
    except ServerStartError as exc:
        return {"bulk1": Failure(f"did not start: {exc}")}, notes
    for n in s.idle_counts if "idle" in s.measure else ():
        if server.prepare is None:
            row[f"idle{n}"] = None
            continue

        def measure_idle(n: int = n) -> float:
            with running(server, workdir) as fresh:
                value = idle_memory(fresh, ports.echo, n, s)
                notes.extend(note for note in fresh.notes if note not in notes)
                return value

        attempt(row, (f"idle{n}",), measure_idle, f"KiB/idle conn @{n}")
    return row, notes


def median_row(runs: list[dict[str, Cell]]) -> dict[str, Cell]:
    """Per cell, the median of the runs that measured it (a failure if none did)."""
    row: dict[str, Cell] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), float)]
        row[key] = statistics.median(values) if values else runs[0][key]  # type: ignore[assignment]
    return row


def select_servers(only: str | None, baseline: peers.Server | None) -> list[peers.Server]:
    servers = [*peers.SERVERS, *([baseline] if baseline else [])]
    if not only:
        return servers

    def norm(name: str) -> str:
        return re.sub(r"[^a-z0-9]", "", name.lower())

    wanted = [norm(n) for n in only.split(",") if n.strip()]
    chosen = [srv for srv in servers if any(norm(srv.name) == w for w in wanted)]
    chosen = chosen or [srv for srv in servers if any(norm(srv.name).startswith(w) for w in wanted)]
    if baseline and baseline not in chosen:
        chosen.append(baseline)
    unknown = [w for w in wanted if not any(norm(srv.name).startswith(w) for srv in servers)]
    if unknown or not chosen:
        names = ", ".join(srv.name for srv in servers)
        sys.exit(f"unknown server(s) {unknown}; choose from: {names}")
    return chosen


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of about a minute")
    parser.add_argument(
        "--only", metavar="NAME,...", help="servers to run, e.g. 'noproxy,trisocks'"
    )
    parser.add_argument("--duration", type=float, help="seconds per measurement window")
    parser.add_argument(
        "--markdown", type=Path, metavar="FILE", help="also write the tables as Markdown"
    )
    parser.add_argument(
        "--measure", metavar="KEY,...",
        help=f"only these measurements (of {', '.join(MEASUREMENTS)})",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N",
        help="measure every server N times, interleaved; each cell is the median",
    )
    parser.add_argument(
        "--baseline", metavar="REV",
        help="also run trisocks as of git revision REV (a worktree), for before/after",
    )
    args = parser.parse_args()
    if args.measure:
        keys = {k.strip() for k in args.measure.split(",") if k.strip()}
        if not keys or keys - set(MEASUREMENTS):
            parser.error(f"--measure: choose from {', '.join(MEASUREMENTS)}")
        args.measure = frozenset(keys)
    return args


FULL = Settings(
    duration=4.0, warmup=0.5, rtt_count=20_000, idle_counts=(1_000, 5_000), hold_timeout=60
)
QUICK = Settings(
    duration=1.0, warmup=0.25, rtt_count=5_000, idle_counts=(1_000, 5_000), hold_timeout=30
)


def settings(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    if args.measure:
        base = dataclasses.replace(base, measure=args.measure)
    return dataclasses.replace(base, duration=args.duration) if args.duration else base


@contextmanager
def baseline_worktree(rev: str | None, workdir: Path) -> Iterator[peers.Server | None]:
    """A server row for trisocks as of *rev*: a detached git worktree, removed after."""
    if not rev:
        yield None
        return
    tree = workdir / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=peers.REPO,
                   check=True, capture_output=True, timeout=60)
    try:
        short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=peers.REPO, check=True,
                               capture_output=True, text=True).stdout.strip()
        yield peers.trisocks_at(tree, f"trisocks@{short}")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=peers.REPO,
                       capture_output=True, timeout=60)


def method_notes(s: Settings) -> list[str]:
    return [
        f"each throughput/rate window {s.duration:g} s after {s.warmup:g} s warm-up; RTT: up to "
        f"{s.rtt_count:,} 16-byte ping/pongs or {s.duration:g} s",
        "servers run one at a time on 127.0.0.1; origin and load generators are separate "
        "Python processes on the same machine, so all of them compete for the same cores",
        "memory: Σ Pss over the server's process group (/proc/PID/smaps_rollup) of a fresh "
        f"server warmed with {IDLE_WARMUP_CONNECTIONS} connections, then N sessions each "
        "established with one 2-byte echo and left idle; kernel socket buffers not included",
        "CPU: utime+stime (+cutime+cstime) over the server's process group, from /proc/PID/stat, "
        "across the whole 1-stream bulk run, divided by GiB received by the client",
        f"bursty origin: 1 stream from a service sending bursts of {origin.BURST_MIN >> 10}-"
        f"{origin.BURST_MAX >> 10} KiB (one sendall each) with {origin.GAP_MIN * 1e6:.0f}-"
        f"{origin.GAP_MAX * 1e6:.0f} µs pauses between them (uniform, fixed seed); CPU as above",
        "CPU µs/conn: the same group CPU, read before and after the 64-client rate run (the one "
        "conn/s 64 clients comes from), divided by all connections completed in it (warm-up "
        f"included), CPU read in clock ticks of {1000 / procs.CLK_TCK:g} ms",
    ]


def main() -> None:
    args = parse_args()
    s = settings(args)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through every `finally`
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by servers and generators
    started = time.monotonic()
    rows: dict[str, dict[str, Cell]] = {}
    notes: dict[str, list[str]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="trisocks-bench-") as tmp,
        origin_server(Path(tmp)) as ports,
        baseline_worktree(args.baseline, Path(tmp)) as baseline,
    ):
        servers = select_servers(args.only, baseline)
        runs: dict[str, list[dict[str, Cell]]] = {}
        for round_ in range(args.repeat):  # rounds interleave the servers
            for server in servers:
                missing = server.missing()
                if missing:
                    log(f"== {server.name}: skipped ({missing})")
                    notes[server.name] = [f"not run: {missing}"]
                    continue
                log(f"== {server.name}" + (f" (round {round_ + 1})" if args.repeat > 1 else ""))
                t0 = time.monotonic()
                row, notes[server.name] = benchmark(server, ports, s, Path(tmp))
                runs.setdefault(server.name, []).append(row)
                log(f"   ({time.monotonic() - t0:.0f} s)")
        rows = {name: median_row(server_runs) for name, server_runs in runs.items()}
    elapsed = time.monotonic() - started
    results = report.Results(report.columns(s.idle_counts), rows, notes)
    command = shlex.join(["python", "benchmarks/bench.py", *sys.argv[1:]])
    preamble = [report.machine_line(), f"Command: `{command}` (took {elapsed:.0f} s)"]
    method = method_notes(s)
    if args.repeat > 1:
        method.append(f"each cell: the median of {args.repeat} runs, the servers interleaved "
                      "(one round runs each server once)")
    print(report.as_text(results, preamble, method))
    if args.markdown:
        args.markdown.write_text(report.as_markdown(results, preamble, method))
        log(f"wrote {args.markdown}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; all started processes were stopped")
