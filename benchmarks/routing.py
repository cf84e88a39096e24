"""Routing: round_robin, least_load and prefix_aware over the same seeded traces, in one run.

    python -m benchmarks.routing [--workers 2|4] [--policies round_robin,least_load,prefix_aware]
                                 [--rounds 1] [--quick] [--no-policy-flag] [--json out.json]

For each policy a fresh stack on 127.0.0.1 (controller, --workers workers of one random Llama
with prefix caching on, the gateway), both services started with `--routing-policy POLICY`, so
no policy inherits another's warm caches. Each worker gets one thread and one CPU of its own
where there are enough (--no-pin: no placement). Three traces, built from --seed, run in the
same order on every stack, streaming /v1/chat/completions through the gateway (greedy,
--max-tokens, at most --concurrency chains in flight):

- shared_prefix: --prefixes long system prompts (several hundred tokens), each user asks one
  short question under one of them; users in a seeded random order.
- multi_turn: --sessions chats of --turns turns; each turn sends the whole conversation so far
  plus a new user message, with an `x-session-id` header; a session's turns go in order, the
  sessions side by side. The assistant turns are seeded text, not the model's replies, so every
  policy gets byte-identical prompts.
- no_reuse: --unique prompts of mixed length that share nothing.

Each worker's KV cache (--kv-cache-tokens) defaults to about 60% of the shared system prompts'
tokens (or, if more, room for its share of the requests in flight at the longest prompt), plus
room for their answers: one worker cannot keep every shared prompt, the workers together can.
That is the case prefix-aware routing exists for; a larger cache lets every policy hit, a
smaller one lets none.

Prints per trace and policy: requests, errors, output tok/s, requests/s, TTFT p50/p99 (to the
first token of content), the share of responses whose `x-pagedserve-route` header reports
cached_tokens > 0 (the router's estimate) and the share of prompt tokens the workers found in
their prefix caches (the engines' count, from their /metrics); then the goals: on every trace prefix_aware within 5% of the best other
policy (output tok/s and TTFT p50), and on shared_prefix at least 1.5x least_load's output tok/s
or at most half its TTFT p50.

With --no-policy-flag every stack runs the default policy under each name (a check of the
harness, or of the noise between identical stacks), and the goals are marked as not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import (
    Service,
    build_random_model,
    free_port,
    pagedserve,
    percentile,
    print_table,
    write_json,
)

POLICIES = ("round_robin", "least_load", "prefix_aware")
TRACES = ("shared_prefix", "multi_turn", "no_reuse")
MODEL = "bench"
ROUTE_HEADER = "x-pagedserve-route"
# Sizes of each trace: (full run, --quick). Token lengths are (low, high), uniform.
PROFILES = {
    "prefixes": (16, 4),
    "users": (96, 16),
    "sessions": (12, 4),
    "turns": (4, 3),
    "unique": (48, 12),
    "max_tokens": (16, 8),
}
PREFIX_TOKENS = (384, 640)
QUESTION_TOKENS = (8, 32)
TURN_TOKENS = (16, 48)
UNIQUE_TOKENS = (32, 512)


# -- traces: chains of requests, a chain's requests sent in order ---------------------------------


@dataclass
class Chain:
    messages: list[list[dict]]  # one request's messages per entry
    session: str | None = None  # sent as x-session-id


class TextMaker:
    """Seeded text of a given token count, from the words of the tokenizer's own corpus."""

    def __init__(self, tokenizer, rng: random.Random) -> None:
        from pagedserve.deploy import make_model

        corpus = Path(make_model.__file__).parent / "data" / "corpus.txt"
        self.words = sorted(set(corpus.read_text(encoding="utf-8").split()))
        self.tokenizer = tokenizer
        self.rng = rng

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, span: tuple[int, int], head: str = "") -> str:
        target = self.rng.randint(*span)
        words = head.split()
        while self.tokens(" ".join(words)) < target:
            words.extend(self.rng.choices(self.words, k=max(1, (target - len(words)) // 3)))
        while len(words) > 1 and self.tokens(" ".join(words[:-1])) >= target:
            words.pop()
        return " ".join(words)


def build_traces(tokenizer, args) -> dict[str, list[Chain]]:
    def maker(name: str) -> TextMaker:
        return TextMaker(tokenizer, random.Random(f"{args.seed}-{name}"))

    t = maker("shared_prefix")
    systems = [t.text(PREFIX_TOKENS, f"System prompt {k}.") for k in range(args.prefixes)]
    users = [
        Chain([[{"role": "system", "content": t.rng.choice(systems)},
                {"role": "user", "content": t.text(QUESTION_TOKENS, f"User {u} asks:")}]])
        for u in range(args.users)
    ]  # fmt: skip

    t = maker("multi_turn")
    sessions = []
    for s in range(args.sessions):
        conversation: list[dict] = []
        turns = []
        for k in range(args.turns):
            conversation.append({"role": "user", "content": t.text(TURN_TOKENS, f"S{s}T{k}:")})
            turns.append(list(conversation))
            conversation.append({"role": "assistant", "content": t.text(TURN_TOKENS)})
        sessions.append(Chain(turns, session=f"session-{args.seed}-{s}"))

    t = maker("no_reuse")
    unique = [
        Chain([[{"role": "user", "content": t.text(UNIQUE_TOKENS, f"Prompt {i} ({t.rng.random()}):")}]])
        for i in range(args.unique)
    ]  # fmt: skip
    return {"shared_prefix": users, "multi_turn": sessions, "no_reuse": unique}


def trace_stats(tokenizer, traces: dict[str, list[Chain]]) -> dict[str, dict]:
    """Requests and prompt tokens (as the chat template renders them) of each trace."""
    stats = {}
    for name, chains in traces.items():
        lengths = [
            len(tokenizer(text, add_special_tokens=False)["input_ids"])
            for chain in chains
            for m in chain.messages
            for text in [
                tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
            ]
        ]
        stats[name] = {
            "requests": len(lengths),
            "prompt_tokens_mean": round(sum(lengths) / len(lengths)),
            "prompt_tokens_max": max(lengths),
        }
    return stats


# -- sending a trace ------------------------------------------------------------------------------


@dataclass
class Sample:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    route: dict[str, str] = field(default_factory=dict)


def parse_route(value: str | None) -> dict[str, str]:
    """`policy=prefix_aware; worker=w1; cached_tokens=48` -> a dict (empty if no header)."""
    route = {}
    for part in (value or "").split(";"):
        key, sep, val = part.strip().partition("=")
        if sep:
            route[key.strip()] = val.strip()
    return route


async def one_request(
    client: httpx.AsyncClient, url: str, messages: list[dict], session: str | None, args
) -> Sample:
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"x-session-id": session} if session else {}
    start = time.perf_counter()
    ttft, chunks, usage_tokens, done = None, 0, None, False
    try:
        async with client.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            if r.status_code != 200:
                text = (await r.aread())[:200].decode(errors="replace")
                return Sample(False, f"HTTP {r.status_code}: {text}")
            route = parse_route(r.headers.get(ROUTE_HEADER))
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        chunks += 1
                        ttft = ttft if ttft is not None else time.perf_counter() - start
    except (httpx.HTTPError, ValueError) as e:
        return Sample(False, f"{type(e).__name__}: {e}"[:200])
    if not done:
        return Sample(False, "the stream ended without data: [DONE]")
    latency = time.perf_counter() - start
    return Sample(True, None, ttft if ttft is not None else latency, latency,
                  usage_tokens if usage_tokens is not None else chunks, route)  # fmt: skip


async def run_trace(url: str, chains: list[Chain], args) -> tuple[list[Sample], float]:
    """Every chain's requests in order; at most --concurrency chains at once; the whole trace
    bounded by --trace-timeout (requests not finished by then count as errors)."""
    samples: list[Sample] = []
    queue = list(reversed(chains))
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.request_timeout, connect=5.0)

    async def runner(client: httpx.AsyncClient) -> None:
        while queue:
            chain = queue.pop()
            for k, messages in enumerate(chain.messages):
                sample = await one_request(client, url, messages, chain.session, args)
                samples.append(sample)
                if not sample.ok:  # a session stops at its first failed turn
                    left = len(chain.messages) - k - 1
                    samples.extend(Sample(False, "an earlier turn failed") for _ in range(left))
                    break

    total = sum(len(c.messages) for c in chains)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = [asyncio.create_task(runner(client)) for _ in range(args.concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=args.trace_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    samples.extend(Sample(False, "not finished within --trace-timeout")
                   for _ in range(total - len(samples)))  # fmt: skip
    return samples, wall


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.ok]
    ttfts = [s.ttft for s in ok]
    routed = [s for s in ok if s.route.get("cached_tokens", "").isdigit()]
    workers: dict[str, int] = {}
    for s in ok:
        if "worker" in s.route:
            workers[s.route["worker"]] = workers.get(s.route["worker"], 0) + 1
    errors = [s.error for s in samples if not s.ok]
    return {
        "requests": len(samples),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall,
        "output_tokens": sum(s.output_tokens for s in ok),
        "output_tok_s": sum(s.output_tokens for s in ok) / wall if wall else 0.0,
        "requests_s": len(ok) / wall if wall else 0.0,
        "ttft_p50_ms": percentile(ttfts, 50) * 1000 if ttfts else None,
        "ttft_p99_ms": percentile(ttfts, 99) * 1000 if ttfts else None,
        "latency_p50_ms": percentile([s.latency for s in ok], 50) * 1000 if ok else None,
        "cached_share": (
            sum(int(s.route["cached_tokens"]) > 0 for s in routed) / len(routed) if routed else None
        ),
        "requests_per_worker": workers,
    }


# -- one stack per policy -------------------------------------------------------------------------


def policy_flag_known() -> bool:
    """Whether both `pagedserve gateway` and `pagedserve controller` take --routing-policy."""
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}
    for command in ("gateway", "controller"):
        out = subprocess.run(pagedserve(command, "--help"), capture_output=True, text=True,
                             env=env, timeout=60)  # fmt: skip
        if "--routing-policy" not in out.stdout:
            return False
    return True


def wait_until(what: str, check, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {seconds:.0f} s")
        time.sleep(0.1)


def warm_up(worker: Service, i: int) -> None:
    """One short request straight to the worker (not through the gateway, so no policy sees
    it), so that first-call costs are not billed to the first trace."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"warm up {i}"}],
            "max_tokens": 2, "temperature": 0}  # fmt: skip
    httpx.post(worker.url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()


def run_policy(policy: str, model: Path, traces: dict[str, list[Chain]], work: Path,
               args) -> tuple[dict[str, tuple[list[Sample], float]], str]:  # fmt: skip
    """A fresh controller, workers and gateway for `policy`; every trace in order on it."""
    flag = ["--routing-policy", policy] if args.policy_flag else []
    services: list[Service] = []
    try:
        port = free_port()
        controller = Service(f"controller-{policy}", pagedserve(
            "controller", "--port", str(port), "--health-check-interval", "1", *flag,
        ), port, "/health", work)  # fmt: skip
        services.append(controller)
        workers = []
        for i in range(args.workers):  # started side by side, then waited for
            port = free_port()
            argv = pagedserve(
                "worker", "--model-path", str(model), "--model-names", MODEL,
                "--port", str(port), "--controller-address", controller.url,
                "--heartbeat-interval", "1", "--cpu-threads", "1", "--enable-prefix-caching",
                "--kv-cache-memory", str(args.kv_cache_bytes),
                "--max-model-len", str(args.max_model_len), "--seed", "0",
            )  # fmt: skip
            workers.append(Service(f"worker{i}-{policy}", argv, port, "/ready", work, wait=False))
            services.append(workers[-1])
        port = free_port()
        gateway = Service(f"gateway-{policy}", pagedserve(
            "gateway", "--port", str(port), "--controller-address", controller.url,
            "--routing-refresh-interval", "1", *flag,
        ), port, "/v1/models", work, wait=False)  # fmt: skip
        services.append(gateway)
        for s in services[1:]:
            s.wait_ready()
        placement = "not pinned" if args.no_pin else pin(workers)
        wait_until(
            "the workers did not register",
            lambda: len(httpx.get(controller.url + "/workers").json()["workers"]) >= args.workers,
        )
        wait_until(
            "the gateway did not list the model",
            lambda: any(m["id"] == MODEL for m in httpx.get(gateway.url + "/v1/models").json()["data"]),
        )  # fmt: skip
        time.sleep(2.5)  # two of the gateway's refreshes: its view holds every worker
        for i, w in enumerate(workers):
            warm_up(w, i)
        results = {}
        for name in TRACES:
            print(f"  {policy}: {name} ({sum(len(c.messages) for c in traces[name])} requests)"
                  " ...", flush=True)  # fmt: skip
            before = cache_counts(workers)
            samples, wall = asyncio.run(run_trace(gateway.url, traces[name], args))
            after = cache_counts(workers)
            results[name] = (
                samples,
                wall,
                tuple(b - a for a, b in zip(before, after, strict=True)),
            )
        return results, placement
    finally:
        for s in reversed(services):
            s.stop()


def cache_counts(workers: list[Service]) -> tuple[float, float]:
    """Prompt tokens the workers found in their prefix caches, and looked up, so far: what the
    routing header's cached_tokens estimates, as the engines count it."""
    hits = queries = 0.0
    for w in workers:
        for line in httpx.get(w.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("pagedserve_worker_prefix_cache_hits_total "):
                hits += float(line.split()[1])
            elif line.startswith("pagedserve_worker_prefix_cache_queries_total "):
                queries += float(line.split()[1])
    return hits, queries


def pin(workers: list[Service]) -> str:
    """Worker i on CPU i (mod the CPUs); the controller, gateway and this client float."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return "not pinned (fewer than 2 CPUs)"
    for i, w in enumerate(workers):
        os.sched_setaffinity(w.proc.pid, {cpus[i % len(cpus)]})
    return "workers on CPUs " + ", ".join(str(cpus[i % len(cpus)]) for i in range(len(workers)))


# -- the report -----------------------------------------------------------------------------------


def goals(results: dict[str, dict], measured: bool) -> list[tuple]:
    """Rows: the goal, the figures, PASS/FAIL (or why it was not judged)."""
    rows: list[tuple] = []
    if "prefix_aware" not in results:
        return [("prefix_aware not among --policies", "", "n/a")]
    others = [p for p in results if p != "prefix_aware"]
    verdict = (lambda ok: "PASS" if ok else "FAIL") if measured else (lambda ok: "not measured")
    for trace in TRACES:
        pa = results["prefix_aware"][trace]
        if not others or pa["ttft_p50_ms"] is None:
            rows.append((f"{trace}: within 5% of the best other", "no figures", "n/a"))
            continue
        best_tps = max(results[p][trace]["output_tok_s"] for p in others)
        best_ttft = min(results[p][trace]["ttft_p50_ms"] or math.inf for p in others)
        tps_ratio = pa["output_tok_s"] / best_tps if best_tps else math.inf
        ttft_ratio = pa["ttft_p50_ms"] / best_ttft
        rows.append((
            f"{trace}: within 5% of the best other",
            f"tok/s x{tps_ratio:.2f} (>= 0.95), TTFT p50 x{ttft_ratio:.2f} (<= 1.05)",
            verdict(tps_ratio >= 0.95 and ttft_ratio <= 1.05),
        ))  # fmt: skip
    if "least_load" in results:
        pa, ll = results["prefix_aware"]["shared_prefix"], results["least_load"]["shared_prefix"]
        if pa["ttft_p50_ms"] and ll["ttft_p50_ms"] and ll["output_tok_s"]:
            tps_ratio = pa["output_tok_s"] / ll["output_tok_s"]
            ttft_ratio = pa["ttft_p50_ms"] / ll["ttft_p50_ms"]
            rows.append((
                "shared_prefix: vs least_load",
                f"tok/s x{tps_ratio:.2f} (>= 1.5) or TTFT p50 x{ttft_ratio:.2f} (<= 0.5)",
                verdict(tps_ratio >= 1.5 or ttft_ratio <= 0.5),
            ))  # fmt: skip
    return rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, choices=(2, 4), default=2)
    parser.add_argument("--policies", default=",".join(POLICIES), help="Comma-separated.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every trace.")
    parser.add_argument("--quick", action="store_true", help="A very small run (smaller traces).")
    parser.add_argument("--prefixes", type=int, help="shared_prefix: system prompts [8; quick 4].")
    parser.add_argument("--users", type=int, help="shared_prefix: requests [64; quick 16].")
    parser.add_argument("--sessions", type=int, help="multi_turn: sessions [12; quick 4].")
    parser.add_argument("--turns", type=int, help="multi_turn: turns per session [4; quick 3].")
    parser.add_argument("--unique", type=int, help="no_reuse: requests [48; quick 12].")
    parser.add_argument("--max-tokens", type=int, help="Tokens per answer [16; quick 8].")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="Run every policy this often (order reversed every other round) and pool the "
        "samples, so that the machine's drift hits each policy alike.",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=8, help="Chains in flight at once.")
    parser.add_argument(
        "--kv-cache-tokens", type=int, default=None,
        help="KV-cache slots per worker [about 60%% of the shared prompts' tokens or room for "
        "the requests in flight, whichever is more].",
    )  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=120.0, help="Seconds a request.")
    parser.add_argument("--trace-timeout", type=float, default=300.0, help="Seconds a trace.")
    parser.add_argument("--no-pin", action="store_true", help="Leave CPU placement to the OS.")
    parser.add_argument(
        "--no-policy-flag", action="store_true",
        help="Do not pass --routing-policy (every stack runs the gateway's built-in policy); "
        "also chosen on its own when the commands lack the flag.",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="Write the results here.")
    args = parser.parse_args()
    for key, (full, quick) in PROFILES.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or set(policies) - set(POLICIES):
        parser.error(f"--policies takes a comma-separated subset of {', '.join(POLICIES)}")
    if min(args.prefixes, args.users, args.sessions, args.turns, args.unique, args.max_tokens,
           args.concurrency, args.rounds) < 1:  # fmt: skip
        parser.error("trace sizes, --max-tokens, --concurrency and --rounds must be >= 1")

    started = time.perf_counter()
    args.policy_flag = not args.no_policy_flag and policy_flag_known()
    if not args.policy_flag:
        why = "--no-policy-flag" if args.no_policy_flag else "the commands lack --routing-policy"
        print(f"NOTE: {why}: every stack runs the gateway's built-in policy under each name")

    root = Path(tempfile.gettempdir()) / "pagedserve-bench"
    model = build_random_model("llama", root, hidden=512, layers=8, heads=8, kv_heads=4,
                               intermediate=1376, vocab=1024)  # fmt: skip
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = AutoConfig.from_pretrained(model)
    traces = build_traces(tokenizer, args)
    stats = trace_stats(tokenizer, traces)
    systems = {c.messages[0][0]["content"] for c in traces["shared_prefix"]}
    shared_tokens = sum(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in systems)
    longest = max(s["prompt_tokens_max"] for s in stats.values())
    args.max_model_len = longest + args.max_tokens + 16
    if args.kv_cache_tokens is None:
        in_flight = math.ceil(args.concurrency / args.workers) + 1
        room = max(int(0.6 * shared_tokens), in_flight * longest, args.max_model_len)
        args.kv_cache_tokens = room + in_flight * (args.max_tokens + 32)
    elif args.kv_cache_tokens < args.max_model_len:
        parser.error(f"--kv-cache-tokens must hold the longest request ({args.max_model_len})")
    head_dim = config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # fp32
    args.kv_cache_bytes = args.kv_cache_tokens * per_token
    print(f"traces (seed {args.seed}): " + "; ".join(
        f"{n} {s['requests']} requests, prompts {s['prompt_tokens_mean']} tokens mean"
        f" / {s['prompt_tokens_max']} max" for n, s in stats.items()))  # fmt: skip
    print(f"{len(systems)} shared system prompts, {shared_tokens} tokens in all; each worker's "
          f"KV cache {args.kv_cache_tokens} tokens ({args.kv_cache_bytes >> 20} MiB)")  # fmt: skip

    work = Path(tempfile.mkdtemp(prefix="pagedserve-routing-"))
    runs: dict[str, dict[str, list]] = {p: {t: [] for t in TRACES} for p in policies}
    placement = ""
    for round_ in range(args.rounds):
        order = policies if round_ % 2 == 0 else list(reversed(policies))
        for policy in order:
            print(f"round {round_ + 1}/{args.rounds}, {policy}: starting a controller, "
                  f"{args.workers} workers and a gateway", flush=True)  # fmt: skip
            done, placement = run_policy(policy, model, traces, work, args)
            for trace, run in done.items():
                runs[policy][trace].append(run)
    results: dict[str, dict] = {}
    for policy, per_trace in runs.items():
        results[policy] = {}
        for trace, rounds in per_trace.items():
            samples = [s for run, _, _ in rounds for s in run]
            r = summarize(samples, sum(wall for _, wall, _ in rounds))
            r["output_tok_s_by_round"] = [summarize(s, w)["output_tok_s"] for s, w, _ in rounds]
            hits, queries = (sum(c[i] for _, _, c in rounds) for i in (0, 1))
            r["worker_hit_rate"] = hits / queries if queries else None
            if args.json:
                r["samples"] = [asdict(s) for s in samples]
            results[policy][trace] = r
    total = time.perf_counter() - started

    rows = [
        (trace, policy, r["requests"], r["errors"], fmt(r["output_tok_s"], ".1f"),
         fmt(r["requests_s"], ".2f"), fmt(r["ttft_p50_ms"], ".0f"), fmt(r["ttft_p99_ms"], ".0f"),
         fmt(r["cached_share"] and r["cached_share"] * 100, ".0f"),
         fmt(r["worker_hit_rate"] and r["worker_hit_rate"] * 100, ".0f"),
         " / ".join(str(n) for _, n in sorted(r["requests_per_worker"].items())) or "-")
        for trace in TRACES
        for policy, per_trace in results.items()
        for r in [per_trace[trace]]
    ]  # fmt: skip
    print(f"\n{args.workers} workers ({placement}); logs in {work}; total {total:.0f} s")
    print_table(rows, ("trace", "policy", "requests", "errors", "out tok/s", "req/s",
                       "TTFT p50 ms", "TTFT p99 ms", "cached %", "hit %",
                       "per worker"))  # fmt: skip
    for policy, per_trace in results.items():
        for trace, r in per_trace.items():
            if r["first_errors"]:
                print(f"{policy} / {trace}: first errors: {r['first_errors']}")
    verdicts = goals(results, args.policy_flag)
    print()
    print_table(verdicts, ("goal", "prefix_aware", "verdict"))
    write_json(
        args.json,
        {
            "benchmark": "routing",
            "command": " ".join(["python -m benchmarks.routing", *sys.argv[1:]]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "policy_flag": args.policy_flag,
            "placement": placement,
            "traces": stats,
            "shared_prompt_tokens": shared_tokens,
            "total_s": total,
            "results": results,
            "goals": [dict(zip(("goal", "figures", "verdict"), g, strict=True)) for g in verdicts],
        },
    )


if __name__ == "__main__":
    main()
