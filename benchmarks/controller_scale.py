"""The controller at scale: dispatch, /list_models and heartbeats with N simulated workers.

    python -m benchmarks.controller_scale [--store memory|redis] [--sizes 10,100,1000,5000,20000]
        [--requests 20000] [--duration 15] [--concurrency 32] [--json out.json]

For each N it starts a controller process on 127.0.0.1 (with `--health-check-interval 0`: the
simulated workers have no HTTP server, so active health checks are turned off rather than
answered by a stub), registers N workers serving one model "bench" (check_heart_beat on), and
has each send a heartbeat every --interval seconds (5 s, as FastChat's workers), their phases
spread evenly over the interval. While the heartbeats run it measures, each phase bounded by
--requests and --duration:
  - dispatch: --concurrency clients in a closed loop on POST /get_worker_address;
  - list: the same on POST /list_models;
and reports requests per second, p50/p99 latency, heartbeat latency p50/p99 (counted from
each heartbeat's scheduled time, so a client that falls behind shows up as late rather than
hiding it), heartbeats late (answered after --interval) and dropped (failed, timed out or
answered exist=false), and the controller's CPU (utime+stime from /proc over the dispatch
phase, in cores) and RSS at the end. The load generator is a small keep-alive HTTP/1.1 client
on raw asyncio streams, so that the client is not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Service, free_port, pagedserve, percentile, print_table, write_json

MODEL = "bench"


class Connection:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a Content-Length body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class Pool:
    """A fixed number of connections handed out in turn; a broken one is replaced."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size = port, size
        self._free: asyncio.Queue[Connection] = asyncio.Queue()

    async def open(self) -> Pool:
        for _ in range(self.size):
            self._free.put_nowait(await Connection.open(self.port))
        return self

    async def post(self, path: str, payload: dict, timeout: float) -> tuple[int, dict]:
        conn = await self._free.get()
        try:
            status, body = await asyncio.wait_for(
                conn.post(path, json.dumps(payload).encode()), timeout
            )
        except BaseException:
            conn.close()
            self._free.put_nowait(await Connection.open(self.port))
            raise
        self._free.put_nowait(conn)
        return status, json.loads(body)

    def close(self) -> None:
        while not self._free.empty():
            self._free.get_nowait().close()


def worker_name(i: int) -> str:
    return f"http://10.0.{i // 250}.{i % 250 + 1}:21002"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def register_all(pool: Pool, n: int) -> None:
    async def one(i: int) -> None:
        status = {"model_names": [MODEL], "worker_id": f"w{i}", "queue_length": i % 7}
        body = {"worker_name": worker_name(i), "check_heart_beat": True, "worker_status": status}
        code, _ = await pool.post("/register_worker", body, timeout=60)
        assert code == 200, code

    for start in range(0, n, 256):  # bounded batches
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 256))))


class Heartbeats:
    """Every worker beats once per interval, worker i at phase i/n of it."""

    def __init__(self, pool: Pool, n: int, interval: float) -> None:
        self.pool, self.n, self.interval = pool, n, interval
        self.latencies: list[float] = []
        self.late = self.dropped = 0
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

    async def beat(self, i: int, due: float) -> None:
        body = {"worker_name": worker_name(i), "queue_length": i % 7, "worker_id": f"w{i}"}
        try:
            code, answer = await self.pool.post(
                "/receive_heart_beat", body, timeout=self.interval * 2
            )
            ok = code == 200 and answer.get("exist") is True
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            ok = False
        latency = time.monotonic() - due
        if not ok:
            self.dropped += 1
            return
        self.latencies.append(latency)
        if latency > self.interval:
            self.late += 1

    async def run(self) -> None:
        start = time.monotonic()
        k = 0  # heartbeats scheduled so far
        while not self._stop.is_set():
            now = time.monotonic()
            due_count = int((now - start) / self.interval * self.n) + 1  # due by now
            while k < due_count and len(self._tasks) < 50_000:  # bounded in flight
                due = start + k * self.interval / self.n
                task = asyncio.create_task(self.beat(k % self.n, due))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                k += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.interval * 2 + 1)


async def closed_loop(pool: Pool, path: str, body: dict, args) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + args.duration
    remaining = args.requests

    async def client() -> None:
        nonlocal remaining, errors
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                code, answer = await pool.post(path, body, timeout=30)
                ok = code == 200 and (path != "/get_worker_address" or answer.get("address"))
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    wall = time.monotonic() - t0
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99) * 1e3, 2) if latencies else None,
    }


async def measure(port: int, pid: int, n: int, args) -> dict:
    setup = await Pool(port, 32).open()
    t0 = time.monotonic()
    await register_all(setup, n)
    registered_s = time.monotonic() - t0
    hb_pool = await Pool(port, 64).open()
    beats = Heartbeats(hb_pool, n, args.interval)
    hb_task = asyncio.create_task(beats.run())
    await asyncio.sleep(args.warmup)
    load = await Pool(port, args.concurrency).open()
    cpu0, w0 = cpu_seconds(pid), time.monotonic()
    dispatch = await closed_loop(load, "/get_worker_address", {"model": MODEL}, args)
    cpu_cores = (cpu_seconds(pid) - cpu0) / (time.monotonic() - w0)
    listing = await closed_loop(load, "/list_models", {}, args)
    await beats.stop()
    hb_task.cancel()
    rss = rss_mib(pid)
    for pool in (setup, hb_pool, load):
        pool.close()
    lat = beats.latencies
    return {
        "workers": n,
        "register_s": round(registered_s, 2),
        "dispatch": dispatch,
        "list_models": listing,
        "heartbeats": {
            "answered": len(lat),
            "p50_ms": round(percentile(lat, 50) * 1e3, 2) if lat else None,
            "p99_ms": round(percentile(lat, 99) * 1e3, 2) if lat else None,
            "late": beats.late,
            "dropped": beats.dropped,
        },
        "cpu_cores": round(cpu_cores, 2),
        "rss_mib": round(rss, 1),
    }


def start_redis(work: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("--store redis needs redis-server on PATH")
    port = free_port()
    argv = [binary, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=("memory", "redis"), default="memory")
    parser.add_argument("--sizes", default="10,100,1000,5000,20000")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20_000, help="per phase, at most")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase, at most")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument("--warmup", type=float, default=2.0, help="heartbeats alone first (s)")
    parser.add_argument("--policy", default="least_load")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis_proc, redis_url = start_redis(work) if args.store == "redis" else (None, None)
        try:
            for n in sizes:
                port = free_port()
                argv = pagedserve(
                    "controller", "--port", str(port), "--health-check-interval", "0",
                    "--routing-policy", args.policy,
                )  # fmt: skip
                if redis_url:
                    argv += ["--redis-url", redis_url, "--redis-prefix", f"bench{n}"]
                controller = Service(f"controller-{n}", argv, port, "/health", work)
                try:
                    r = asyncio.run(measure(port, controller.proc.pid, n, args))
                finally:
                    controller.stop()
                results.append(r)
                d, lm, hb = r["dispatch"], r["list_models"], r["heartbeats"]
                rows.append((
                    n, d["rps"], d["p50_ms"], d["p99_ms"], lm["rps"], lm["p99_ms"],
                    hb["p50_ms"], hb["p99_ms"], hb["late"], hb["dropped"],
                    r["cpu_cores"], r["rss_mib"],
                ))  # fmt: skip
                print(json.dumps(r), flush=True)
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
    print(f"\nstore={args.store} policy={args.policy} c={args.concurrency}")
    print_table(
        rows,
        ("N", "dispatch rps", "p50 ms", "p99 ms", "list rps", "list p99", "hb p50 ms",
         "hb p99 ms", "hb late", "hb dropped", "cpu cores", "rss MiB"),
    )  # fmt: skip
    write_json(args.json_path, {"store": args.store, "policy": args.policy, "results": results})


if __name__ == "__main__":
    main()
