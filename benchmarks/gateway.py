"""Gateway overhead: the latency a request gains by going through the gateway, against going
straight to the worker, and against FastChat's openai_api_server in front of the same worker.

    python -m benchmarks.gateway [--phases stream,c1,c64] [--streams 64] [--rounds 4]
                                 [--per-stream 4] [--max-tokens 16] [--c1-requests 300]
                                 [--concurrency 64] [--c64-requests 4000] [--c64-seconds 8]
                                 [--gateway-workers 1] [--upstream stub] [--no-fastchat]
                                 [--no-pin] [--json out.json]

Starts a controller and one tiny-model worker (or, with --upstream stub, an emulated one), the
gateway, and FastChat 0.2.36's openai_api_server (in a virtual environment of its own, from its
lock: benchmarks/peers.py; --no-fastchat leaves it out), all on loopback. Then, per --phases:

- stream: each round keeps --streams streaming /v1/completions requests in flight down each path
  in turn (same prompts, greedy, so every path does the same work), paths interleaved round by
  round so that drift hits them alike. Per path: p50/p99 of request latency (until
  data: [DONE]) and of time to first byte, and what each adds to the direct path.
- c1: one non-streaming request at a time, --c1-requests per path, the paths taking turns
  request by request: the p50 each proxy adds to the direct path (the direct path is the floor).
- c64: --concurrency non-streaming requests kept in flight (closed loop) down each path, for at
  most --c64-requests requests or --c64-seconds per round: requests per second. The direct
  path is the ceiling a proxy in front of this worker can reach on this machine.

The non-streaming phases use a minimal keep-alive HTTP/1.1 client instead of httpx, so that the
load generator, which shares CPUs with the proxies, costs as little as it can. The worker gets
CPU 0 to itself and the proxies and the client share the others (--no-pin: no placement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request  # module level: the stub's routes name them in annotations
from fastapi.responses import Response, StreamingResponse

from benchmarks.common import (
    Service,
    free_port,
    pagedserve,
    percentile,
    print_table,
    wait_for_workers,
    write_json,
)
from benchmarks.peers import fastchat_python


async def one_stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float]:
    """(seconds to the first byte, seconds to data: [DONE]) of one streamed request."""
    start = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code}: {(await r.aread())[:300]!r}")
        tail = b""
        async for chunk in r.aiter_raw():
            if first is None:
                first = time.perf_counter() - start
            tail = (tail + chunk)[-64:]
    if not tail.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"{url}: the stream did not end with [DONE]")
    return first or 0.0, time.perf_counter() - start


def cpu_seconds(pid: int | None) -> float:
    """CPU time a process and its descendants have used so far (Linux /proc; 0 elsewhere or for
    no process): `gateway --workers N` serves from N child processes."""
    if pid is None:
        return 0.0
    return sum(_own_cpu_seconds(p) for p in [pid, *descendants(pid)])


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command's name (state is [0], ppid [1])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _own_cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def descendants(pid: int) -> list[int]:
    """Children, grandchildren... of `pid` now (Linux /proc; none elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out.extend(children)
        todo.extend(children)
    return out


# -- non-streaming phases: a minimal HTTP/1.1 client ------------------------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs one fixed request and reads whole answers
    (Content-Length or chunked). A few microseconds a request, where httpx takes hundreds: the
    client shares its CPUs with the proxies it measures."""

    def __init__(self, url: str, path: str, body: bytes) -> None:
        self.host, self.port = url.removeprefix("http://").split(":")
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self) -> bytes:
        """The answer's body; RuntimeError unless it is a 200."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        assert self.reader is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(
            (k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines if ln)
        )
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            raise RuntimeError(f"{self.host}:{self.port}: no Content-Length in {head!r}")
        if status_line.split()[1] != "200":
            raise RuntimeError(f"{self.host}:{self.port} answered {status_line}: {body[:300]!r}")
        if headers.get("connection") == "close":
            self.close()
        return body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _plain_body(i: int, args) -> bytes:
    body = {"model": "bench", "prompt": f"Request {i}: tell me about the number {i}",
            "max_tokens": args.max_tokens, "temperature": 0}  # fmt: skip
    return json.dumps(body).encode()


async def one_at_a_time(paths: dict[str, str], args) -> dict[str, list[float]]:
    """Seconds per non-streaming request, one request in flight at a time, the paths taking
    turns request by request so that drift hits them alike."""
    conns = {name: RawConnection(url, "/v1/completions", _plain_body(0, args))
             for name, url in paths.items()}  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for _ in range(20):  # warm up connections and code paths
            for conn in conns.values():
                await conn.post()
        for _ in range(args.c1_requests):
            for name, conn in conns.items():
                start = time.perf_counter()
                await conn.post()
                samples[name].append(time.perf_counter() - start)
    finally:
        for conn in conns.values():
            conn.close()
    return samples


async def closed_loop(url: str, args) -> tuple[int, float]:
    """(requests answered, seconds): --concurrency clients, each sending its next request as
    its last answer arrives, until --c64-requests are answered or --c64-seconds have passed."""
    conns = [RawConnection(url, "/v1/completions", _plain_body(i, args))
             for i in range(args.concurrency)]  # fmt: skip
    sent = done = 0
    try:
        await asyncio.gather(*(c.post() for c in conns))  # connect and warm up
        start = time.perf_counter()
        stop_at = start + args.c64_seconds

        async def client(conn: RawConnection) -> None:
            nonlocal sent, done
            while sent < args.c64_requests and time.perf_counter() < stop_at:
                sent += 1
                await conn.post()
                done += 1

        await asyncio.gather(*(client(c) for c in conns))
        return done, time.perf_counter() - start
    finally:
        for conn in conns:
            conn.close()


async def throughput_rounds(
    paths: dict[str, str], proxies: dict[str, int | None], args
) -> dict[str, dict[str, float]]:
    """Per path: requests, seconds and proxy CPU seconds over --rounds rounds, paths
    interleaved (the order reversed every other round)."""
    totals = {name: {"requests": 0, "seconds": 0.0, "cpu": 0.0} for name in paths}
    for round_ in range(args.rounds):
        order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
        for name in order:
            before = cpu_seconds(proxies[name])
            count, seconds = await closed_loop(paths[name], args)
            t = totals[name]
            t["requests"] += count
            t["seconds"] += seconds
            t["cpu"] += cpu_seconds(proxies[name]) - before
        print(f"c={args.concurrency} round {round_ + 1}/{args.rounds} done", flush=True)
    return totals


async def run_rounds(
    paths: dict[str, str], proxies: dict[str, int | None], args
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """Per round and path: --streams clients, each sending --per-stream requests one after the
    other (closed loop: 64 streams in flight all along, not one burst). Also the CPU seconds
    each path's proxy process spent."""
    body = {"model": "bench", "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
    limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams)
    samples: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
    cpu = dict.fromkeys(paths, 0.0)

    async def user(client: httpx.AsyncClient, url: str, i: int, count: int) -> list:
        prompt = {**body, "prompt": f"Request {i}: tell me about the number {i}"}
        return [await one_stream(client, url, prompt) for _ in range(count)]

    async def load(client: httpx.AsyncClient, url: str, count: int) -> list:
        done = await asyncio.gather(*(user(client, url, i, count) for i in range(args.streams)))
        return [sample for per_user in done for sample in per_user]

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for url in paths.values():  # warm up connections and code paths
            await load(client, url, 1)
        for round_ in range(args.rounds):
            order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
            for name in order:
                before = cpu_seconds(proxies[name])
                samples[name].extend(await load(client, paths[name], args.per_stream))
                cpu[name] += cpu_seconds(proxies[name]) - before
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    return samples, cpu


def pin(services: list[Service], worker: Service) -> str:
    """The worker alone on CPU 0, the proxies and this client on the others, so that a proxy's
    CPU time shows as its own latency instead of slowing the engine (2+ CPUs, Linux)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return "not pinned (fewer than 2 CPUs)"
    rest = set(cpus[1:])
    for s in services:
        for pid in [s.proc.pid, *descendants(s.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(pid, {cpus[0]} if s is worker else rest)
    os.sched_setaffinity(0, rest)
    return f"worker on CPU {cpus[0]}, proxies and client on CPUs {sorted(rest)}"


DIRECT, GATEWAY, FASTCHAT = "direct to the worker", "pagedserve gateway", "FastChat"
PHASES = ("stream", "c1", "c64")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"Comma-separated, of {', '.join(PHASES)}."
    )
    parser.add_argument("--streams", type=int, default=64, help="Concurrent streams per round.")
    parser.add_argument("--rounds", type=int, default=4, help="Rounds per path.")
    parser.add_argument(
        "--per-stream", type=int, default=4, help="Requests each stream sends per round."
    )
    parser.add_argument(
        "--c1-requests", type=int, default=300, help="c1: requests per path, one at a time."
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="c64: non-streaming requests in flight."
    )
    parser.add_argument(
        "--c64-requests", type=int, default=4000, help="c64: most requests per path and round."
    )
    parser.add_argument(
        "--c64-seconds", type=float, default=8.0, help="c64: most seconds per path and round."
    )
    parser.add_argument(
        "--gateway-workers", type=int, default=1, help="Gateway processes (`--workers N`)."
    )
    parser.add_argument("--no-pin", action="store_true", help="Leave CPU placement to the OS.")
    parser.add_argument(
        "--upstream",
        choices=["worker", "stub"],
        default="worker",
        help="worker: a tiny-model worker; stub: an emulated one (fixed pace, no engine; "
        "non-streaming answers at once), which isolates what the proxies add.",
    )
    parser.add_argument(
        "--interval", type=float, default=0.02, help="Seconds between the stub's tokens."
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="Tokens per request.")
    parser.add_argument("--no-fastchat", action="store_true", help="Leave FastChat out.")
    parser.add_argument(
        "--model", type=Path, default=None, help="Model folder [default: a tiny random Llama]."
    )
    parser.add_argument("--json", default=None, help="Write the results here.")
    args = parser.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases takes a comma-separated list of {', '.join(PHASES)}")
    counts = (args.streams, args.rounds, args.per_stream, args.max_tokens, args.c1_requests,
              args.concurrency, args.c64_requests, args.gateway_workers)  # fmt: skip
    if min(counts) < 1 or args.c64_seconds <= 0:
        parser.error("counts must be >= 1 and --c64-seconds > 0")

    work = Path(tempfile.mkdtemp(prefix="pagedserve-gateway-bench-"))
    model = args.model
    if model is None and args.upstream == "worker":
        from pagedserve.deploy.make_model import build_model

        model = build_model("llama", "tiny", work / "model", seed=0)
    services: list[Service] = []
    stream = c1 = c64 = None
    try:
        print("starting controller, worker, gateway" + ("" if args.no_fastchat else ", FastChat"))
        ctl_port = free_port()
        controller = Service("controller", pagedserve("controller", "--port", str(ctl_port)),
                             ctl_port, "/health", work)  # fmt: skip
        services.append(controller)
        port = free_port()
        if args.upstream == "stub":
            argv = [sys.executable, "-m", "benchmarks.gateway", "stub-worker", "--port",
                    str(port), "--controller", controller.url, "--tokens", str(args.max_tokens),
                    "--interval", str(args.interval)]  # fmt: skip
        else:
            argv = pagedserve(
                "worker", "--model-path", str(model), "--model-names", "bench", "--port",
                str(port), "--controller-address", controller.url, "--heartbeat-interval", "1",
                "--kv-cache-memory", str(64 << 20), "--max-model-len", "512",
            )  # fmt: skip
        repo = str(Path(__file__).resolve().parent.parent)  # the stub runs from this folder
        worker = Service("worker", argv, port, "/ready", work, env={"PYTHONPATH": repo})
        services.append(worker)
        wait_for_workers(controller.url, 1, timeout=15)
        port = free_port()
        workers = ["--workers", str(args.gateway_workers)] if args.gateway_workers > 1 else []
        gateway = Service("gateway", pagedserve(
            "gateway", "--port", str(port), "--controller-address", controller.url,
            "--max-concurrent-requests", str(4 * max(args.streams, args.concurrency)), *workers,
        ), port, "/v1/models", work)  # fmt: skip
        services.append(gateway)
        paths = {DIRECT: worker.url, GATEWAY: gateway.url}
        proxies: dict[str, int | None] = {DIRECT: None, GATEWAY: gateway.proc.pid}
        if not args.no_fastchat:
            port = free_port()
            fastchat = Service("fastchat", [
                str(fastchat_python()), "-m", "fastchat.serve.openai_api_server", "--host",
                "127.0.0.1", "--port", str(port), "--controller-address", controller.url,
            ], port, "/v1/models", work, env={"LOGDIR": str(work)})  # fmt: skip
            services.append(fastchat)
            paths[FASTCHAT] = fastchat.url
            proxies[FASTCHAT] = fastchat.proc.pid
        placement = "not pinned" if args.no_pin else pin(services, worker)
        print(f"phases {', '.join(phases)}; {placement}")
        if "stream" in phases:
            print(f"stream: {args.rounds} rounds of {args.streams} concurrent streams per path")
            stream = asyncio.run(run_rounds(paths, proxies, args))
        if "c1" in phases:
            print(f"c1: {args.c1_requests} non-streaming requests per path, one at a time")
            c1 = asyncio.run(one_at_a_time(paths, args))
        if "c64" in phases:
            print(f"c{args.concurrency}: {args.rounds} rounds per path of at most "
                  f"{args.c64_requests} requests or {args.c64_seconds:g} s")  # fmt: skip
            c64 = asyncio.run(throughput_rounds(paths, proxies, args))
    finally:
        for s in reversed(services):
            s.stop()

    results: dict[str, dict] = {}
    if stream is not None:
        results["stream"] = report_stream(*stream)
    if c1 is not None:
        results["c1"] = report_c1(c1)
    if c64 is not None:
        results[f"c{args.concurrency}"] = report_throughput(c64, args.concurrency)
    write_json(
        args.json,
        {
            "benchmark": "gateway",
            "command": " ".join(["python -m benchmarks.gateway", *sys.argv[1:]]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "placement": placement,
            "results": results,
        },
    )


def report_stream(samples: dict[str, list[tuple[float, float]]], cpu: dict[str, float]) -> dict:
    direct = [t for _, t in samples[DIRECT]]
    base = {"p50_ms": percentile(direct, 50) * 1000, "p99_ms": percentile(direct, 99) * 1000}
    results = {}
    for name, values in samples.items():
        total, first = [t for _, t in values], [f for f, _ in values]
        r = {
            "requests": len(values),
            "p50_ms": percentile(total, 50) * 1000,
            "p99_ms": percentile(total, 99) * 1000,
            "mean_ms": statistics.fmean(total) * 1000,
            "ttft_p50_ms": percentile(first, 50) * 1000,
            "ttft_p99_ms": percentile(first, 99) * 1000,
            "proxy_cpu_ms_per_request": cpu[name] * 1000 / len(values),
        }
        r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - base["p99_ms"]
        results[name] = r
    rows = [
        (name, r["requests"], f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
         f"{r['added_p50_ms']:+.1f}", f"{r['added_p99_ms']:+.1f}",
         f"{r['ttft_p50_ms']:.1f}", f"{r['ttft_p99_ms']:.1f}",
         f"{r['proxy_cpu_ms_per_request']:.2f}")
        for name, r in results.items()
    ]  # fmt: skip
    print("\nstreaming, closed loop:")
    print_table(rows, ("path", "requests", "p50 ms", "p99 ms", "added p50", "added p99",
                       "TTFB p50", "TTFB p99", "proxy CPU ms/req"))  # fmt: skip
    if FASTCHAT in results:
        print(
            f"gateway adds {results[GATEWAY]['added_p50_ms']:.1f} ms at p50; "
            f"FastChat adds {results[FASTCHAT]['added_p50_ms']:.1f} ms"
        )
    return results


def report_c1(samples: dict[str, list[float]]) -> dict:
    base = percentile(samples[DIRECT], 50) * 1000
    results = {}
    for name, values in samples.items():
        p50 = percentile(values, 50) * 1000
        results[name] = {
            "requests": len(values),
            "p50_ms": p50,
            "p99_ms": percentile(values, 99) * 1000,
            "added_p50_ms": p50 - base,
        }
    rows = [(name, r["requests"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
             f"{r['added_p50_ms']:+.2f}") for name, r in results.items()]  # fmt: skip
    print("\none non-streaming request at a time (the direct path is the floor):")
    print_table(rows, ("path", "requests", "p50 ms", "p99 ms", "added p50 ms"))
    return results


def report_throughput(totals: dict[str, dict[str, float]], concurrency: int) -> dict:
    results = {}
    for name, t in totals.items():
        results[name] = {
            "requests": int(t["requests"]),
            "seconds": t["seconds"],
            "requests_per_s": t["requests"] / t["seconds"],
            "proxy_cpu_ms_per_request": t["cpu"] * 1000 / max(1, t["requests"]),
        }
    ceiling = results[DIRECT]["requests_per_s"]
    rows = []
    for name, r in results.items():
        vs_fastchat = (
            f"{r['requests_per_s'] / results[FASTCHAT]['requests_per_s']:.2f}x"
            if FASTCHAT in results
            else "-"
        )
        rows.append((name, r["requests"], f"{r['requests_per_s']:.0f}",
                     f"{r['requests_per_s'] / ceiling:.0%}", vs_fastchat,
                     "-" if name == DIRECT else f"{r['proxy_cpu_ms_per_request']:.2f}"))  # fmt: skip
    print(f"\n{concurrency} non-streaming requests in flight (the direct path is the ceiling):")
    print_table(rows, ("path", "requests", "req/s", "of ceiling", "vs FastChat",
                       "proxy CPU ms/req"))  # fmt: skip
    return results


# -- an emulated worker: the same answers on every path, at a fixed pace, no engine ------------


def stub_worker(argv: list[str]) -> None:
    """`python -m benchmarks.gateway stub-worker --port P --controller URL`: answers pagedserve's
    /v1/completions (SSE) and FastChat's worker protocol with --tokens tokens, one every
    --interval seconds, and registers with the controller like a pagedserve worker."""
    import threading
    import uuid

    import uvicorn

    from pagedserve.protocol.fastchat import ConvTemplate

    parser = argparse.ArgumentParser(prog="stub-worker")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--controller", required=True)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args(argv)
    address, worker_id = f"http://127.0.0.1:{args.port}", uuid.uuid4().hex[:12]
    status = {"model_names": ["bench"], "speed": 1, "queue_length": 0, "worker_id": worker_id,
              "context_length": 2048}  # fmt: skip
    app = FastAPI()

    @app.get("/ready")
    @app.get("/health")
    async def ready() -> dict:
        return {"ready": True}

    @app.post("/worker_get_status")
    async def worker_status() -> dict:
        return status

    @app.post("/model_details")
    async def model_details() -> dict:
        return {"context_length": 2048}

    @app.post("/count_token")
    async def count_token(request: Request) -> dict:
        return {"count": len((await request.json()).get("prompt", "").split()), "error_code": 0}

    @app.post("/worker_get_conv_template")
    async def conv_template() -> dict:
        return {"conv": ConvTemplate(name="raw").model_dump()}

    text = "".join(f" t{i}" for i in range(args.tokens))
    usage = {"prompt_tokens": 4, "completion_tokens": args.tokens, "total_tokens": 4 + args.tokens}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):  # at once: the non-streaming phases measure the proxies
            answer = {"id": "cmpl-stub", "object": "text_completion", "created": 0,
                      "model": body["model"], "choices": [{"index": 0, "text": text,
                      "finish_reason": "length"}], "usage": usage}  # fmt: skip
            return Response(json.dumps(answer), media_type="application/json")

        async def events():
            for i in range(args.tokens):
                await asyncio.sleep(args.interval)
                chunk = {"id": "cmpl-stub", "object": "text_completion", "created": 0,
                         "model": body["model"], "choices": [{"index": 0, "text": f" t{i}",
                         "finish_reason": "length" if i == args.tokens - 1 else None}]}  # fmt: skip
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/worker_generate")
    async def generate(request: Request) -> dict:
        await request.json()
        return {"text": text, "error_code": 0, "usage": usage, "finish_reason": "length"}

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> StreamingResponse:
        await request.json()

        async def frames():
            text = ""
            for i in range(args.tokens):
                await asyncio.sleep(args.interval)
                text += f" t{i}"
                done = i == args.tokens - 1
                usage = {"prompt_tokens": 4, "completion_tokens": i + 1, "total_tokens": i + 5}
                frame = {"text": text, "error_code": 0, "usage": usage,
                         "finish_reason": "length" if done else None}  # fmt: skip
                yield json.dumps(frame).encode() + b"\0"

        return StreamingResponse(frames())

    def heartbeats() -> None:
        while True:
            time.sleep(1)
            body = {"worker_name": address, "queue_length": 0, "worker_id": worker_id}
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(args.controller + "/receive_heart_beat", json=body, timeout=5)

    registration = {"worker_name": address, "check_heart_beat": True, "worker_status": status}
    httpx.post(
        args.controller + "/register_worker", json=registration, timeout=5
    ).raise_for_status()
    threading.Thread(target=heartbeats, daemon=True).start()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["stub-worker"]:
        stub_worker(sys.argv[2:])
    else:
        main()
