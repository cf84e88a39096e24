"""Gateway overhead: the latency a request gains by going through the gateway, against going
straight to the worker, and against FastChat's openai_api_server in front of the same worker.

    python -m benchmarks.gateway [--streams 64] [--rounds 4] [--per-stream 4] [--max-tokens 16]
                                 [--no-fastchat] [--no-pin] [--json out.json]

Starts a controller and one tiny-model worker, the gateway, and FastChat 0.2.36's
openai_api_server (in a virtual environment of its own, from its lock: benchmarks/peers.py;
--no-fastchat leaves it out). Each round keeps --streams streaming /v1/completions requests
in flight down each path in turn (same prompts, greedy, so every path does the same work), paths
interleaved round by round so that drift hits them alike. The worker gets CPU 0 to itself and
the proxies share the others (--no-pin: no placement). Prints, per path, p50/p99 of request
latency (until data: [DONE]) and of time to first byte, and what each adds to the direct path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from fastapi import FastAPI, Request  # module level: the stub's routes name them in annotations
from fastapi.responses import StreamingResponse

from benchmarks.common import (
    Service,
    free_port,
    pagedserve,
    percentile,
    print_table,
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
    """CPU time a process has used so far (Linux /proc; 0 elsewhere or for no process)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        os.sched_setaffinity(s.proc.pid, {cpus[0]} if s is worker else rest)
    os.sched_setaffinity(0, rest)
    return f"worker on CPU {cpus[0]}, proxies and client on CPUs {sorted(rest)}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64, help="Concurrent streams per round.")
    parser.add_argument("--rounds", type=int, default=4, help="Rounds per path.")
    parser.add_argument(
        "--per-stream", type=int, default=4, help="Requests each stream sends per round."
    )
    parser.add_argument("--no-pin", action="store_true", help="Leave CPU placement to the OS.")
    parser.add_argument(
        "--upstream",
        choices=["worker", "stub"],
        default="worker",
        help="worker: a tiny-model worker; stub: an emulated one (fixed pace, no engine), "
        "which isolates what the proxies add.",
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
    if min(args.streams, args.rounds, args.per_stream, args.max_tokens) < 1:
        parser.error("--streams, --rounds, --per-stream and --max-tokens must be >= 1")

    work = Path(tempfile.mkdtemp(prefix="pagedserve-gateway-bench-"))
    model = args.model
    if model is None and args.upstream == "worker":
        from pagedserve.deploy.make_model import build_model

        model = build_model("llama", "tiny", work / "model", seed=0)
    services: list[Service] = []
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
        deadline = time.monotonic() + 15
        while not httpx.get(controller.url + "/workers").json()["workers"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not register")
            time.sleep(0.1)
        port = free_port()
        gateway = Service("gateway", pagedserve(
            "gateway", "--port", str(port), "--controller-address", controller.url,
            "--max-concurrent-requests", str(4 * args.streams),
        ), port, "/v1/models", work)  # fmt: skip
        services.append(gateway)
        paths = {"direct to the worker": worker.url, "pagedserve gateway": gateway.url}
        proxies: dict[str, int | None] = {
            "direct to the worker": None,
            "pagedserve gateway": gateway.proc.pid,
        }
        if not args.no_fastchat:
            port = free_port()
            fastchat = Service("fastchat", [
                str(fastchat_python()), "-m", "fastchat.serve.openai_api_server", "--host",
                "127.0.0.1", "--port", str(port), "--controller-address", controller.url,
            ], port, "/v1/models", work, env={"LOGDIR": str(work)})  # fmt: skip
            services.append(fastchat)
            paths["FastChat openai_api_server"] = fastchat.url
            proxies["FastChat openai_api_server"] = fastchat.proc.pid
        placement = "not pinned" if args.no_pin else pin(services, worker)
        print(f"{args.rounds} rounds of {args.streams} concurrent streams per path; {placement}")
        samples, cpu = asyncio.run(run_rounds(paths, proxies, args))
    finally:
        for s in reversed(services):
            s.stop()

    direct = samples["direct to the worker"]
    base = {
        "p50_ms": percentile([t for _, t in direct], 50) * 1000,
        "p99_ms": percentile([t for _, t in direct], 99) * 1000,
    }
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
    print()
    print_table(rows, ("path", "requests", "p50 ms", "p99 ms", "added p50", "added p99",
                       "TTFB p50", "TTFB p99", "proxy CPU ms/req"))  # fmt: skip
    fastchat_added = results.get("FastChat openai_api_server", {}).get("added_p50_ms")
    gateway_added = results["pagedserve gateway"]["added_p50_ms"]
    if fastchat_added:
        print(
            f"\ngateway adds {gateway_added:.1f} ms at p50; FastChat adds {fastchat_added:.1f} ms"
        )
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


# -- an emulated worker: the same answers on every path, at a fixed pace, no engine ------------


def stub_worker(argv: list[str]) -> None:
    """`python -m benchmarks.gateway stub-worker --port P --controller URL`: answers pagedserve's
    /v1/completions (SSE) and FastChat's worker protocol with --tokens tokens, one every
    --interval seconds, and registers with the controller like a pagedserve worker."""
    import json
    import threading
    import uuid

    import uvicorn

    from pagedserve.controller.protocol import ConvTemplate

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

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()

        async def events():
            for i in range(args.tokens):
                await asyncio.sleep(args.interval)
                chunk = {"id": "cmpl-stub", "object": "text_completion", "created": 0,
                         "model": body["model"], "choices": [{"index": 0, "text": f" t{i}",
                         "finish_reason": "length" if i == args.tokens - 1 else None}]}  # fmt: skip
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

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
