"""Reading checkpoints (safetensors or .bin, sharded or not) into the engine's own layers."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pagedserve.engine.layers import default_weight_loader

logger = logging.getLogger(__name__)


def checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")
    return files


def iter_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs one at a time, memory-mapped where the format allows."""
    from safetensors import safe_open

    for path in tqdm(checkpoint_files(folder), desc="loading weights", unit="file", leave=False):
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, f.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into `model`, merging packed projections; every parameter must
    be filled exactly once, and a missing or mis-shaped tensor is named in the error."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
            continue
        target, shard = name, None
        for part, (merged, shard_id) in packed.items():
            if f".{part}." in name:
                target, shard = name.replace(f".{part}.", f".{merged}."), shard_id
                break
        param = params.get(target)
        if param is None:
            logger.debug("ignoring checkpoint tensor %s", name)
            continue
        loader = getattr(param, "weight_loader", None)
        if shard is not None:
            loader(param, tensor, name, shard)
        else:
            default_weight_loader(param, tensor, name)
        loaded.add(f"{target}:{shard}")
    expected = {f"{n}:{s}" for n, s in _expected_entries(model, packed)}
    missing = sorted(e.split(":")[0] for e in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing tensors for: {', '.join(missing[:8])}")


def _expected_entries(model: nn.Module, packed: dict) -> Iterator[tuple[str, str | None]]:
    shards_of: dict[str, list[str]] = {}
    for merged, shard in packed.values():
        shards_of.setdefault(merged, []).append(shard)
    seen = set()
    for name, param in model.named_parameters():  # tied parameters appear once
        if id(param) in seen:
            continue
        seen.add(id(param))
        merged = next((m for m in shards_of if f".{m}." in name), None)
        if merged is None:
            yield name, None
        else:
            for shard in shards_of[merged]:
                yield name, shard
