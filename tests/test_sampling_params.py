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
        (dict(n=2), r"n must be 1 .*got 2"),
        (dict(n=0), r"n must be 1 .*got 0"),
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


def test_boundary_sampling_params_are_accepted() -> None:
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=1, min_tokens=1)
    SamplingParams(top_p=1e-6, min_p=0.0, max_tokens=None, min_tokens=1000)


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
        (dict(tensor_parallel_size=2), r"tensor_parallel_size > 1 is not supported"),
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
