"""From a path to a ready model: config, tokenizer, the engine's own layers, weights in them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.models import model_class
from pagedserve.engine.parallel import ParallelContext
from pagedserve.engine.weights import iter_checkpoint, load_weights

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: object
    tokenizer: object  # None on tensor-parallel ranks other than 0
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: list[int]
    # (checkpoint name, shape read from the file) of each lazy read, under tensor parallelism
    reads: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)


def load_model(config: EngineConfig, ctx: ParallelContext | None = None) -> LoadedModel:
    """The model (this rank's shard of it under tensor parallelism) with its weights."""
    ctx = ctx or ParallelContext()
    path, gguf_file, hf_config = _read_config(config)
    reads: list[tuple[str, tuple[int, ...]]] = []
    if gguf_file is not None:
        from pagedserve.engine import gguf_loader

        tokenizer = gguf_loader.load_gguf_tokenizer(gguf_file) if ctx.is_driver else None
        weights = gguf_loader.iter_gguf_weights(gguf_file)  # dequantized whole, then narrowed
    else:
        from transformers import AutoTokenizer

        tokenizer = (
            AutoTokenizer.from_pretrained(config.tokenizer or path) if ctx.is_driver else None
        )
        weights = iter_checkpoint(path, lazy=ctx.size > 1, reads=reads)

    cls = model_class(hf_config)  # refuses unsupported architectures before any heavy work
    dtype = config.torch_dtype(_checkpoint_dtype(hf_config))
    max_model_len = _max_model_len(config, hf_config)
    start = time.perf_counter()
    model = _build(cls, hf_config, dtype, config.torch_device, ctx)
    load_weights(model, weights)
    model.eval()
    logger.info("loaded %s (%s) in %.1fs", path.name, cls.__name__, time.perf_counter() - start)
    return LoadedModel(
        model=model,
        hf_config=hf_config,
        tokenizer=tokenizer,
        dtype=dtype,
        max_model_len=max_model_len,
        eos_token_ids=_eos_token_ids(hf_config, tokenizer),
        reads=reads,
    )


def check_tensor_parallel(config: EngineConfig) -> None:
    """Refuse a tensor_parallel_size the model cannot be split by (attention heads, KV heads,
    MLP rows), with a ValueError, before any rank starts: the model is built on the meta
    device, which allocates nothing."""
    _, _, hf_config = _read_config(config)
    _max_model_len(config, hf_config)
    meta_model(hf_config, config.tensor_parallel_size)


def meta_model(hf_config, tensor_parallel_size: int = 1) -> nn.Module:
    """The engine's model for `hf_config` (rank 0's shard) on the meta device: its layers and
    shapes, no memory. Raises ValueError for an unsupported architecture or a split the
    model's heads or rows do not allow."""
    return _build(model_class(hf_config), hf_config, torch.float32, torch.device("meta"),
                  ParallelContext(0, tensor_parallel_size))  # fmt: skip


def _read_config(config: EngineConfig) -> tuple[Path, Path | None, object]:
    path = Path(config.model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {config.model!r} does not exist")
    gguf_file = _gguf_file(path)
    if gguf_file is not None:
        from pagedserve.engine import gguf_loader

        return path, gguf_file, gguf_loader.load_gguf_config(gguf_file)
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder: it has no config.json and no .gguf file")
    return path, None, AutoConfig.from_pretrained(path)


def _build(cls, hf_config, dtype: torch.dtype, device: torch.device, ctx: ParallelContext):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(hf_config, ctx)
    finally:
        torch.set_default_dtype(previous)


def _gguf_file(path: Path) -> Path | None:
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        from pagedserve.engine.gguf_loader import resolve_gguf_file

        return resolve_gguf_file(path)
    return None


# Where configs give the longest sequence their positions support (vLLM reads the same keys).
_LENGTH_KEYS = (
    "max_position_embeddings",  # most; GPT-2's n_positions answers to this name too
    "n_positions",
    "max_sequence_length",
    "max_seq_len",
    "seq_length",
    "n_ctx",
)


def _max_model_len(config: EngineConfig, hf_config) -> int:
    """The config's length unless a shorter one is asked for; a longer one is refused (rotary
    tables and learned position embeddings end there)."""
    limits = [getattr(hf_config, key, None) for key in _LENGTH_KEYS]
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    if not limits:
        if config.max_model_len is None:
            raise ValueError("the model config gives no maximum length; pass --max-model-len")
        return config.max_model_len
    limit = min(limits)
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's positions ({limit}); "
            f"use at most {limit}"
        )
    return config.max_model_len


def _eos_token_ids(hf_config, tokenizer) -> list[int]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _checkpoint_dtype(hf_config) -> torch.dtype | None:
    # transformers 5 calls it `dtype`; 4.x `torch_dtype` (which 5 still answers, with a warning).
    dtype = getattr(hf_config, "dtype", None) if hasattr(hf_config, "dtype") else None
    dtype = dtype or hf_config.__dict__.get("torch_dtype")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
