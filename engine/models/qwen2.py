"""Qwen2 (and Qwen1.5): Llama with biases on q, k and v (not on o), sliding window per layer."""

from __future__ import annotations

from pagedserve.engine.models.decoder import DecoderForCausalLM
from pagedserve.engine.models.llama import llama_spec
from pagedserve.engine.parallel import ParallelContext


class Qwen2ForCausalLM(DecoderForCausalLM):
    def __init__(self, config, tp: ParallelContext | None = None):
        super().__init__(llama_spec(config, qkv_bias=True, o_bias=False), tp)
