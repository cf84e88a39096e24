"""Tests for the K/V term of the machine limit that benchmarks/throughput.py prints."""

from __future__ import annotations

import torch

from benchmarks.common import decode_kv_tokens, kv_read_bytes
from pagedserve.deploy.make_model import ARCHS, sized


def test_decode_step_t_reads_the_prompt_plus_t_tokens() -> None:
    # Output token 1 comes from the prompt's step; decode steps 1 and 2 read p+1 and p+2.
    assert decode_kv_tokens([5], 3) == 6 + 7
    assert decode_kv_tokens([5, 10], 3) == (6 + 7) + (11 + 12)
    assert decode_kv_tokens([5, 10], 1) == 0  # no decode step at all


def test_a_sliding_window_caps_the_tokens_read() -> None:
    assert decode_kv_tokens([5, 10], 3, window=8) == (6 + 7) + (8 + 8)


def test_kv_read_bytes_counts_k_and_v_of_every_kv_head_in_every_layer() -> None:
    spec = ARCHS["llama"]
    overrides = sized("llama", hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128)
    config = spec.config_cls(**{**spec.presets["tiny"], **overrides})
    config.architectures = [spec.model_cls.__name__]
    tokens = decode_kv_tokens([4, 9], 5)
    per_token = 2 * 2 * (64 // 4) * 2  # K and V, 2 KV heads of 16, bfloat16
    assert kv_read_bytes(config, [4, 9], 5, torch.bfloat16) == 3 * per_token * tokens
