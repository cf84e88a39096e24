"""The synchronous engine: requests in, one scheduled step at a time, outputs out."""

from __future__ import annotations

import logging
import time

import torch

from pagedserve.engine.beam_search import BeamSearch
from pagedserve.engine.chat_templates import resolve_chat_template
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.input_processor import (
    EngineRequest,
    InputProcessor,
    InvalidRequestError,
    PromptType,
)
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.model_loader import load_model
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.outputs import EngineStats, RequestOutput
from pagedserve.engine.parallel import TensorParallelError
from pagedserve.engine.resume import Resume, replay
from pagedserve.engine.sampler import Sample
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence, SequenceGroup

logger = logging.getLogger(__name__)

__all__ = ["EngineDeadError", "InvalidRequestError", "LLMEngine", "PromptType"]


class EngineDeadError(RuntimeError):
    """The engine has stopped (shut down, or a tensor-parallel rank failed); no request can
    be served."""


class LLMEngine:
    """Scheduler and model runner. With tensor_parallel_size > 1 this process is rank 0's
    driver and `executor` runs the other ranks (engine/executor.py); call `shutdown()` (or
    use the engine as a context manager) to stop them."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.executor = None
        self._dead: str | None = None
        self._closed = False
        torch.manual_seed(config.seed)
        if config.tensor_parallel_size > 1:
            from pagedserve.engine.executor import TensorParallelExecutor

            self.executor = TensorParallelExecutor(config)
            loaded, self.runner = self.executor.loaded, self.executor.runner
        else:
            if config.ray_address is not None:
                logger.warning("ray_address is ignored: tensor_parallel_size is 1")
            loaded = load_model(config)
            self.runner = ModelRunner(config, loaded)
        try:
            self._setup(config, loaded)
        except BaseException:
            self.shutdown()
            raise

    def _setup(self, config: EngineConfig, loaded) -> None:
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.vocab_size = loaded.hf_config.vocab_size
        self.input_processor = InputProcessor(
            self.tokenizer,
            resolve_chat_template(self.tokenizer, config.model),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
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
        self.output_processor = OutputProcessor(
            self.tokenizer, self.eos_token_ids, self.max_model_len
        )
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.runner.warmup()

    # --- life -----------------------------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        """False once shut down or once a tensor-parallel rank has failed (noticed at the
        next step, or by the executor's watcher while idle)."""
        if self._dead is not None or self._closed:
            return False
        return self.executor is None or self.executor.is_healthy

    def check_health(self) -> None:
        """Raise EngineDeadError, saying why, unless the engine can serve."""
        if self.executor is not None and self.executor.failure is not None:
            self._dead = self._dead or self.executor.failure
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        if self._closed:
            raise EngineDeadError("the engine has been shut down")

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (and the local Ray they ran on); nothing to do for
        one rank beyond refusing further requests. Safe to call more than once."""
        self._closed = True
        if self.executor is not None:
            self.executor.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _die(self, reason: str) -> EngineDeadError:
        """A rank failed mid-step: end every request, stop the ranks, report why."""
        self._dead = reason
        for request_id in list(self.requests):
            self.abort_request(request_id)
        self.shutdown()
        return EngineDeadError(f"the engine has stopped: {reason}")

    # --- requests -------------------------------------------------------------------------
    def make_sequence(self, request: EngineRequest) -> Sequence:
        """The sequence of a request the input processor accepted, without touching engine
        state: its seeded generator and, with `request.resume`, the answer another engine
        began replayed into it (engine/resume.py)."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        seq = Sequence(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            params,
            arrival_time=request.arrival_time,
            generator=generator,
        )
        if request.resume is not None:
            try:
                replay(
                    seq,
                    request.resume,
                    self.output_processor.check_stop,
                    self.vocab_size,
                    self.max_model_len,
                )
            except ValueError as e:
                raise InvalidRequestError(str(e), param="resume") from e
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        self.check_health()
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
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
                eos_token_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_token_ids)),
                length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                logprobs=params.logprobs,
            )  # fmt: skip
        else:
            seq.fan_out = params.best_of
        self.requests[seq.request_id] = group
        self.output_processor.add(seq)
        self.scheduler.add(group)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> None:
        request = self.input_processor.process(request_id, prompt, params, resume)
        self.add_sequence(self.make_sequence(request))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.requests.pop(request_id, None)
        if group is None:
            return None
        for seq in group.unfinished:
            seq.finish("abort")
        self.scheduler.finish(group)
        return self.output_processor.output(group, force=True)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        outputs = [self._end_out_of_memory(group) for group in sched.out_of_memory]
        if sched.is_empty:
            return outputs
        try:
            samples = self.runner.execute(sched)
        except TensorParallelError as e:
            raise self._die(str(e)) from e
        sampled: dict[str, list[Sequence]] = {}
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.kv_cache.register_computed(seq)
            if seq.seq_id in samples:
                sampled.setdefault(seq.request_id, []).append(seq)
        for request_id, seqs in sampled.items():
            group = self.requests[request_id]
            if group.beam is not None:
                self._beam_step(group, samples)
            else:
                for seq in seqs:
                    self._sample_step(group, seq, samples[seq.seq_id])
            if group.is_finished or (group.beam is not None and group.beam.done):
                self.scheduler.finish(group)
                del self.requests[request_id]
            out = self.output_processor.output(group)
            if out is not None:
                outputs.append(out)
        return outputs

    def _end_out_of_memory(self, group: SequenceGroup) -> RequestOutput:
        """A request whose sequences together outgrow the KV cache ends with what it has."""
        logger.warning("request %s outgrew the KV cache; ending it", group.request_id)
        for seq in group.unfinished:
            seq.finish("length", "kv_cache_full")
        if group.beam is not None:  # the best live beams count as hypotheses
            group.beam.finish_live(group.seqs)
        del self.requests[group.request_id]
        return self.output_processor.output(group, force=True)

    def _sample_step(self, group: SequenceGroup, seq: Sequence, samples: list[Sample]) -> None:
        targets = [seq]
        if len(samples) > 1:  # a fresh prompt fans out: the children share its blocks
            seq.fan_out = 1
            for _ in samples[1:]:
                child = seq.fork()
                self.kv_cache.fork(seq, child)
                targets.append(child)
            group.seqs.extend(targets[1:])
        for target, sample in zip(targets, samples, strict=True):
            self._append(target, sample)
            self.output_processor.check_stop(target, sample.token)
            if target.is_finished:
                self.scheduler.free_seq(target)

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
        if seq.params.logprobs is not None:
            seq.logprobs.append(sample.logprobs_entry(seq.params.logprobs))
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
