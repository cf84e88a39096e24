"""Dispatch: least_load versus round_robin over two workers of unequal speed, in one run.

    python -m benchmarks.dispatch [--requests 100] [--rate 40] [--json out.json]

Starts a controller and two workers of the same tiny model, one fast (--fast-seqs sequences
per step) and one slow (--slow-seqs), then for each policy restarts the controller with it
(the workers register again within one heartbeat) and sends the same bounded burst: requests
arriving at --rate per second, each asking the controller for a worker (/get_worker_address,
as FastChat's clients do) and generating on it (/worker_generate). Prints p50/p99 latency and
each worker's share per policy; least_load should show the clearly lower p99.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import (
    Service,
    free_port,
    pagedserve,
    percentile,
    print_table,
    write_json,
)

POLICIES = ("round_robin", "least_load")


async def one_request(
    client: httpx.AsyncClient, controller: str, delay: float, args
) -> tuple[str, float]:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    r = await client.post(controller + "/get_worker_address", json={"model": "bench"})
    address = r.json()["address"]
    body = {
        "model": "bench",
        "prompt": "Tell me a story",
        "max_new_tokens": args.max_tokens,
        "temperature": 0,
    }
    r = await client.post(address + "/worker_generate", json=body)
    r.raise_for_status()
    return address, time.perf_counter() - start


async def burst(controller: str, args) -> list[tuple[str, float]]:
    limits = httpx.Limits(max_connections=args.requests + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        jobs = [one_request(client, controller, i / args.rate, args) for i in range(args.requests)]
        return await asyncio.gather(*jobs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=100, help="Requests per policy.")
    parser.add_argument("--rate", type=float, default=40.0, help="Arrivals per second.")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="Tokens each request generates."
    )
    parser.add_argument(
        "--fast-seqs", type=int, default=16, help="--max-num-seqs of the fast worker."
    )
    parser.add_argument(
        "--slow-seqs", type=int, default=1, help="--max-num-seqs of the slow worker."
    )
    parser.add_argument("--heartbeat-interval", type=float, default=0.25)
    parser.add_argument(
        "--model", type=Path, default=None, help="Model folder [default: a tiny random Llama]."
    )
    parser.add_argument("--json", default=None, help="Write the results here.")
    args = parser.parse_args()
    if args.requests < 1 or args.rate <= 0 or args.max_tokens < 1:
        parser.error("--requests and --max-tokens must be >= 1 and --rate > 0")

    work = Path(tempfile.mkdtemp(prefix="pagedserve-dispatch-"))
    model = args.model
    if model is None:
        from pagedserve.deploy.make_model import build_model

        model = build_model("llama", "tiny", work / "model", seed=0)
    ctl_port = free_port()
    controller_url = f"http://127.0.0.1:{ctl_port}"
    engine = ["--kv-cache-memory", str(64 << 20), "--max-model-len", "512"]
    workers: list[Service] = []
    results: dict[str, dict] = {}
    try:
        print(
            f"starting two workers (max_num_seqs {args.fast_seqs} and {args.slow_seqs}) ...",
            flush=True,
        )
        for seqs in (args.fast_seqs, args.slow_seqs):
            port = free_port()
            argv = pagedserve(
                "worker", "--model-path", str(model), "--model-names", "bench",
                "--controller-address", controller_url, "--heartbeat-interval",
                str(args.heartbeat_interval), "--max-num-seqs", str(seqs), *engine,
                "--port", str(port),
            )  # fmt: skip
            workers.append(Service(f"worker-{seqs}", argv, port, "/ready", work))
        speed = {
            workers[0].url: f"fast ({args.fast_seqs} seqs)",
            workers[1].url: f"slow ({args.slow_seqs} seq)",
        }
        for policy in POLICIES:
            ctl = Service(
                f"controller-{policy}",
                pagedserve("controller", "--dispatch-method", policy,
                           "--health-check-interval", "1", "--port", str(ctl_port)),
                ctl_port, "/health", work,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 10
                while len(httpx.get(controller_url + "/workers").json()["workers"]) < 2:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the workers did not register with the controller")
                    time.sleep(0.05)
                print(f"{policy}: {args.requests} requests at {args.rate}/s ...", flush=True)
                start = time.perf_counter()
                done = asyncio.run(burst(controller_url, args))
                wall = time.perf_counter() - start
            finally:
                ctl.stop()
            latencies = [t for _, t in done]
            results[policy] = {
                "p50_s": percentile(latencies, 50),
                "p99_s": percentile(latencies, 99),
                "mean_s": statistics.fmean(latencies),
                "max_s": max(latencies),
                "wall_s": wall,
                "share": {speed[w.url]: sum(a == w.url for a, _ in done) for w in workers},
            }
    finally:
        for w in workers:
            w.stop()

    rows = [
        (p, f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}", f"{r['mean_s']:.2f}", f"{r['wall_s']:.1f}",
         " / ".join(f"{k}: {v}" for k, v in r["share"].items()))
        for p, r in results.items()
    ]  # fmt: skip
    print()
    print_table(rows, ("policy", "p50 s", "p99 s", "mean s", "wall s", "requests per worker"))
    ratio = results["round_robin"]["p99_s"] / results["least_load"]["p99_s"]
    print(f"\nleast_load p99 is {ratio:.2f}x lower than round_robin's")
    write_json(
        args.json,
        {
            "benchmark": "dispatch",
            "command": " ".join(["python -m benchmarks.dispatch", *sys.argv[1:]]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
            "p99_ratio_round_robin_over_least_load": ratio,
        },
    )


if __name__ == "__main__":
    main()
