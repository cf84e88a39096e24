"""The PagedAttention paper's memory figures, measured on pagedserve's own engine.

    python -m benchmarks.memory [--json out.json] [--plot benchmarks/memory.png]

1. KV waste: the share of allocated KV slots that hold no token, averaged over the steps of
   a run, for block sizes 8/16/32, against contiguous reservations (the whole max_model_len
   per request, as HF-style servers do, and prompt + max_tokens, an oracle).
2. Sharing: for parallel sampling (n = 2, 4, 6) and beam search (width 2, 4, 6), the blocks
   the sequences use with copy-on-write sharing versus each keeping its own copy.
3. Prefix caching: requests sharing a 512-token system prompt, time to first token and
   throughput with the cache on and off.

Request lengths are synthetic, drawn to match the paper's datasets (Table 1): "alpaca" with
mean input 19 and output 58 tokens, "sharegpt" with mean input 161 and output 338 tokens
(log-normal, sigma 0.8, clipped to the context length)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import build_random_model, print_table, write_json
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import SamplingParams

DATASETS = {"alpaca": (19.31, 58.45), "sharegpt": (161.31, 337.99)}
MAX_MODEL_LEN = 1024


def lengths(mean: float, count: int, rng: np.random.Generator, low: int, high: int) -> list[int]:
    sigma = 0.8  # log-normal with the given mean
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(rng.lognormal(mu, sigma, count).round(), low, high).astype(int).tolist()


def workload(dataset: str, count: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    mean_in, mean_out = DATASETS[dataset]
    ins = lengths(mean_in, count, rng, 4, MAX_MODEL_LEN // 2)
    outs = lengths(mean_out, count, rng, 4, MAX_MODEL_LEN // 2)
    return [(rng.integers(5, 1000, n).tolist(), m) for n, m in zip(ins, outs, strict=True)]


def make_engine(model: Path, **kwargs) -> LLMEngine:
    args = dict(
        model=str(model), max_model_len=MAX_MODEL_LEN, kv_cache_memory=64 << 20, max_num_seqs=64
    )
    return LLMEngine(EngineConfig(**{**args, **kwargs}))


def run(engine: LLMEngine, requests, params_for, on_step=None) -> float:
    start = time.perf_counter()
    for i, (prompt, out_len) in enumerate(requests):
        engine.add_request(str(i), prompt, params_for(out_len))
    while engine.has_unfinished_requests():
        engine.step()
        if on_step:
            on_step(engine)
    return time.perf_counter() - start


def waste(model: Path, dataset: str, count: int, seed: int) -> list[dict]:
    requests = workload(dataset, count, seed)
    rows = []
    for block_size in (8, 16, 32):
        engine = make_engine(model, block_size=block_size, enable_prefix_caching=False)
        totals = dict(held=0, paged=0, max_len=0, oracle=0)

        def on_step(e: LLMEngine, totals=totals) -> None:
            groups = e.scheduler.running
            totals["held"] += e.stats().tokens_in_cache
            totals["paged"] += e.kv_cache.pool.num_used * e.config.block_size
            totals["max_len"] += len(groups) * MAX_MODEL_LEN
            totals["oracle"] += sum(
                g.seqs[0].num_prompt_tokens + g.params.max_tokens for g in groups
            )

        run(
            engine,
            requests,
            lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
            on_step,
        )
        rows.append({
            "dataset": dataset, "block_size": block_size,
            "paged_waste": 1 - totals["held"] / totals["paged"],
            "contiguous_max_len_waste": 1 - totals["held"] / totals["max_len"],
            "contiguous_oracle_waste": 1 - totals["held"] / totals["oracle"],
        })  # fmt: skip
    return rows


def sharing(model: Path, dataset: str, count: int, seed: int) -> list[dict]:
    requests = workload(dataset, count, seed)
    rows = []
    for mode, widths in (("parallel", (2, 4, 6)), ("beam", (2, 4, 6))):
        for width in widths:
            engine = make_engine(model, enable_prefix_caching=False, kv_cache_memory=256 << 20)
            totals = dict(shared=0, unshared=0)

            def on_step(e: LLMEngine, totals=totals) -> None:
                seqs = [s for g in e.scheduler.running for s in g.unfinished]
                totals["shared"] += e.kv_cache.pool.num_used
                totals["unshared"] += sum(
                    len(e.kv_cache.block_tables.get(s.seq_id, [])) for s in seqs
                )

            def params(n: int, mode=mode, width=width) -> SamplingParams:
                if mode == "beam":
                    return SamplingParams(
                        n=width, best_of=width, use_beam_search=True, temperature=0, max_tokens=n
                    )
                return SamplingParams(
                    n=width, temperature=1.0, seed=0, max_tokens=n, ignore_eos=True
                )

            run(engine, requests, params, on_step)
            rows.append({"dataset": dataset, "mode": mode, "width": width,
                         "memory_saved": 1 - totals["shared"] / totals["unshared"]})  # fmt: skip
    return rows


def prefix_caching(model: Path, count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    system = rng.integers(5, 1000, 512).tolist()
    requests = [
        (system + rng.integers(5, 1000, int(rng.integers(16, 64))).tolist(), 32)
        for _ in range(count)
    ]
    rows = []
    for enabled in (False, True):
        engine = make_engine(model, enable_prefix_caching=enabled, kv_cache_memory=256 << 20,
                             max_num_seqs=count, max_model_len=2048)  # fmt: skip
        ttfts, outputs = [], 0
        start = time.perf_counter()
        for i, (prompt, out_len) in enumerate(requests):
            engine.add_request(
                str(i), prompt, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
            )
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    ttfts.append(out.metrics["first_token_time"] - out.metrics["arrival_time"])
                    outputs += len(out.outputs[0].token_ids)
        elapsed = time.perf_counter() - start
        stats = engine.stats()
        rows.append({"prefix_caching": enabled, "mean_ttft_s": float(np.mean(ttfts)),
                     "output_tokens_per_s": outputs / elapsed, "seconds": elapsed,
                     "hit_rate": stats.prefix_cache_hit_rate})  # fmt: skip
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for dataset, color in zip(DATASETS, ("C0", "C1"), strict=True):
        rows = [r for r in results["waste"] if r["dataset"] == dataset]
        sizes = [r["block_size"] for r in rows]
        paged = [100 * r["paged_waste"] for r in rows]
        axes[0].plot(sizes, paged, "o-", color=color, label=f"paged, {dataset}")
        for key, style, name in (("contiguous_max_len_waste", "--", "max-len"),
                                 ("contiguous_oracle_waste", ":", "prompt+max_tokens")):  # fmt: skip
            axes[0].axhline(
                100 * rows[0][key], ls=style, color=color, label=f"contiguous {name}, {dataset}"
            )
    axes[0].set(xlabel="block size", ylabel="KV slots wasted (%)", title="KV-cache waste")
    axes[0].legend(fontsize=7)
    for mode, marker in (("parallel", "o-"), ("beam", "s-")):
        for dataset in DATASETS:
            rows = [r for r in results["sharing"] if r["mode"] == mode and r["dataset"] == dataset]
            axes[1].plot(
                [r["width"] for r in rows],
                [100 * r["memory_saved"] for r in rows],
                marker,
                label=f"{mode}, {dataset}",
            )
    axes[1].set(xlabel="n / beam width", ylabel="KV memory saved by sharing (%)", title="Sharing")
    axes[1].legend(fontsize=7)
    rows = results["prefix_caching"]
    labels = ["cache off", "cache on"]
    axes[2].bar(labels, [r["output_tokens_per_s"] for r in rows])
    axes[2].set(ylabel="output tokens/s", title="Shared 512-token system prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prefix-requests", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="write the figures as a PNG")
    args = ap.parse_args()
    root = Path(tempfile.gettempdir()) / "pagedserve-bench"
    tiny = build_random_model("llama", root, 64, 2, 4, 2, 172, 1024)
    medium = build_random_model("llama", root, 512, 8, 8, 4, 1376, 8192)

    results = {"waste": [], "sharing": []}
    for dataset in DATASETS:
        results["waste"] += waste(tiny, dataset, args.requests, args.seed)
        results["sharing"] += sharing(tiny, dataset, args.requests // 2, args.seed)
    results["prefix_caching"] = prefix_caching(medium, args.prefix_requests, args.seed)

    print("KV-cache waste, averaged over steps")
    print_table([(r["dataset"], r["block_size"], f"{r['paged_waste']:.2%}", f"{r['contiguous_max_len_waste']:.2%}",
                  f"{r['contiguous_oracle_waste']:.2%}") for r in results["waste"]],
                ("dataset", "block", "paged", f"contiguous {MAX_MODEL_LEN}", "contiguous prompt+max"))  # fmt: skip
    print("\nKV memory saved by sharing blocks (copy-on-write) versus a copy per sequence")
    print_table([(r["dataset"], r["mode"], r["width"], f"{r['memory_saved']:.1%}") for r in results["sharing"]],
                ("dataset", "mode", "n / width", "saved"))  # fmt: skip
    print("\nPrefix caching, 512-token shared system prompt")
    off, on = results["prefix_caching"]
    print_table([(("on" if r["prefix_caching"] else "off"), f"{r['mean_ttft_s'] * 1000:.0f} ms",
                  f"{r['output_tokens_per_s']:.0f}", f"{r['hit_rate']:.1%}") for r in (off, on)],
                ("cache", "mean TTFT", "output tok/s", "hit rate"))  # fmt: skip
    print(f"speed-up: throughput {on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f}x, "
          f"TTFT {off['mean_ttft_s'] / on['mean_ttft_s']:.2f}x")  # fmt: skip
    write_json(args.json, results)
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
