"""Tests for engine/sampling_params.py and engine/config.py: bad values fail loudly and clearly."""

from __future__ import annotations

import pytest

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=-0.1), r"temperature must be >= 0, got -0\.1"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
        (dict(top_p=-0.2), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), r"top_k must be -1 or 0 \(off\) or a positive number, got -2"),
        (dict(min_p=-0.1), r"min_p must be in \[0, 1\], got -0\.1"),
        (dict(min_p=1.1), r"min_p must be in \[0, 1\]"),
        (dict(max_tokens=0), r"max_tokens must be at least 1, got 0"),
        (dict(max_tokens=-5), r"max_tokens must be at least 1, got -5"),
        (dict(min_tokens=-1), r"min_tokens must be >= 0, got -1"),
        (dict(min_tokens=5, max_tokens=4), r"min_tokens \(5\) must not exceed max_tokens \(4\)"),
        (dict(stop=""), r"stop must be a non-empty string"),
        (dict(stop=["ok", ""]), r"stop must be a non-empty string"),
        (dict(stop=["ok", 3]), r"stop must be a non-empty string"),
        (dict(stop_token_ids=[5, -1]), r"stop_token_ids must be a list of non-negative"),
        (dict(stop_token_ids=["5"]), r"stop_token_ids must be a list of non-negative"),
        (dict(n=0), r"n must be at least 1, got 0"),
        (dict(n=-1), r"n must be at least 1, got -1"),
        (dict(best_of=0), r"best_of must be at least 1, got 0"),
        (dict(n=3, best_of=2), r"n \(3\) must not exceed best_of \(2\)"),
        (dict(logprobs=-1), r"logprobs must be in \[0, 20\], got -1"),
        (dict(logprobs=21), r"logprobs must be in \[0, 20\], got 21"),
        (dict(prompt_logprobs=21), r"prompt_logprobs must be in \[0, 20\], got 21"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\], got 2\.5"),
        (dict(frequency_penalty=-2.5), r"frequency_penalty must be in \[-2, 2\], got -2\.5"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be in \(0, 2\], got 0\.0"),
        (dict(repetition_penalty=float("nan")), r"repetition_penalty must be in \(0, 2\]"),
        (dict(logit_bias={5: 101.0}), r"logit_bias maps token ids"),
        (dict(logit_bias={-1: 1.0}), r"logit_bias maps token ids"),
        (dict(early_stopping="sometimes"), r"early_stopping must be True, False or 'never'"),
        (dict(use_beam_search=True, best_of=2), r"beam search is deterministic"),
        (dict(use_beam_search=True, temperature=0.0), r"beam width \(best_of\) of at least 2"),
        (
            dict(use_beam_search=True, temperature=0.0, best_of=2, top_k=5),
            r"beam search takes no top_p, top_k or min_p",
        ),
    ],
)
def test_bad_sampling_params_raise_value_error_naming_the_field(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
def test_nan_sampling_values_are_refused(field: str) -> None:
    # NaN fails every comparison, so a check written as "reject if x < 0" lets it through
    # and the sampler then draws garbage.
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: float("nan")})


def test_boundary_sampling_params_are_accepted_as_given() -> None:
    low = SamplingParams(
        temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, min_tokens=1
    )
    assert (low.temperature, low.top_p, low.min_p) == (0.0, 1.0, 1.0)
    assert (low.top_k, low.max_tokens, low.min_tokens) == (0, 1, 1)  # top_k -1 is stored as 0
    assert low.greedy
    high = SamplingParams(top_p=1e-6, min_p=0.0, max_tokens=None, min_tokens=1000)
    assert (high.top_p, high.min_p, high.max_tokens, high.min_tokens) == (1e-6, 0.0, None, 1000)
    assert not high.greedy


def test_parallel_sampling_counts() -> None:
    # n > 1 is served: n sequences are returned out of best_of (n by default) generated.
    assert (SamplingParams().n, SamplingParams().best_of) == (1, 1)
    assert SamplingParams(n=3).best_of == 3
    assert SamplingParams(n=2, best_of=5).best_of == 5
    assert SamplingParams(n=1, best_of=4).best_of == 4
    assert SamplingParams(n=4, best_of=4).n == 4


def test_beam_search_params() -> None:
    params = SamplingParams(n=2, use_beam_search=True, temperature=0.0)
    assert params.beam_width == 2, "the beam width is best_of, n when best_of is not given"
    params = SamplingParams(n=1, best_of=4, use_beam_search=True, temperature=0.0)
    assert params.beam_width == 4
    assert SamplingParams(best_of=4).beam_width == 1, "no beam search: one sequence per sample"
    for early in (True, False, "never"):
        SamplingParams(n=2, use_beam_search=True, temperature=0.0, early_stopping=early)


def test_boundary_logprobs_and_penalties_are_accepted() -> None:
    SamplingParams(logprobs=0, prompt_logprobs=0)
    SamplingParams(logprobs=20, prompt_logprobs=20)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=2.0)
    params = SamplingParams(logit_bias={3: -100, 7: 100})
    assert params.logit_bias == {3: -100.0, 7: 100.0}
    assert params.needs_penalties
    assert not SamplingParams().needs_penalties
    assert SamplingParams().logit_bias == {}


def test_top_k_minus_one_means_off_and_is_stored_as_zero() -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(top_k=5).top_k == 5


def test_stop_is_normalised_to_a_list_of_strings() -> None:
    assert SamplingParams(stop="###").stop_strings == ["###"]
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]
    assert SamplingParams().stop_strings == []
    assert SamplingParams().stop_token_ids == []


def test_greedy_is_temperature_zero() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.1).greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_size=12), r"block_size must be 8, 16 or 32, got 12"),
        (dict(block_size=0), r"block_size must be 8, 16 or 32, got 0"),
        (dict(max_num_seqs=0), r"max_num_seqs must be at least 1, got 0"),
        (dict(dtype="int8"), r"dtype must be 'auto' or one of .*got 'int8'"),
        (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be in \(0, 1\], got 1\.5"),
        (dict(gpu_memory_utilization=0.0), r"gpu_memory_utilization must be in \(0, 1\]"),
        (dict(device="tpu"), r"device must be 'auto', 'cpu' or 'cuda', got 'tpu'"),
        (dict(max_model_len=0), r"max_model_len must be at least 1, got 0"),
        (dict(kv_cache_memory=0), r"kv_cache_memory must be a positive number of bytes, got 0"),
        (dict(max_num_batched_tokens=0), r"max_num_batched_tokens must be at least 1, got 0"),
        (dict(tensor_parallel_size=0), r"tensor_parallel_size must be at least 1"),
    ],
)
def test_bad_engine_config_raises_value_error_naming_the_field(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(model="unused", **kwargs)


def test_engine_config_defaults_are_valid() -> None:
    config = EngineConfig(model="unused", device="cpu")
    assert config.block_size == 16
    assert config.kv_cache_bytes == 1 << 30
    assert config.batched_tokens == 2048


def test_float16_on_cpu_is_refused_with_an_alternative() -> None:
    config = EngineConfig(model="unused", device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="float16 is only supported on CUDA"):
        config.torch_dtype(None)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 66431829928650674798592},  # found by schemathesis: overflowed a tensor
        {"top_k": 2**31},
        {"seed": 2**64},
        {"seed": -(2**63) - 1},
        {"stop_token_ids": [2**40]},
        {"logit_bias": {2**40: 1.0}},
    ],
)
def test_integers_too_large_for_the_engines_tensors_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
