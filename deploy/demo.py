"""`make demo`: the main job, end to end on a CPU.

Fetches the real demo model (SmolLM2-135M-Instruct) once, builds the tiny random model once,
and runs both through the engine: chat answers from SmolLM2, a batch through the tiny model,
with throughput and KV-cache figures."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pagedserve.deploy.model_store import ModelFetchError, default_cache_dir, fetch_model

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-instruct"
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
]


def tiny_model_path() -> Path:
    """The built-in tiny random Llama, built on first use."""
    from pagedserve.deploy.make_model import build_model

    path = default_cache_dir() / "tiny-llama"
    if not (path / "config.json").exists():
        build_model("llama", "small", path, seed=0)
    return path


def demo_models() -> dict[str, Path]:
    """name -> path: SmolLM2 when it can be fetched, and the tiny random model always."""
    models = {}
    try:
        models[DEMO_MODEL] = fetch_model(DEMO_MODEL)
    except ModelFetchError as e:
        print(f"! could not fetch {DEMO_MODEL} ({e}); using the built-in tiny random model only")
    models["tiny-llama"] = tiny_model_path()
    return models


def run_demo() -> None:
    from pagedserve.engine import LLM, SamplingParams

    models = demo_models()
    for name, path in models.items():
        print(f"\n=== {name} ({path}) ===")
        llm = LLM(path, max_model_len=2048, kv_cache_memory=256 << 20)
        if name == DEMO_MODEL:
            prompts = [
                llm.tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
                for q in CHAT_QUESTIONS
            ]
            params = SamplingParams(temperature=0, max_tokens=96)
            shown = CHAT_QUESTIONS
        else:
            prompts = [f"Story number {i}: once upon a time" for i in range(32)]
            params = SamplingParams(
                temperature=0.8, top_p=0.95, seed=0, max_tokens=64, ignore_eos=True
            )
            shown = prompts[:2]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        for question, out in zip(shown, outputs, strict=False):
            print(f"\n> {question}\n{out.outputs[0].text.strip()}")
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        stats = llm.engine.stats()
        print(
            f"\n{len(prompts)} requests, {generated} tokens in {elapsed:.1f}s: "
            f"{generated / elapsed:.0f} tokens/s; KV cache {stats.num_blocks_total} blocks of "
            f"{stats.block_size} tokens, {stats.num_preemptions} preemptions"
        )
