"""Step-load autoscaling benchmark: one load, two deployments, each through
`pagedserve serve --config` in a temp dir on loopback.

- autoscaled: min 1, max `--max-replicas`, short windows (`--up-after`, `--down-after`,
  `--cooldown`), plus a second model at zero replicas for the cold start;
- fixed: `--max-replicas` replicas throughout (the baseline, in the same run).

Phases: low load (`--low-streams` closed-loop streams) -> step up (`--high-streams`) -> hold ->
stop (idle). Measured: the time from the step to the first request completed by a replica that
had not served before it (the gateway's x-pagedserve-route header names the worker); SLO
violation seconds (seconds whose requests, by start, had a p50 TTFT over `--slo-ttft`);
replica-seconds (ready replicas from GET /admin/workers every 0.5 s, integrated); and, for the
autoscaled stack, the cold start from zero (a first request's time to its first token).

    python -m benchmarks.autoscale --json autoscale.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from benchmarks.common import free_port, percentile, print_table, write_json

MODEL = "bench"
COLD = "bench-cold"
PEERS = (
    "Peers' defaults, for comparison (not run): Ray Serve scales up after upscale_delay_s = 30 s "
    "and down after downscale_delay_s = 600 s; AIBrix's autoscaling window is 180 s."
)


@dataclass
class Sample:
    started: float
    ttft: float | None
    ended: float
    worker: str | None
    ok: bool


@dataclass
class Run:
    name: str
    samples: list[Sample] = field(default_factory=list)
    replicas: list[tuple[float, int]] = field(default_factory=list)  # (time, ready replicas)
    step_at: float = 0.0
    stop_at: float = 0.0
    cold_start: float | None = None


class Stack:
    """`pagedserve serve --config` of one stack file, in its own process group."""

    def __init__(self, work: Path, models: list[dict]) -> None:
        ports = {n: free_port() for n in ("admin", "controller", "gateway", "workers")}
        config = {"controller": {"port": ports["controller"]},
                  "gateway": {"port": ports["gateway"], "cold_start_timeout": 120},
                  "admin": {"port": ports["admin"]}, "log_dir": str(work / "logs"),
                  "worker_base_port": ports["workers"], "cpu_threads_per_worker": 1,
                  "models": models}  # fmt: skip
        (work / "stack.yaml").write_text(yaml.safe_dump(config))
        self.gateway = f"http://127.0.0.1:{ports['gateway']}"
        self.admin = f"http://127.0.0.1:{ports['admin']}"
        self.out = work / "serve.out"
        with self.out.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pagedserve.deploy.cli", "serve", "--config",
                 str(work / "stack.yaml")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while "pagedserve is serving" not in self.out.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the stack did not start; see {self.out}")
            time.sleep(0.5)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(50)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


async def stream_once(client: httpx.AsyncClient, gateway: str, model: str,
                      max_tokens: int) -> Sample:  # fmt: skip
    body = {"model": model, "prompt": "Tell me a story about", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}  # fmt: skip
    started, ttft, worker, ok = time.monotonic(), None, None, False
    try:
        async with client.stream("POST", f"{gateway}/v1/completions", json=body) as r:
            route = r.headers.get("x-pagedserve-route", "")
            worker = next((p.split("=", 1)[1] for p in route.split("; ")
                           if p.startswith("worker=")), None)  # fmt: skip
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                    ttft = time.monotonic() - started
            ok = r.status_code == 200
    except httpx.HTTPError:
        pass
    return Sample(started, ttft, time.monotonic(), worker, ok)


async def drive(stack: Stack, run: Run, args: argparse.Namespace) -> None:
    """The phases, with closed-loop streams, while a sampler counts ready replicas."""
    async with httpx.AsyncClient(timeout=120) as client:
        stop_sampling = asyncio.Event()

        async def sample_replicas() -> None:
            while not stop_sampling.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    rows = (await client.get(f"{stack.admin}/admin/workers")).json()["workers"]
                    ready = sum(r["model"] == MODEL and r["state"] == "ready" for r in rows)
                    run.replicas.append((time.monotonic(), ready))
                await asyncio.sleep(0.5)

        async def streams(count: int, until: float) -> None:
            async def loop() -> None:
                while time.monotonic() < until:
                    run.samples.append(await stream_once(client, stack.gateway, MODEL,
                                                         args.max_tokens))  # fmt: skip

            await asyncio.gather(*(loop() for _ in range(count)))

        sampler = asyncio.create_task(sample_replicas())
        low_end = time.monotonic() + args.low_seconds
        await streams(args.low_streams, low_end)
        run.step_at = time.monotonic()
        await streams(args.high_streams, run.step_at + args.high_seconds)
        run.stop_at = time.monotonic()
        await asyncio.sleep(args.idle_seconds)
        stop_sampling.set()
        await sampler
        if args.cold:
            first = await stream_once(client, stack.gateway, COLD, 8)
            run.cold_start = first.ttft if first.ok else None


def summarize(run: Run, slo: float) -> dict:
    before = {s.worker for s in run.samples if s.ended <= run.step_at and s.ok}
    new = [
        s.ended for s in run.samples if s.ok and s.worker not in before and s.started >= run.step_at
    ]
    t0 = run.samples[0].started if run.samples else 0.0
    by_second: dict[int, list[float]] = {}
    for s in run.samples:
        if s.ttft is not None:
            by_second.setdefault(int(s.started - t0), []).append(s.ttft)
    violations = sum(1 for v in by_second.values() if percentile(v, 50) > slo)
    seconds = 0.0
    for (t, n), (t_next, _) in zip(run.replicas, run.replicas[1:], strict=False):
        seconds += n * (t_next - t)
    ttfts = [s.ttft for s in run.samples if s.ttft is not None]
    low = max((n for t, n in run.replicas if t <= run.step_at), default=0)
    more = [t for t, n in run.replicas if t > run.step_at and n > low]
    return {
        "deployment": run.name,
        "requests": len(run.samples),
        "failed": sum(not s.ok for s in run.samples),
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 99), 3) if ttfts else None,
        "step_to_ready_s": round(more[0] - run.step_at, 1) if more else None,
        "step_to_new_replica_s": round(min(new) - run.step_at, 1) if new else None,
        "slo_violation_s": violations,
        "replica_seconds": round(seconds, 1),
        "max_ready": max((n for _, n in run.replicas), default=0),
        "ready_at_end": run.replicas[-1][1] if run.replicas else 0,
        "cold_start_s": round(run.cold_start, 1) if run.cold_start is not None else None,
    }


def deployment(args: argparse.Namespace, model: Path, autoscaled: bool) -> list[dict]:
    engine = {"max_model_len": 512, "kv_cache_memory": 64 << 20}
    if not autoscaled:
        return [{"name": MODEL, "model_path": str(model), "replicas": args.max_replicas,
                 "engine": engine}]  # fmt: skip
    return [
        {"name": MODEL, "model_path": str(model), "replicas": 1, "engine": engine,
         "autoscale": {"min_replicas": 1, "max_replicas": args.max_replicas,
                       "target_queue": args.target_queue, "up_after": args.up_after,
                       "down_after": args.down_after, "cooldown": args.cooldown}},
        {"name": COLD, "model_path": str(model), "replicas": 0, "engine": engine,
         "autoscale": {"min_replicas": 0, "max_replicas": 1}},
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-path", type=Path, help="default: a tiny random Llama, built here")
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--low-streams", type=int, default=2)
    p.add_argument("--high-streams", type=int, default=16)
    p.add_argument("--low-seconds", type=float, default=10)
    p.add_argument("--high-seconds", type=float, default=35)
    p.add_argument("--idle-seconds", type=float, default=20)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--target-queue", type=float, default=4)
    p.add_argument("--up-after", type=float, default=3)
    p.add_argument("--down-after", type=float, default=10)
    p.add_argument("--cooldown", type=float, default=5)
    p.add_argument("--slo-ttft", type=float, default=0.25, help="seconds, TTFT p50 per second")
    p.add_argument("--json")
    p.add_argument("--keep", type=Path, help="keep the stacks' files and logs here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="autoscale-bench-") as tmp:
        root = args.keep or Path(tmp)
        model = args.model_path
        if model is None:
            from pagedserve.deploy.make_model import build_model

            model = build_model("llama", "tiny", root / "model")
        rows = []
        for name, autoscaled in (("autoscaled", True), (f"fixed x{args.max_replicas}", False)):
            work = root / name.replace(" ", "-")
            work.mkdir(parents=True)
            started = time.monotonic()
            stack = Stack(work, deployment(args, model, autoscaled))
            print(f"{name}: stack up in {time.monotonic() - started:.0f}s; running the phases",
                  flush=True)  # fmt: skip
            run = Run(name)
            try:
                args.cold = autoscaled
                asyncio.run(drive(stack, run, args))
            finally:
                stack.stop()
            rows.append(summarize(run, args.slo_ttft))
    headers = tuple(rows[0])
    print_table([tuple("-" if v is None else v for v in r.values()) for r in rows], headers)
    print(PEERS)
    write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                           "peers": PEERS})  # fmt: skip


if __name__ == "__main__":
    main()
