"""Tensor-parallel state of one rank, the collectives its layers run, and the wire format of
one engine step (rank 0's driver broadcasts it; the other ranks loop on receiving it).

A process holds at most one rank. Its model is built for a `ParallelContext` that the model
class is handed and passes down to every layer that shards or communicates, which keeps it: a
model built without one is the single rank of TP=1 and runs no collective at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedserve.engine.batch import Batch


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    size: int = 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def shard(self, units: int, what: str, replicate: bool = False) -> tuple[int, int]:
        """This rank's (first unit, number of units) of `units` split evenly across the ranks
        (heads, rows of an MLP). With `replicate`, fewer units than ranks is allowed: each
        unit is then held by size // units consecutive ranks (KV heads under GQA)."""
        if units % self.size == 0:
            per = units // self.size
            return self.rank * per, per
        if replicate and units < self.size and self.size % units == 0:
            return self.rank * units // self.size, 1
        need = f"divide {what} ({units})" + (
            " or be a multiple of it" if replicate and units < self.size else ""
        )
        raise ValueError(f"tensor_parallel_size {self.size} must {need}")

    # --- collectives (no-ops at size 1) ---------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x)
        return x

    def gather_to_driver(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Every rank's `x` concatenated along `dim` on rank 0; None on the other ranks."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_driver else None
        torch.distributed.gather(x, parts, dst=0)
        return torch.cat(parts, dim=dim) if self.is_driver else None

    def min_over_ranks(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())


def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


# --- one step on the wire -----------------------------------------------------------------
# A step travels as two int64 broadcasts: a fixed header, then one flat payload.
STEP, NOOP, STOP = 1, 2, 3
_HEADER = 8  # kind, tokens, seqs, table width, sampled rows, block copies, logit groups, payload


@dataclass
class StepInput:
    """What every rank needs to run one forward pass: the flat batch, the blocks to copy
    first, and which rows of the hidden states to turn into logits (one `compute_logits` call
    per group, in order: prompt-logprob spans, then the sampled rows)."""

    batch: Batch
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    logit_groups: list[tuple[int, int] | None] = field(default_factory=list)  # None: sampled rows


def pack_step(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    b = step.batch
    tables = b.block_tables
    spans = [x for g in step.logit_groups for x in (g if g is not None else (-1, -1))]
    parts = [
        b.input_ids, b.positions, b.slot_mapping, tables.reshape(-1), b.context_lens,
        b.query_start_loc, b.logits_indices,
        torch.tensor([x for pair in step.block_copies for x in pair] + spans, dtype=torch.long),
    ]  # fmt: skip
    payload = torch.cat([p.to("cpu", torch.long) for p in parts])
    header = torch.tensor(
        [STEP, len(b.input_ids), tables.shape[0], tables.shape[1], len(b.logits_indices),
         len(step.block_copies), len(step.logit_groups), len(payload)],
        dtype=torch.long,
    )  # fmt: skip
    return header, payload


def control_header(kind: int) -> torch.Tensor:
    return torch.tensor([kind] + [0] * (_HEADER - 1), dtype=torch.long)


def empty_header() -> torch.Tensor:
    return torch.zeros(_HEADER, dtype=torch.long)


def unpack_step(header: torch.Tensor, payload: torch.Tensor, device: torch.device) -> StepInput:
    _, t, b, w, s, c, g, _ = header.tolist()
    sizes = [t, t, t, b * w, b, b + 1, s, 2 * c + 2 * g]
    ids, pos, slots, tables, ctx, qsl, idx, rest = payload.split(sizes)
    ints = dict(dtype=torch.int32, device=device)
    batch = Batch(
        input_ids=ids.to(device),
        positions=pos.to(device),
        slot_mapping=slots.to(device),
        block_tables=tables.view(b, w).to(**ints),
        context_lens=ctx.to(**ints),
        query_start_loc=qsl.to(**ints),
        logits_indices=idx.to(device),
    )
    rest = rest.tolist()
    copies = [(rest[2 * i], rest[2 * i + 1]) for i in range(c)]
    spans = rest[2 * c :]
    groups = [None if spans[2 * i] < 0 else (spans[2 * i], spans[2 * i + 1]) for i in range(g)]
    return StepInput(batch, copies, groups)


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung past the timeout or fell out of step; the ranks have
    been stopped and the engine cannot serve any more."""
