"""The synchronous engine: requests in, one scheduled step at a time, outputs out."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

import torch

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.detokenizer import find_stop_string, update_text, visible_text
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.model_loader import load_model
from pagedserve.engine.model_runner import ModelRunner
from pagedserve.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence

logger = logging.getLogger(__name__)

PromptType = str | Seq[int] | dict


class InvalidRequestError(ValueError):
    """A request the engine refuses as given; nothing in the engine changed."""


def _token_ids(ids) -> list[int]:
    if (
        isinstance(ids, (str, bytes))
        or not isinstance(ids, Seq)
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise InvalidRequestError(
            "a prompt is a string, a list of integer token ids, or a dict holding one"
        )
    return list(ids)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        torch.manual_seed(config.seed)
        loaded = load_model(config)
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.vocab_size = loaded.hf_config.vocab_size
        self.runner = ModelRunner(config, loaded)
        blocks_per_seq = -(-self.max_model_len // config.block_size)
        if blocks_per_seq > self.runner.num_blocks:
            raise ValueError(
                f"the KV cache holds {self.runner.num_blocks * config.block_size} tokens, fewer than "
                f"one sequence of max_model_len={self.max_model_len}; lower --max-model-len or "
                "raise --kv-cache-memory / --gpu-memory-utilization"
            )
        self.kv_cache = KVCacheManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.kv_cache, config.max_num_seqs, config.batched_tokens, config.enable_chunked_prefill
        )
        self.requests: dict[str, list[Sequence]] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.runner.warmup()

    # --- requests -------------------------------------------------------------------------
    def make_sequence(
        self, request_id: str, prompt: PromptType, params: SamplingParams
    ) -> Sequence:
        """Validate and tokenize a request without touching engine state."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token")
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model takes at most "
                f"{self.max_model_len - 1} so that one token can be generated "
                f"(max_model_len={self.max_model_len})"
            )
        if not self.config.enable_chunked_prefill and len(token_ids) > self.config.batched_tokens:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens, more than max_num_batched_tokens="
                f"{self.config.batched_tokens} without chunked prefill"
            )
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.runner.device).manual_seed(params.seed)
        return Sequence(request_id, text, token_ids, params, generator=generator)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            return self._tokenize(prompt.get("prompt", ""))
        return None, _token_ids(prompt)

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = [seq]
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        for seq in seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        return self._output(seqs)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        sampled = self.runner.execute(sched)
        updated: dict[str, None] = {}
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            token = sampled.get(seq.seq_id)
            if token is None:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = time.monotonic()
                self.prompt_tokens_total += seq.num_prompt_tokens
            seq.token_ids.append(token)
            self.generation_tokens_total += 1
            self._check_stop(seq, token)
            if seq.is_finished:
                self.scheduler.finish(seq)
            updated[seq.request_id] = None
        outputs = []
        for request_id in updated:
            seqs = self.requests[request_id]
            out = self._output(seqs)
            if out.finished:
                del self.requests[request_id]
            outputs.append(out)
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> None:
        new_chars = len(update_text(self.tokenizer, seq))
        params = seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish("stop")
        elif token in params.stop_token_ids:
            seq.finish("stop", token)
        elif seq.num_output_tokens >= params.min_tokens and (
            stop := find_stop_string(seq, new_chars)
        ):
            seq.finish("stop", stop)
        elif (
            seq.num_output_tokens >= (params.max_tokens or self.max_model_len)
            or seq.num_tokens >= self.max_model_len
        ):
            seq.finish("length")

    def _output(self, seqs: list[Sequence]) -> RequestOutput:
        first = seqs[0]
        completions = [
            CompletionOutput(
                index=i,
                text=visible_text(seq),
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for i, seq in enumerate(seqs)
        ]
        metrics = {"arrival_time": first.arrival_time}
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        return RequestOutput(
            request_id=first.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.token_ids[: first.num_prompt_tokens],
            outputs=completions,
            finished=all(s.is_finished for s in seqs),
            metrics=metrics,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks_total=self.kv_cache.pool.num_blocks,
            num_blocks_used=self.kv_cache.pool.num_used,
            block_size=self.config.block_size,
            tokens_in_cache=sum(s.num_computed_tokens for s in self.scheduler.running),
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )
