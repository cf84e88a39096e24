"""Greedy output of the engine is token-for-token that of Hugging Face `transformers`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams

MAX_TOKENS = 24


def random_prompts(count: int, max_len: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (count,), generator=g).tolist()
    return [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = model.generate(
            torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        outs.append(ids[0, len(p) :].tolist())
    return outs


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(18, 120, seed=7)


@pytest.fixture(scope="module")
def reference(small_llama, prompts) -> list[list[int]]:
    return hf_greedy(small_llama, prompts, MAX_TOKENS)


def run_engine(path, prompts, **engine_args):
    llm = LLM(path, max_model_len=256, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def kv_bytes_for_blocks(blocks: int, block_size: int) -> int:
    # small preset: 4 layers, 4 KV heads, head_dim 32, float32, keys and values
    return blocks * block_size * 4 * 4 * 32 * 4 * 2


@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_matches_transformers(small_llama, prompts, reference, block_size):
    llm, got = run_engine(small_llama, prompts, block_size=block_size)
    assert got == reference
    assert llm.engine.stats().num_preemptions == 0


def test_greedy_matches_transformers_under_preemption(small_llama, prompts, reference):
    # 24 blocks of 16 tokens: room for about three sequences at once, so most are preempted.
    llm, got = run_engine(
        small_llama, prompts, block_size=16, kv_cache_memory=kv_bytes_for_blocks(24, 16)
    )
    assert llm.engine.stats().num_preemptions > 0
    assert got == reference
    assert llm.engine.core.kv_cache.num_free_blocks == llm.engine.core.runner.num_blocks


def test_greedy_matches_transformers_with_small_prefill_chunks(small_llama, prompts, reference):
    llm, got = run_engine(small_llama, prompts, block_size=8, max_num_batched_tokens=13)
    assert got == reference


def test_greedy_matches_transformers_without_chunked_prefill(small_llama, prompts, reference):
    llm, got = run_engine(
        small_llama,
        prompts,
        enable_chunked_prefill=False,
        max_num_batched_tokens=256,
        max_num_seqs=5,
    )
    assert got == reference


def test_tied_embeddings_model_matches_transformers(tiny_llama):
    prompts = random_prompts(16, 60, seed=3)
    _, got = run_engine(tiny_llama, prompts, block_size=16)
    assert got == hf_greedy(tiny_llama, prompts, MAX_TOKENS)


def test_llama3_rope_scaling_matches_transformers(tmp_path, tiny_llama):
    import shutil

    from transformers import AutoConfig

    path = tmp_path / "llama3"
    shutil.copytree(tiny_llama, path)
    config = AutoConfig.from_pretrained(path)
    config.rope_parameters = {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    config.save_pretrained(path)
    prompts = random_prompts(6, 200, seed=11)
    _, got = run_engine(path, prompts)
    assert got == hf_greedy(path, prompts, MAX_TOKENS)


def test_text_prompts_and_detokenized_text(tiny_llama):
    llm = LLM(tiny_llama, max_model_len=256)
    prompts = ["The café on the corner", "東京 is a city", "def add(a, b):"]
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False
    )
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == llm.tokenizer.encode(prompt)
        completion = out.outputs[0]
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == 12
        assert completion.text == llm.tokenizer.decode(
            completion.token_ids, skip_special_tokens=True
        )


def test_every_block_is_free_after_all_requests_finish(small_llama, prompts):
    llm = LLM(small_llama, max_model_len=256, kv_cache_memory=kv_bytes_for_blocks(30, 16))
    params = [
        SamplingParams(temperature=0.8, seed=i, max_tokens=5 + i) for i in range(len(prompts))
    ]
    llm.generate(prompts, params, use_tqdm=False)
    stats = llm.engine.stats()
    assert stats.num_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert not llm.engine.requests
