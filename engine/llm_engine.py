"""The synchronous engine: requests in, one scheduled step at a time, outputs out.

It joins vLLM v1's three parts: the input processor (validation, tokenization), the engine
core (schedule, execute, update on token ids: engine/engine_core.py) and the output processor
(text, stop strings, logprobs, delta outputs: engine/output_processor.py)."""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.engine_core import EngineCore, EngineDeadError
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.outputs import EngineStats, RequestOutput
from pagedserve.engine.resume import Resume, replay
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

__all__ = ["EngineDeadError", "EngineRequest", "InvalidRequestError", "LLMEngine", "PromptType"]

PromptType = str | Seq[int] | dict


class InvalidRequestError(ValueError):
    """A request the engine refuses as given; nothing in the engine changed. `param` names
    the part of the request at fault when it is not the prompt."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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


@dataclass
class EngineRequest:
    """A request that passed validation: what the core and the output processor take."""

    request_id: str
    prompt: str | None  # the prompt's text, when it came as text
    prompt_token_ids: list[int]
    params: SamplingParams
    resume: Resume | None = None
    arrival_time: float = field(default_factory=time.monotonic)


class LLMEngine:
    """Input processor, engine core and output processor. With tensor_parallel_size > 1 the
    core drives the other ranks; call `shutdown()` (or use the engine as a context manager) to
    stop them."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.core = EngineCore(config)
        loaded = self.core.loaded
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.hf_config.vocab_size
        self.output_processor = OutputProcessor(self.tokenizer)

    # --- life -----------------------------------------------------------------------------
    @property
    def is_healthy(self) -> bool:
        """False once shut down or once a tensor-parallel rank has failed (noticed at the
        next step, or by the executor's watcher while idle)."""
        return self.core.is_healthy

    def check_health(self) -> None:
        """Raise EngineDeadError, saying why, unless the engine can serve."""
        self.core.check_health()

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (and the local Ray they ran on); nothing to do for
        one rank beyond refusing further requests. Safe to call more than once."""
        self.core.shutdown()

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- requests -------------------------------------------------------------------------
    def make_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> EngineRequest:
        """Validate and tokenize a request without touching engine state."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling params must be a SamplingParams")
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
        width = params.best_of
        if width > self.config.max_num_seqs or width > self.config.batched_tokens:
            raise InvalidRequestError(
                f"best_of/beam width {width} exceeds what one step can run (max_num_seqs="
                f"{self.config.max_num_seqs}, max_num_batched_tokens={self.config.batched_tokens})"
            )
        return EngineRequest(request_id, text, token_ids, params, resume)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
            return self._tokenize(prompt.get("prompt", ""))
        return None, _token_ids(prompt)

    def add(self, request: EngineRequest) -> None:
        """Queue a validated request with the core and the output processor. A resumed answer
        (engine/resume.py) is replayed first; if it cannot be resumed, nothing is queued."""
        self.check_health()
        request_id, params = request.request_id, request.params
        if request_id in self.core.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.core.runner.device).manual_seed(params.seed)
        seq = Sequence(
            request_id, list(request.prompt_token_ids), params,
            arrival_time=request.arrival_time, generator=generator,
        )  # fmt: skip
        out = self.output_processor
        out.add(request_id, request.prompt, request.prompt_token_ids, params, request.arrival_time)
        try:
            if request.resume is not None:
                self._replay(seq, request.resume)
            self.core.add(seq)
        except BaseException:
            out.drop(request_id)
            raise

    def _replay(self, seq: Sequence, resume: Resume) -> None:
        def take_text(token: int, ended: bool) -> str | None:
            return self.output_processor.append_token(seq.request_id, 0, token, ended)

        try:
            replay(
                seq, resume, self.core.check_stop, take_text, self.vocab_size, self.max_model_len
            )
            self.output_processor.resumed(seq.request_id, resume.sent_chars)
        except ValueError as e:
            raise InvalidRequestError(str(e), param="resume") from e

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        resume: Resume | None = None,
    ) -> None:
        self.add(self.make_request(request_id, prompt, params, resume))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        core_out = self.core.abort(request_id)
        if core_out is None:
            return None
        outputs, _ = self.output_processor.process([core_out])
        return outputs[0] if outputs else None

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    @property
    def requests(self):
        """The requests in flight, by id (the core's)."""
        return self.core.requests

    # --- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, stops = self.output_processor.process(self.core.step())
        for request_id, index, stop in stops:
            self.core.stop(request_id, index, stop)
        return outputs

    def stats(self) -> EngineStats:
        return self.core.stats()
