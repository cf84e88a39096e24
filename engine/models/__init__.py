"""Model registry: the Hugging Face config's `architectures` name -> the engine's model class."""

from __future__ import annotations

from torch import nn

from pagedserve.engine.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
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
