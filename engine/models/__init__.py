"""Model registry: the Hugging Face config's `architectures` name -> the engine's model class."""

from __future__ import annotations

from torch import nn

from pagedserve.engine.models.gpt2 import GPT2LMHeadModel
from pagedserve.engine.models.gpt_neox import GPTNeoXForCausalLM
from pagedserve.engine.models.llama import LlamaForCausalLM, MistralForCausalLM
from pagedserve.engine.models.opt import OPTForCausalLM
from pagedserve.engine.models.qwen2 import Qwen2ForCausalLM
from pagedserve.engine.models.stablelm import StableLmForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "GPTNeoXForCausalLM": GPTNeoXForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "OPTForCausalLM": OPTForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "StableLmForCausalLM": StableLmForCausalLM,
}


def model_class(config) -> type[nn.Module]:
    names = getattr(config, "architectures", None) or []
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"architecture {names or '(none given)'} is not supported; "
        f"supported architectures: {sorted(MODEL_REGISTRY)}"
    )
