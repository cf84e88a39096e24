"""The engine core (vLLM v1's seam): schedule, execute, update, on token ids.

A request comes in as a sequence of prompt token ids with its sampling parameters. Each step
schedules, runs the model once, and appends what was sampled; it returns, per request that
moved, each sequence's new token ids and logprobs and whether it ended on EOS, a stop token or
its length. Text, stop strings and the outputs callers see are the output processor's
(engine/output_processor.py); validation and tokenization the input processor's."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from pagedserve.engine.beam_search import BeamSearch, Hypothesis
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.model_loader import LoadedModel, load_model
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.outputs import EngineStats
from pagedserve.engine.parallel import TensorParallelError
from pagedserve.engine.sampler import Sample
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence, SequenceGroup

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine has stopped (shut down, or a tensor-parallel rank failed); no request can
    be served."""


@dataclass
class SequenceUpdate:
    """What one step did to one sequence of a request (`index`: its place in the request)."""

    index: int
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None  # per new token, when the request asks
    cumulative_logprob: float
    num_output_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None


@dataclass
class CoreOutput:
    """One request's news from one step. A beam search request reports only at its end, with
    its best hypotheses."""

    request_id: str
    seqs: list[SequenceUpdate] = field(default_factory=list)
    finished: bool = False
    new_prompt_logprobs: list[dict[int, float] | None] | None = None
    hypotheses: list[Hypothesis] | None = None
    first_token_time: float | None = None


class EngineCore:
    """Scheduler, KV cache manager and model runner. With tensor_parallel_size > 1 this
    process is rank 0's driver and `executor` runs the other ranks (engine/executor.py)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.executor = None
        self.dead: str | None = None
        self.closed = False
        torch.manual_seed(config.seed)
        if config.tensor_parallel_size > 1:
            from pagedserve.engine.executor import TensorParallelExecutor

            self.executor = TensorParallelExecutor(config)
            self.loaded, self.runner = self.executor.loaded, self.executor.runner
        else:
            if config.ray_address is not None:
                logger.warning("ray_address is ignored: tensor_parallel_size is 1")
            self.loaded = load_model(config)
            self.runner = ModelRunner(config, self.loaded)
        try:
            self._setup(config, self.loaded)
        except BaseException:
            self.shutdown()
            raise

    def _setup(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        blocks_per_seq = -(-self.max_model_len // config.block_size)
        if blocks_per_seq > self.runner.num_blocks:
            raise ValueError(
                f"the KV cache holds {self.runner.num_blocks * config.block_size} tokens, fewer than "
                f"one sequence of max_model_len={self.max_model_len}; lower --max-model-len or "
                f"raise {config.kv_cache_flag}"
            )
        self.kv_cache = KVCacheManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.kv_cache, config.max_num_seqs, config.batched_tokens, config.enable_chunked_prefill
        )
        self.requests: dict[str, SequenceGroup] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.runner.warmup()

    # --- life -----------------------------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        if self.dead is not None or self.closed:
            return False
        return self.executor is None or self.executor.is_healthy

    def check_health(self) -> None:
        """Raise EngineDeadError, saying why, unless the engine can serve."""
        if self.executor is not None and self.executor.failure is not None:
            self.dead = self.dead or self.executor.failure
        if self.dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead}")
        if self.closed:
            raise EngineDeadError("the engine has been shut down")

    def shutdown(self) -> None:
        self.closed = True
        if self.executor is not None:
            self.executor.shutdown()

    def _die(self, reason: str) -> EngineDeadError:
        """A rank failed mid-step: end every request, stop the ranks, report why."""
        self.dead = reason
        for request_id in list(self.requests):
            self.abort(request_id)
        self.shutdown()
        return EngineDeadError(f"the engine has stopped: {reason}")

    # --- requests -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a request, given as its first sequence (prompt, and resumed tokens if any)."""
        self.check_health()
        params = seq.params
        group = SequenceGroup([seq])
        if params.use_beam_search:
            limit = (
                self.max_model_len
                if params.max_tokens is None
                else seq.num_tokens + params.max_tokens
            )
            group.beam = BeamSearch(
                width=params.best_of, prompt_len=seq.num_tokens, max_len=min(limit, self.max_model_len),
                eos_token_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids),
                length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                logprobs=params.logprobs,
            )  # fmt: skip
        else:
            seq.fan_out = params.best_of
        self.requests[seq.request_id] = group
        self.scheduler.add(group)

    def abort(self, request_id: str) -> CoreOutput | None:
        group = self.requests.pop(request_id, None)
        if group is None:
            return None
        ending = group.unfinished
        for seq in ending:
            seq.finish("abort")
        self.scheduler.finish(group)
        return self._ended(group, ending)

    def stop(self, request_id: str, index: int, stop: str) -> None:
        """End one sequence on a stop string (the output processor finds those)."""
        group = self.requests.get(request_id)
        if group is None:
            return
        seq = group.seqs[index]
        ended = seq.is_finished  # on its length, in the step that completed the stop string
        seq.finish("stop", stop)
        if ended:
            return
        self.scheduler.free_seq(seq)
        if group.is_finished:
            self.scheduler.finish(group)
            del self.requests[request_id]

    def check_stop(self, seq: Sequence, token: int) -> None:
        """Finish `seq` if its newest token `token` ends it: EOS, a stop token, max_tokens,
        or the context. (Stop strings are found in its text, by the output processor.)"""
        params = seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop")
        elif token in params.stop_token_ids:
            seq.finish("stop", token)
        elif (
            seq.num_output_tokens >= (params.max_tokens or self.max_model_len)
            or seq.num_tokens >= self.max_model_len
        ):
            seq.finish("length")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- one step -------------------------------------------------------------------------
    def step(self) -> list[CoreOutput]:
        sched = self.scheduler.schedule()
        outputs = [self._end_out_of_memory(group) for group in sched.out_of_memory]
        if sched.is_empty:
            return outputs
        try:
            result = self.runner.execute(sched)
        except TensorParallelError as e:
            raise self._die(str(e)) from e
        moved: dict[str, CoreOutput] = {}
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.kv_cache.register_computed(seq)
            entries = result.prompt_logprobs.get(seq.seq_id)
            if entries is not None:
                out = moved.setdefault(seq.request_id, CoreOutput(seq.request_id))
                out.new_prompt_logprobs = entries
        sampled: dict[str, list[Sequence]] = {}
        for seq in sched.seqs:
            if seq.seq_id in result.samples:
                sampled.setdefault(seq.request_id, []).append(seq)
        for request_id, seqs in sampled.items():
            group = self.requests[request_id]
            if group.beam is not None:
                self._beam_step(group, result.samples)
                if not group.beam.done:
                    continue  # beam search reports only at its end
                out = moved.setdefault(request_id, CoreOutput(request_id))
            else:
                out = moved.setdefault(request_id, CoreOutput(request_id))
                for seq in seqs:
                    self._sample_step(group, seq, result.samples[seq.seq_id], out)
            out.first_token_time = group.seqs[0].first_token_time
            if group.is_finished or (group.beam is not None and group.beam.done):
                self.scheduler.finish(group)
                del self.requests[request_id]
                out.finished = True
                if group.beam is not None:
                    out.hypotheses = group.beam.best(group.params.n)
        outputs += moved.values()
        return outputs

    def _ended(self, group: SequenceGroup, seqs: list[Sequence]) -> CoreOutput:
        """The final output of a request ended from outside a step (abort, out of memory)."""
        out = CoreOutput(group.request_id, finished=True)
        out.first_token_time = group.seqs[0].first_token_time
        if group.beam is not None:
            out.hypotheses = group.beam.best(group.params.n)
            return out
        index = {id(s): i for i, s in enumerate(group.seqs)}
        out.seqs = [
            SequenceUpdate(index[id(s)], [], None, s.cumulative_logprob, s.num_output_tokens,
                           s.finish_reason, s.stop_reason)
            for s in seqs
        ]  # fmt: skip
        return out

    def _end_out_of_memory(self, group: SequenceGroup) -> CoreOutput:
        """A request whose sequences together outgrow the KV cache ends with what it has."""
        logger.warning("request %s outgrew the KV cache; ending it", group.request_id)
        ending = group.unfinished
        for seq in ending:
            seq.finish("length", "kv_cache_full")
        if group.beam is not None:  # the best live beams count as hypotheses
            group.beam.finish_live(group.seqs)
        del self.requests[group.request_id]
        return self._ended(group, ending)

    def _sample_step(
        self, group: SequenceGroup, seq: Sequence, samples: list[Sample], out: CoreOutput
    ) -> None:
        targets = [seq]
        if len(samples) > 1:  # a fresh prompt fans out: the children share its blocks
            seq.fan_out = 1
            for _ in samples[1:]:
                child = seq.fork()
                self.kv_cache.fork(seq, child)
                targets.append(child)
            group.seqs.extend(targets[1:])
        k = seq.params.logprobs
        for target, sample in zip(targets, samples, strict=True):
            self._append(target, sample)
            self.check_stop(target, sample.token)
            if target.is_finished:
                self.scheduler.free_seq(target)
            out.seqs.append(
                SequenceUpdate(
                    group.seqs.index(target), [sample.token],
                    None if k is None else [sample.logprobs_entry(k)],
                    target.cumulative_logprob, target.num_output_tokens,
                    target.finish_reason, target.stop_reason,
                )
            )  # fmt: skip

    def _beam_step(self, group: SequenceGroup, samples: dict[int, list[Sample]]) -> None:
        beam = group.beam
        beams = group.unfinished
        chosen = beam.step(beams, {b.seq_id: samples[b.seq_id][0] for b in beams})
        # Fork first (a fork copies the parent's tokens), then append the new tokens.
        used: set[int] = set()
        next_beams = []
        for cand in chosen:
            if cand.parent.seq_id in used:
                seq = cand.parent.fork()
                self.kv_cache.fork(cand.parent, seq)
            else:
                seq = cand.parent
                used.add(seq.seq_id)
            next_beams.append((seq, cand))
        beam.extend_logprobs([(seq.seq_id, cand) for seq, cand in next_beams])
        for rank, (seq, cand) in enumerate(next_beams):
            self._append(seq, cand)
            beam.scores[seq.seq_id] = beam.running_score(rank)
        for old in beams:
            if old.seq_id not in used:
                old.finish("abort")
                self.scheduler.free_seq(old)
        group.seqs = [seq for seq, _ in next_beams]
        if beam.done:
            for seq in group.seqs:
                seq.finish("stop")

    def _append(self, seq: Sequence, sample: Sample) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
            self.prompt_tokens_total += seq.num_prompt_tokens
        seq.token_ids.append(sample.token)
        seq.cumulative_logprob += sample.logprob
        self.generation_tokens_total += 1

    def stats(self) -> EngineStats:
        kv = self.kv_cache
        live = [seq for group in self.scheduler.running for seq in group.unfinished]
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks_total=kv.pool.num_blocks,
            num_blocks_used=kv.pool.num_used,
            block_size=self.config.block_size,
            tokens_in_cache=kv.tokens_held(live),
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_blocks_shared=kv.num_shared_blocks(),
            num_blocks_cached=kv.pool.num_cached,
            num_cow_copies=kv.num_cow_copies,
            prefix_cache_queried_tokens=kv.prefix_queried_tokens,
            prefix_cache_hit_tokens=kv.prefix_hit_tokens,
        )
