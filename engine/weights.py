"""Reading checkpoints (safetensors or .bin, sharded or not) into the engine's own layers.

A model maps checkpoint names onto its parameters through optional hooks, all of them on the
model (engine/models/decoder.py defines them): `normalize_checkpoint_name` (older spellings),
`checkpoint_renames` (checkpoint name part -> parameter name part, in order),
`packed_modules` (checkpoint projection -> merged parameter and shard) and
`convert_checkpoint_tensor` (layouts that differ, such as GPT-2's transposed Conv1D).
Errors name tensors as the checkpoint spells them.

Under tensor parallelism safetensors are read lazily (`CheckpointSlice`): each parameter's
weight loader narrows the tensor to its rank's shard and only that part of the memory map is
read; conversions compose onto the slice instead of reading the whole tensor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pagedserve.engine.layers import default_weight_loader

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files to read: safetensors before .bin; with an index JSON, exactly the
    shards it lists (other files in the folder, such as Mistral's consolidated.safetensors,
    are not read)."""
    for index, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        if (folder / index).is_file():
            return _indexed_files(folder / index)
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ValueError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")


def _indexed_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a checkpoint index (no valid weight_map): {e}") from e
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ValueError(f"{index.name} lists shard files missing from {index.parent}: {absent}")
    return files


def iter_checkpoint(
    folder: Path, lazy: bool = False, reads: list[tuple[str, tuple[int, ...]]] | None = None
) -> Iterator[tuple[str, torch.Tensor | CheckpointSlice]]:
    """Yield (name, tensor) pairs one at a time, memory-mapped where the format allows, with
    a progress bar over the tensors. With `lazy`, safetensors matrices and vectors come as
    `CheckpointSlice`s, read when a loader asks and only as far as it narrows them; `reads`
    then collects (name, shape read) for each read."""
    files = checkpoint_files(folder)
    with tqdm(total=None, desc="loading weights", unit="tensor", leave=False) as bar:
        for path in files:
            bar.set_postfix_str(path.name)
            if path.suffix == ".safetensors":
                yield from _iter_safetensors(path, bar, lazy, reads)
            else:
                yield from _iter_bin(path, bar)


def _iter_safetensors(
    path: Path, bar: tqdm, lazy: bool = False, reads: list | None = None
) -> Iterator[tuple[str, torch.Tensor | CheckpointSlice]]:
    from safetensors import safe_open

    try:
        f = safe_open(path, framework="pt")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    with f:
        names = list(f.keys())
        bar.total = (bar.total or 0) + len(names)
        bar.refresh()
        for name in names:
            if lazy:
                part = f.get_slice(name)
                if len(part.get_shape()) in (1, 2):
                    yield name, CheckpointSlice(part, name, reads)
                    bar.update()
                    continue
            yield name, f.get_tensor(name)
            bar.update()


class CheckpointSlice:
    """A vector or matrix in a safetensors file, not read yet. `narrow` and the re-layouts
    that checkpoint conversions use (`t`, and `view` / `reshape` / `transpose` that keep the
    last dimension) compose maps from this tensor's rows and columns to the file's; `load()`
    reads only the bounding box of the selected rows and columns from the memory map."""

    def __init__(self, part, name: str, reads: list | None, rows=None, cols=None, flip=False):
        self._part, self.name, self._reads = part, name, reads
        shape = part.get_shape()
        if rows is None:  # the file's tensor itself
            rows = torch.arange(shape[0])
            cols = torch.arange(shape[1]) if len(shape) == 2 else None
        self._rows, self._cols, self._flip = rows, cols, flip  # flip: rows are file columns

    def _with(self, rows, cols=None, flip=None) -> CheckpointSlice:
        cols = self._cols if cols is None else cols
        flip = self._flip if flip is None else flip
        return CheckpointSlice(self._part, self.name, self._reads, rows, cols, flip)

    @property
    def shape(self) -> torch.Size:
        tail = () if self._cols is None else (len(self._cols),)
        return torch.Size((*self._rows.shape, *tail))

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def narrow(self, dim: int, start: int, length: int) -> CheckpointSlice:
        dim = dim % self.dim()
        if dim < self._rows.dim():
            return self._with(self._rows.narrow(dim, start, length))
        return self._with(self._rows, self._cols.narrow(0, start, length))

    def t(self) -> CheckpointSlice:
        if self._cols is None or self._rows.dim() != 1:
            raise NotImplementedError("t() of a slice that is not a matrix")
        return self._with(self._cols, self._rows, not self._flip)

    def view(self, *shape) -> CheckpointSlice:
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        if self._cols is None:
            return self._with(self._rows.reshape(shape))
        if not shape or shape[-1] != len(self._cols):
            raise NotImplementedError("a view of a checkpoint slice must keep its last dimension")
        return self._with(self._rows.reshape(shape[:-1]))

    reshape = view

    def transpose(self, dim0: int, dim1: int) -> CheckpointSlice:
        dim0, dim1 = dim0 % self.dim(), dim1 % self.dim()
        if max(dim0, dim1) >= self._rows.dim():
            raise NotImplementedError("transpose of a checkpoint slice's last dimension")
        return self._with(self._rows.transpose(dim0, dim1))

    def load(self) -> torch.Tensor:
        """Read the selected part from the file: its rows, as runs of consecutive rows, and
        the span of its columns."""
        rows = self._rows.reshape(-1)
        if rows.numel() == 0 or (self._cols is not None and self._cols.numel() == 0):
            dtype = _SAFETENSORS_DTYPES.get(self._part.get_dtype(), torch.float32)
            return torch.empty(self.shape, dtype=dtype)
        wanted = torch.unique(rows)  # sorted
        breaks = (torch.nonzero(wanted[1:] - wanted[:-1] != 1).flatten() + 1).tolist()
        starts = [0, *breaks]
        runs = [(int(wanted[a]), int(wanted[b - 1]) + 1)
                for a, b in zip(starts, [*breaks, len(wanted)], strict=True)]  # fmt: skip
        if self._cols is None:
            block = torch.cat([self._part[a:b] for a, b in runs])
            read = tuple(block.shape)
        else:
            c0, c1 = int(self._cols.min()), int(self._cols.max()) + 1
            if self._flip:  # rows are the file's columns
                block = torch.cat([self._part[c0:c1, a:b] for a, b in runs], dim=1)
                read, block = tuple(block.shape), block.t()
            else:
                block = torch.cat([self._part[a:b, c0:c1] for a, b in runs])
                read = tuple(block.shape)
            block = _pick(block.t(), self._cols - c0).t()
        out = _pick(block, torch.searchsorted(wanted, rows))
        if self._reads is not None:
            self._reads.append((self.name, read))
        return out.reshape(self.shape)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _pick(block: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """block[index] along the first dimension; a view when the index is the whole block."""
    if len(index) == block.shape[0] and bool((index == torch.arange(len(index))).all()):
        return block
    return block.index_select(0, index)


def _iter_bin(path: Path, bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files from before torch 1.6's zip format cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    bar.total = (bar.total or 0) + len(state)
    bar.refresh()
    for name, tensor in state.items():
        yield name, tensor
        bar.update()


class CheckpointNames:
    """A model's map between checkpoint names and (parameter name, shard), both ways."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.renames: tuple[tuple[str, str], ...] = getattr(model, "checkpoint_renames", ())
        self.packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})

    def normalize(self, name: str) -> str:
        hook = getattr(self.model, "normalize_checkpoint_name", None)
        return hook(name) if hook else name

    def to_param(self, name: str) -> tuple[str, str | None]:
        """A (normalized) checkpoint name -> (parameter name, shard or None)."""
        for old, new in self.renames:
            name = name.replace(old, new)
        for part, (merged, shard) in self.packed.items():
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{merged}."), shard
        return name, None

    def to_checkpoint(self, param: str, shard: str | None) -> str:
        """The checkpoint name that fills (param, shard): how errors name a missing tensor."""
        name = param
        if shard is not None:
            for part, (merged, s) in self.packed.items():
                if s == shard and f".{merged}." in name:
                    name = name.replace(f".{merged}.", f".{part}.")
                    break
        for old, new in reversed(self.renames):
            name = name.replace(new, old)
        return name

    def expected(self) -> Iterator[tuple[str, str | None]]:
        """Every (parameter, shard) a checkpoint must fill; tied parameters appear once."""
        shards_of: dict[str, list[str]] = {}
        for merged, shard in self.packed.values():
            shards_of.setdefault(merged, []).append(shard)
        for name, _ in self.model.named_parameters():  # deduplicates tied parameters
            merged = next((m for m in shards_of if f".{m}." in name), None)
            if merged is None:
                yield name, None
            else:
                for shard in shards_of[merged]:
                    yield name, shard


def _convert(convert, name: str, ckpt_name: str, target: str, tensor):
    try:
        return convert(name, tensor)
    except (NotImplementedError, AttributeError):
        if not isinstance(tensor, CheckpointSlice):
            raise
        # A conversion that a lazy slice cannot compose: read this tensor whole after all.
        logger.debug("converting %s reads the whole tensor", ckpt_name)
        return _convert(convert, name, ckpt_name, target, tensor.load())
    except RuntimeError as e:  # a view or transpose that the tensor's shape refuses
        raise ValueError(
            f"tensor {ckpt_name!r} of shape {tuple(tensor.shape)} cannot be converted "
            f"for parameter {target}: {e}"
        ) from e


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into `model`, merging packed projections. Every parameter must
    be filled exactly once; a missing, repeated or mis-shaped tensor is named in the error."""
    names = CheckpointNames(model)
    params = dict(model.named_parameters())
    tied = getattr(model, "tie_word_embeddings", False)
    convert = getattr(model, "convert_checkpoint_tensor", None)
    loaded: dict[tuple[str, str | None], str] = {}
    ignored: list[str] = []
    for ckpt_name, tensor in weights:
        name = names.normalize(ckpt_name)
        target, shard = names.to_param(name)
        if "rotary_emb.inv_freq" in name or (tied and target == "lm_head.weight"):
            continue
        param = params.get(target)
        if param is None:
            ignored.append(ckpt_name)
            continue
        if (target, shard) in loaded:
            raise ValueError(
                f"checkpoint tensors {loaded[target, shard]!r} and {ckpt_name!r} both fill "
                f"parameter {target}" + (f" ({shard})" if shard else "")
            )
        if convert is not None:
            tensor = _convert(convert, name, ckpt_name, target, tensor)
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard is None:
            loader(param, tensor, ckpt_name)
        else:
            loader(param, tensor, ckpt_name, shard)
        loaded[target, shard] = ckpt_name
    missing = [names.to_checkpoint(p, s) for p, s in names.expected() if (p, s) not in loaded]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:8])}{more}")
    if ignored:
        logger.info(
            "ignored %d checkpoint tensors the model has no parameter for: %s",
            len(ignored), ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""),
        )  # fmt: skip
