"""The controller at scale: dispatch, /list_models and heartbeats with N simulated workers.

    python -m benchmarks.controller_scale [--deployments memory,redis,redis-x2,fastchat]
        [--sizes 10,100,1000,5000,20000] [--requests 20000] [--duration 15]
        [--concurrency 32] [--json out.json] [--plot out.png]

For each N, each deployment is measured in turn in the same run: pagedserve's controller with
the memory store, with the Redis store (a redis-server it starts), two replicas sharing one
Redis (clients and heartbeats split evenly between them), and FastChat 0.2.36's own controller
(from its venv, benchmarks/peers.py). Each is started on 127.0.0.1; pagedserve's with
`--health-check-interval 0`: the simulated workers have no HTTP server, so active health checks
are turned off by that flag rather than answered by a stub (FastChat's controller makes none).
It registers N workers serving one model "bench" (check_heart_beat on), and has each send a
heartbeat every --interval seconds (5 s, as FastChat's workers), their phases spread evenly
over the interval. While the heartbeats run it measures, each phase bounded by --requests and
--duration:
  - dispatch: --concurrency clients in a closed loop on POST /get_worker_address;
  - list: the same on POST /list_models;
and reports requests per second, p50/p99 latency, heartbeat latency p50/p99 (counted from
each heartbeat's scheduled time, so a client that falls behind shows up as late rather than
hiding it), heartbeats late (answered after --interval) and dropped (failed, timed out or
answered exist=false), and the controllers' CPU (utime+stime from /proc over the dispatch
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
    """A fixed number of connections, spread evenly over the controller replicas' ports and
    handed out in turn; a broken one is replaced by one to the same port."""

    def __init__(self, ports: list[int], size: int) -> None:
        self.ports, self.size = ports, size
        self._free: asyncio.Queue[tuple[int, Connection]] = asyncio.Queue()

    async def open(self) -> Pool:
        for i in range(self.size):
            port = self.ports[i % len(self.ports)]
            self._free.put_nowait((port, await Connection.open(port)))
        return self

    async def post(self, path: str, payload: dict, timeout: float) -> tuple[int, dict]:
        port, conn = await self._free.get()
        body = json.dumps(payload).encode()
        try:
            try:
                status, answer = await asyncio.wait_for(conn.post(path, body), timeout)
            except (ConnectionError, asyncio.IncompleteReadError):
                # the server closed a connection idle past its keep-alive timeout (5 s) as we
                # sent on it: send again on a new one, as HTTP clients do
                conn.close()
                conn = await Connection.open(port)
                status, answer = await asyncio.wait_for(conn.post(path, body), timeout)
        except BaseException:
            conn.close()
            self._free.put_nowait((port, await Connection.open(port)))
            raise
        self._free.put_nowait((port, conn))
        return status, json.loads(answer)

    def close(self) -> None:
        while not self._free.empty():
            self._free.get_nowait()[1].close()


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
        status = {"model_names": [MODEL], "speed": 1, "queue_length": i % 7, "worker_id": f"w{i}"}
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


async def measure(ports: list[int], pids: list[int], n: int, args) -> dict:
    setup = await Pool(ports[:1], 32).open()
    t0 = time.monotonic()
    await register_all(setup, n)
    registered_s = time.monotonic() - t0
    hb_pool = await Pool(ports, 64).open()
    beats = Heartbeats(hb_pool, n, args.interval)
    hb_task = asyncio.create_task(beats.run())
    await asyncio.sleep(args.warmup)
    load = await Pool(ports, args.concurrency).open()
    cpu0, w0 = sum(map(cpu_seconds, pids)), time.monotonic()
    dispatch = await closed_loop(load, "/get_worker_address", {"model": MODEL}, args)
    cpu_cores = (sum(map(cpu_seconds, pids)) - cpu0) / (time.monotonic() - w0)
    listing = await closed_loop(load, "/list_models", {}, args)
    await beats.stop()
    hb_task.cancel()
    rss = sum(map(rss_mib, pids))
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
        sys.exit("the redis deployments need redis-server on PATH")
    port = free_port()
    argv = [binary, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


# What each deployment name starts: the store, the number of replicas, or FastChat's own.
DEPLOYMENTS = ("memory", "redis", "redis-x2", "fastchat")


def start_controllers(deployment: str, n: int, args, work: Path, redis_url: str | None):
    """The controller processes of one deployment, started side by side and ready."""
    if deployment == "fastchat":
        from benchmarks.peers import fastchat_python

        port = free_port()
        argv = [str(fastchat_python()), "-m", "fastchat.serve.controller"]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        # FastChat writes its logs under LOGDIR (default: the working folder)
        env = {"LOGDIR": str(work)}
        return [Service(f"fastchat-{n}", argv, port, "/test_connection", work, env=env)]
    replicas = 2 if deployment == "redis-x2" else 1
    services = []
    for r in range(replicas):
        port = free_port()
        argv = pagedserve(
            "controller", "--port", str(port), "--health-check-interval", "0",
            "--routing-policy", args.policy,
        )  # fmt: skip
        if deployment != "memory":
            argv += ["--redis-url", redis_url, "--redis-prefix", f"bench-{deployment}-{n}"]
        services.append(Service(f"{deployment}-{n}-{r}", argv, port, "/health", work, wait=False))
    for service in services:
        service.wait_ready()
    return services


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--deployments",
        default=",".join(DEPLOYMENTS),
        help=f"comma-separated, measured side by side for each N: {', '.join(DEPLOYMENTS)}",
    )
    parser.add_argument("--sizes", default="10,100,1000,5000,20000")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20_000, help="per phase, at most")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase, at most")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between heartbeats")
    parser.add_argument("--warmup", type=float, default=2.0, help="heartbeats alone first (s)")
    parser.add_argument("--policy", default="least_load")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--plot", help="write a PNG of dispatch rps and p99 against N")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    deployments = args.deployments.split(",")
    unknown = set(deployments) - set(DEPLOYMENTS)
    if unknown:
        parser.error(f"unknown deployments {sorted(unknown)}; choose from {DEPLOYMENTS}")
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        need_redis = any(d.startswith("redis") for d in deployments)
        redis_proc, redis_url = start_redis(work) if need_redis else (None, None)
        try:
            for n in sizes:
                for deployment in deployments:
                    services = start_controllers(deployment, n, args, work, redis_url)
                    try:
                        ports = [int(s.url.rsplit(":", 1)[1]) for s in services]
                        pids = [s.proc.pid for s in services]
                        r = asyncio.run(measure(ports, pids, n, args))
                    finally:
                        for service in services:
                            service.stop()
                    r = {"deployment": deployment, **r}
                    results.append(r)
                    d, lm, hb = r["dispatch"], r["list_models"], r["heartbeats"]
                    rows.append((
                        deployment, n, d["rps"], d["p50_ms"], d["p99_ms"], lm["rps"],
                        lm["p99_ms"], hb["p50_ms"], hb["p99_ms"], hb["late"], hb["dropped"],
                        r["cpu_cores"], r["rss_mib"],
                    ))  # fmt: skip
                    print(json.dumps(r), flush=True)
        finally:
            if redis_proc is not None:
                redis_proc.terminate()
                redis_proc.wait(10)
    print(f"\npolicy={args.policy} c={args.concurrency} heartbeat interval={args.interval}s")
    print_table(
        rows,
        ("deployment", "N", "dispatch rps", "p50 ms", "p99 ms", "list rps", "list p99",
         "hb p50 ms", "hb p99 ms", "hb late", "hb dropped", "cpu cores", "rss MiB"),
    )  # fmt: skip
    write_json(args.json_path, {"policy": args.policy, "results": results})
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for deployment in dict.fromkeys(r["deployment"] for r in results):
        mine = [r for r in results if r["deployment"] == deployment]
        ns = [r["workers"] for r in mine]
        rps_ax.plot(ns, [r["dispatch"]["rps"] for r in mine], marker="o", label=deployment)
        p99_ax.plot(ns, [r["dispatch"]["p99_ms"] for r in mine], marker="o", label=deployment)
    for ax, label in ((rps_ax, "dispatch requests/s"), (p99_ax, "dispatch p99 (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel("registered workers (N)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    p99_ax.set_yscale("log")
    rps_ax.legend()
    fig.suptitle("get_worker_address at c=32 while every worker heartbeats every 5 s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
