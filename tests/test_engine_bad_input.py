"""Tests for engine/llm_engine.py and the loader: bad requests and bad models are refused clearly,
and a refused request leaves no trace in the engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import InvalidRequestError, LLMEngine
from pagedserve.engine.sampling_params import SamplingParams

MAX_MODEL_LEN = 64
KV_CACHE_MEMORY = 1 << 20
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture
def engine(tiny_llama: Path) -> LLMEngine:
    """A fresh engine per test (building one takes ~0.1 s), so one test cannot spoil another."""
    return LLMEngine(
        EngineConfig(
            model=str(tiny_llama), kv_cache_memory=KV_CACHE_MEMORY, max_model_len=MAX_MODEL_LEN
        )
    )


def run(engine: LLMEngine, request_id: str, prompt, params: SamplingParams = GREEDY):
    engine.add_request(request_id, prompt, params)
    final = None
    for _ in range(200):
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                final = out
        if not engine.has_unfinished_requests():
            break
    assert final is not None, f"request {request_id!r} did not finish"
    return final


def assert_idle(engine: LLMEngine) -> None:
    """No request, no sequence and no block is left anywhere."""
    assert engine.requests == {}
    assert not engine.has_unfinished_requests()
    assert list(engine.core.scheduler.waiting) == []
    assert engine.core.scheduler.running == []
    assert engine.core.kv_cache.block_tables == {}
    assert engine.core.kv_cache.num_free_blocks == engine.core.kv_cache.pool.num_blocks
    assert engine.core.kv_cache.take_copies() == []


def block_bytes(model: Path, block_size: int = 16) -> int:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_key_value_heads"] * head_dim * 4  # K and V, float32 on CPU
    return per_token * block_size * cfg["num_hidden_layers"]


# --- bad requests ---------------------------------------------------------------------------

BAD_PROMPTS = [
    pytest.param("", "empty", id="empty-string"),
    pytest.param([], "empty", id="empty-token-list"),
    pytest.param({"prompt_token_ids": []}, "empty", id="empty-dict"),
    pytest.param([5] * MAX_MODEL_LEN, f"max_model_len={MAX_MODEL_LEN}", id="max-model-len"),
    pytest.param([5] * (MAX_MODEL_LEN + 10), "at most 63", id="longer-than-max-model-len"),
    pytest.param([5, 1024], r"\[0, 1024\)", id="token-id-equal-to-vocab"),
    pytest.param([5, 10**9], r"\[0, 1024\)", id="huge-token-id"),
    pytest.param([-1, 5], r"\[0, 1024\)", id="negative-token-id"),
    pytest.param({"prompt_token_ids": [5, 2048]}, r"\[0, 1024\)", id="dict-token-id-out-of-vocab"),
    pytest.param(None, "a prompt is a string", id="none"),
    pytest.param([1.5, 2.0], "a prompt is a string", id="float-token-ids"),
    pytest.param(12, "a prompt is a string", id="bare-int"),
]


@pytest.mark.parametrize(("prompt", "message"), BAD_PROMPTS)
def test_bad_prompt_is_refused_with_a_message_naming_the_problem(
    engine: LLMEngine, prompt, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", prompt, GREEDY)
    assert_idle(engine)


@pytest.mark.parametrize(
    "token_ids",
    [pytest.param([5, "7"], id="string"), pytest.param([5, 7.5], id="float")],
)
def test_non_integer_token_ids_in_a_dict_prompt_are_refused(engine: LLMEngine, token_ids) -> None:
    with pytest.raises(InvalidRequestError, match="token id"):
        engine.add_request("bad", {"prompt_token_ids": token_ids}, GREEDY)
    assert_idle(engine)


def test_invalid_request_error_is_a_value_error() -> None:
    assert issubclass(InvalidRequestError, ValueError)


def test_sampling_params_of_the_wrong_type_are_refused(engine: LLMEngine) -> None:
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        engine.add_request("bad", "Hello", {"temperature": 0.0})
    assert_idle(engine)


def test_duplicate_request_id_is_refused_and_the_first_request_is_unharmed(
    engine: LLMEngine,
) -> None:
    alone = run(engine, "solo", "Hello world")
    engine.add_request("dup", "Hello world", GREEDY)
    with pytest.raises(InvalidRequestError, match="'dup' is already in use"):
        engine.add_request("dup", "Another prompt", GREEDY)
    assert len(engine.requests["dup"].seqs) == 1
    assert len(engine.core.scheduler.waiting) == 1
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["dup"]
    assert finished[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert_idle(engine)


def test_request_id_can_be_reused_after_the_request_finished(engine: LLMEngine) -> None:
    first = run(engine, "again", "Hello world")
    second = run(engine, "again", "Hello world")
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert_idle(engine)


@pytest.mark.parametrize(("prompt", "message"), [BAD_PROMPTS[i] for i in (0, 3, 5)])
def test_engine_serves_normally_after_a_refused_request(
    engine: LLMEngine, prompt, message: str
) -> None:
    before = run(engine, "before", "The cat sat")
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("refused", prompt, GREEDY)
    after = run(engine, "after", "The cat sat")
    assert after.outputs[0].token_ids == before.outputs[0].token_ids
    assert len(after.outputs[0].token_ids) == GREEDY.max_tokens
    assert after.outputs[0].finish_reason == "length"
    assert_idle(engine)


def test_longest_allowed_prompt_generates_one_token_and_stops_at_length(
    engine: LLMEngine,
) -> None:
    out = run(engine, "long", [5] * (MAX_MODEL_LEN - 1), SamplingParams(max_tokens=50))
    assert len(out.outputs[0].token_ids) == 1
    assert out.outputs[0].finish_reason == "length"
    assert_idle(engine)


def test_prompt_longer_than_the_batch_budget_is_refused_without_chunked_prefill(
    tiny_llama: Path,
) -> None:
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_llama),
            kv_cache_memory=KV_CACHE_MEMORY,
            max_model_len=MAX_MODEL_LEN,
            max_num_batched_tokens=16,
            enable_chunked_prefill=False,
        )
    )
    with pytest.raises(InvalidRequestError, match="max_num_batched_tokens=16"):
        engine.add_request("big", [5] * 17, GREEDY)
    assert_idle(engine)
    assert run(engine, "fits", [5] * 16).finished
    assert_idle(engine)


# --- requests of several sequences that cannot run together ---------------------------------


def finishes_or_is_refused(engine: LLMEngine, params: SamplingParams, steps: int = 300) -> None:
    """Add a request of several sequences: it must be refused or finish. A request that can
    never be scheduled must not wait forever."""
    try:
        engine.add_request("many", [5] * 10, params)
    except InvalidRequestError:
        assert_idle(engine)
        return
    for _ in range(steps):
        engine.step()
        if not engine.has_unfinished_requests():
            break
    waiting = [(g.request_id, len(g.seqs)) for g in engine.core.scheduler.waiting]
    running = [(g.request_id, len(g.seqs)) for g in engine.core.scheduler.running]
    assert not engine.has_unfinished_requests(), (
        f"stuck after {steps} steps: waiting={waiting} running={running}"
    )
    assert_idle(engine)


def small_engine(tiny_llama: Path, **kwargs) -> LLMEngine:
    kwargs.setdefault("kv_cache_memory", KV_CACHE_MEMORY)
    return LLMEngine(EngineConfig(model=str(tiny_llama), max_model_len=MAX_MODEL_LEN, **kwargs))


SAMPLES = SamplingParams(n=4, temperature=1.0, max_tokens=40, ignore_eos=True)
BEAMS = SamplingParams(n=4, use_beam_search=True, temperature=0.0, max_tokens=40, ignore_eos=True)


def test_more_samples_than_max_num_seqs_are_refused_or_served(tiny_llama: Path) -> None:
    # Engine bug: the four samples never get four seats, so the request waits forever.
    finishes_or_is_refused(small_engine(tiny_llama, max_num_seqs=2), SAMPLES)


def test_more_samples_than_max_num_batched_tokens_are_refused_or_served(
    tiny_llama: Path,
) -> None:
    # Engine bug: the four samples must step together, which takes four tokens of a budget of
    # two, so after the fan-out the request never runs again.
    finishes_or_is_refused(small_engine(tiny_llama, max_num_batched_tokens=2), SAMPLES)


@pytest.mark.parametrize("params", [SAMPLES, BEAMS], ids=["samples", "beams"])
def test_samples_that_outgrow_the_kv_cache_together_are_refused_or_served(
    tiny_llama: Path, params: SamplingParams
) -> None:
    # Engine bug: four sequences of up to 50 tokens need up to 16 blocks of a cache of 4. They
    # preempt themselves, are recomputed, preempt themselves again, forever.
    engine = small_engine(tiny_llama, kv_cache_memory=block_bytes(tiny_llama) * 4)
    finishes_or_is_refused(engine, params)


# --- bad models and configurations ----------------------------------------------------------


def test_non_existent_model_path_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="does not exist") as info:
        LLMEngine(EngineConfig(model=str(missing), kv_cache_memory=KV_CACHE_MEMORY))
    assert "no-such-model" in str(info.value)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path), kv_cache_memory=KV_CACHE_MEMORY))


def test_unsupported_architecture_is_refused_naming_it(tiny_llama: Path, tmp_path: Path) -> None:
    model = tmp_path / "foo"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="FooForCausalLM.*not supported") as info:
        LLMEngine(EngineConfig(model=str(model), kv_cache_memory=KV_CACHE_MEMORY))
    assert "LlamaForCausalLM" in str(info.value), "the message lists what is supported"


def test_max_model_len_beyond_the_models_positions_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="max_model_len 4096 exceeds the model's positions"):
        LLMEngine(
            EngineConfig(model=str(tiny_llama), kv_cache_memory=KV_CACHE_MEMORY, max_model_len=4096)
        )


def test_kv_budget_below_one_max_model_len_sequence_is_refused(tiny_llama: Path) -> None:
    blocks_per_seq = MAX_MODEL_LEN // 16
    too_small = block_bytes(tiny_llama) * (blocks_per_seq - 1)
    with pytest.raises(
        ValueError, match=f"fewer than one sequence of max_model_len={MAX_MODEL_LEN}"
    ):
        LLMEngine(
            EngineConfig(
                model=str(tiny_llama), kv_cache_memory=too_small, max_model_len=MAX_MODEL_LEN
            )
        )


def test_kv_budget_of_exactly_one_max_model_len_sequence_serves_it(tiny_llama: Path) -> None:
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_llama),
            kv_cache_memory=block_bytes(tiny_llama) * (MAX_MODEL_LEN // 16),
            max_model_len=MAX_MODEL_LEN,
        )
    )
    assert engine.core.kv_cache.pool.num_blocks == MAX_MODEL_LEN // 16
    out = run(engine, "full", [5] * 40, SamplingParams(temperature=0.0, max_tokens=100))
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == MAX_MODEL_LEN
    assert out.outputs[0].finish_reason == "length"
    assert_idle(engine)


def test_kv_budget_smaller_than_one_block_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="holds no block"):
        LLMEngine(EngineConfig(model=str(tiny_llama), kv_cache_memory=100))


@pytest.mark.parametrize("threads", [0, -2, 1.5, True, "2"])
def test_bad_cpu_threads_are_refused(threads) -> None:
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer"):
        EngineConfig(model="m", cpu_threads=threads)


def test_cpu_threads_sets_the_threads_the_engine_steps_with(tiny_llama: Path) -> None:
    before = torch.get_num_threads()
    try:
        engine = LLMEngine(
            EngineConfig(model=str(tiny_llama), kv_cache_memory=KV_CACHE_MEMORY, cpu_threads=1)
        )
        assert torch.get_num_threads() == 1
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        torch.set_num_threads(before)
