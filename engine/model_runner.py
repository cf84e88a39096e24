"""Runs the model: owns the weights and the KV cache, turns a SchedulerOutput into one flat
batch, runs the forward pass and samples. It never decides who runs.

Under tensor parallelism every rank has a runner over its shard. Rank 0's `execute` builds the
step (`StepInput`) and hands it to its `channel`, which broadcasts it; the other ranks get it
there and call `run_step` only, so every rank runs the same collectives in the same order."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from pagedserve.engine.batch import Batch
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.cpu_memory import (
    keep_freed_memory_in_heap,
    on_huge_pages,
    zeros_on_huge_pages,
)
from pagedserve.engine.layers import PagedAttention, bind_kernels, pack_linear_weights
from pagedserve.engine.model_loader import LoadedModel
from pagedserve.engine.parallel import ParallelContext, StepInput
from pagedserve.engine.sampler import Sample, SamplingTensors, sample
from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.engine.sequence import Sequence
from pagedserve.kernels import ops

logger = logging.getLogger(__name__)


class StepChannel(Protocol):
    """How rank 0 sends each step to the other ranks (engine/executor.py implements it)."""

    def step(self, step: StepInput) -> contextlib.AbstractContextManager[None]:
        """Send `step`; the block runs rank 0's part of it while the others run theirs."""
        ...


@dataclass
class RunnerOutput:
    """One step's results, keyed by sequence id: what was sampled, and prompt logprobs."""

    samples: dict[int, list[Sample]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[dict[int, float] | None]] = field(default_factory=dict)


class ModelRunner:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel, ctx: ParallelContext | None = None
    ):
        self.config = config
        self.ctx = ctx or ParallelContext()
        self.channel: StepChannel | None = None  # rank 0's, under tensor parallelism
        self.device = config.torch_device
        if self.device.type == "cpu":
            keep_freed_memory_in_heap()
            if config.cpu_threads is not None:
                torch.set_num_threads(config.cpu_threads)
        # Chosen (and on a CPU, built or loaded) once, now rather than inside the first request.
        self.attention_backend = ops.resolve_backend(config.attention_backend, self.device)
        self.kernels = ops.backend_module(self.attention_backend)
        self.greedy_sample = getattr(self.kernels, "greedy_sample", None)
        logger.info("attention backend: %s", self.attention_backend)
        self.model: nn.Module = loaded.model
        bind_kernels(self.model, self.kernels)
        if self.device.type == "cpu":
            pack_linear_weights(
                self.model, getattr(self.kernels, "pack_linear", None), on_huge_pages
            )
        self.dtype = loaded.dtype
        self.block_size = config.block_size
        self.eos_token_ids = loaded.eos_token_ids
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.num_blocks = self._num_blocks()
        self._allocate_kv_cache()

    # --- KV cache -------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_token * self.block_size * len(self.attention_layers)

    def _num_blocks(self) -> int:
        """Blocks that this rank's budget holds; under tensor parallelism every rank computes
        its own and all take the smallest, so their caches have the same blocks."""
        if self.device.type == "cuda":
            budget = self._profile_cuda_budget()
        else:
            budget = self.config.kv_cache_bytes
        num_blocks = self.ctx.min_over_ranks(max(0, budget // self.block_bytes))
        if num_blocks < 1:
            raise ValueError(
                f"the KV-cache budget ({budget} bytes"
                + (" on some rank" if self.ctx.size > 1 else "")
                + f") holds no block of {self.block_bytes} bytes; raise {self.config.kv_cache_flag}"
            )
        return int(num_blocks)

    def _profile_cuda_budget(self) -> int:
        """Free memory after a forward pass at the largest batch, times the utilization."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        n = min(self.config.batched_tokens, self.config.max_model_len or self.config.batched_tokens)
        dummy = self._dummy_batch(n)
        with torch.inference_mode():
            for layer in self.attention_layers:  # a one-block cache just for the profile
                shape = (
                    -(-n // self.block_size),
                    self.block_size,
                    layer.num_kv_heads,
                    layer.head_dim,
                )
                layer.k_cache = layer.v_cache = torch.zeros(
                    shape, dtype=self.dtype, device=self.device
                )
            self.model.compute_logits(self.model(dummy.input_ids, dummy.positions, dummy))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        total = torch.cuda.get_device_properties(self.device).total_memory
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        torch.cuda.empty_cache()
        return int(total * self.config.gpu_memory_utilization - peak)

    def _dummy_batch(self, n: int) -> Batch:
        blocks = -(-n // self.block_size)
        ints = dict(dtype=torch.int32, device=self.device)
        return Batch(
            input_ids=torch.zeros(n, dtype=torch.long, device=self.device),
            positions=torch.arange(n, device=self.device),
            slot_mapping=torch.arange(n, device=self.device),
            block_tables=torch.arange(blocks, **ints)[None],
            context_lens=torch.tensor([n], **ints),
            query_start_loc=torch.tensor([0, n], **ints),
            logits_indices=torch.tensor([n - 1], device=self.device),
        )

    def _allocate_kv_cache(self) -> None:
        layer = self.attention_layers[0]
        shape = (self.num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)

        # Zeros, not empty: masked slots are still multiplied by 0, and 0 * NaN would be NaN.
        def zeros() -> torch.Tensor:
            if self.device.type == "cpu":  # decode reads scattered blocks: spare the TLB
                return zeros_on_huge_pages(shape, self.dtype)
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

        self.k_caches = [zeros() for _ in self.attention_layers]
        self.v_caches = [zeros() for _ in self.attention_layers]
        for layer, k, v in zip(self.attention_layers, self.k_caches, self.v_caches, strict=True):
            layer.k_cache, layer.v_cache = k, v
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            self.num_blocks, self.block_size, self.num_blocks * self.block_bytes / 2**20,
        )  # fmt: skip

    # --- one step -------------------------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> tuple[Batch, list[Sequence]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_start_loc = [0]
        logits_indices: list[int] = []
        sampled: list[Sequence] = []
        for seq, n, table in zip(sched.seqs, sched.num_new_tokens, sched.block_tables, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            context_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + n)
            if end == seq.num_tokens:  # the prompt (or recomputation) is complete: sample
                logits_indices.append(query_start_loc[-1] - 1)
                sampled.append(seq)
        width = max(len(t) for t in sched.block_tables)
        tables = [t + [-1] * (width - len(t)) for t in sched.block_tables]

        def tensor(values, dtype=torch.int32):
            return torch.tensor(values, dtype=dtype, device=self.device)

        batch = Batch(
            input_ids=tensor(input_ids, torch.long),
            positions=tensor(positions, torch.long),
            slot_mapping=tensor(slots, torch.long),
            block_tables=tensor(tables),
            context_lens=tensor(context_lens),
            query_start_loc=tensor(query_start_loc),
            logits_indices=tensor(logits_indices, torch.long),
        )
        return batch, sampled

    def prepare_step(
        self, sched: SchedulerOutput
    ) -> tuple[StepInput, list[Sequence], list[tuple[Sequence, int, int]]]:
        """The step every rank runs, the sequences sampled from, and the prompt-logprob plans
        (sequence, first and end prompt position) in the order of their logit groups."""
        batch, sampled = self.prepare(sched)
        groups: list[tuple[int, int] | None] = []
        plans = []
        row = 0
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            k, start = seq.params.prompt_logprobs, seq.num_computed_tokens
            end = min(start + n, seq.num_prompt_tokens - 1)  # the last prompt token predicts output
            if k is not None and start < seq.num_prompt_tokens:
                plans.append((seq, start, end))
                if end > start:
                    groups.append((row, row + end - start))
            row += n
        if sampled:
            groups.append(None)
        return StepInput(batch, list(sched.block_copies), groups), sampled, plans

    def run_step(self, step: StepInput) -> list[torch.Tensor | None]:
        """Copy blocks, run the forward pass, and compute the logits of each group of rows
        (None on ranks other than 0). Every rank runs this for every step."""
        if step.block_copies:
            src, dst = zip(*step.block_copies, strict=True)
            self.kernels.copy_blocks(
                self.k_caches, self.v_caches,
                torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device),
            )  # fmt: skip
        batch = step.batch
        hidden = self.model(batch.input_ids, batch.positions, batch)
        return [
            self.model.compute_logits(
                hidden[batch.logits_indices] if group is None else hidden[group[0] : group[1]]
            )
            for group in step.logit_groups
        ]

    def _run(self, step: StepInput) -> list[torch.Tensor | None]:
        if self.channel is None:
            return self.run_step(step)
        with self.channel.step(step):
            return self.run_step(step)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step: samples for the sequences that finished their input (`seq.fan_out`
        each: several when a prompt fans out into best_of), and the prompt logprobs asked for."""
        step, sampled, plans = self.prepare_step(sched)
        logits = iter(self._run(step))
        out = RunnerOutput(prompt_logprobs=self._prompt_logprobs(plans, logits))
        if sampled:
            fan_out = [seq.fan_out for seq in sampled]
            tensors = SamplingTensors.from_seqs(sampled, self.eos_token_ids, self.device, fan_out)
            samples = iter(sample(next(logits), tensors, self.greedy_sample))
            out.samples = {
                seq.seq_id: [next(samples) for _ in range(k)]
                for seq, k in zip(sampled, fan_out, strict=True)
            }
        return out

    def _prompt_logprobs(self, plans, logits) -> dict[int, list[dict[int, float] | None]]:
        """Logprobs of each prompt token given the ones before it, for requests that ask: the
        entries this step computed, per sequence (None for the first prompt token)."""
        entries: dict[int, list[dict[int, float] | None]] = {}
        for seq, start, end in plans:
            k = seq.params.prompt_logprobs
            new = entries.setdefault(seq.seq_id, [None] if start == 0 else [])
            if end <= start:
                continue
            logprobs = next(logits).float().log_softmax(-1)
            targets = torch.tensor(seq.token_ids[start + 1 : end + 1], device=self.device)
            chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
            top = logprobs.topk(k, dim=-1) if k else None
            for i, (token, lp) in enumerate(zip(targets.tolist(), chosen, strict=True)):
                entry = {token: lp}
                if top is not None:
                    entry.update(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
                new.append(entry)
        return entries

    def warmup(self) -> float:
        """One forward pass so the first request does not pay for lazy initialisation."""
        start = time.perf_counter()
        dummy = self._dummy_batch(min(16, self.num_blocks * self.block_size))
        with torch.inference_mode():
            self._run(StepInput(dummy))
        return time.perf_counter() - start
