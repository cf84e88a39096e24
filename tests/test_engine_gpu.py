"""The equivalence test on CUDA, when a GPU is present (skipped cleanly otherwise)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve.engine.llm import LLM
from pagedserve.engine.sampling_params import SamplingParams


@pytest.mark.gpu
def test_greedy_matches_transformers_on_cuda(small_llama):
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(5, 1000, (int(n),), generator=g).tolist()
        for n in torch.randint(1, 200, (16,), generator=g)
    ]
    llm = LLM(small_llama, device="cuda", dtype="float32", gpu_memory_utilization=0.5)
    outs = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )
    hf = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.float32).cuda()
    for prompt, out in zip(prompts, outs, strict=True):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=24, min_new_tokens=24,
                          do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()
