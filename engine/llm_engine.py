"""The synchronous engine: requests in, one scheduled step at a time, outputs out.

It joins vLLM v1's three parts: the input processor (validation, tokenization), the engine
core (schedule, execute, update on token ids: engine/engine_core.py) and the output processor
(text, stop strings, logprobs, delta outputs: engine/output_processor.py). The input
processor (engine/input_processor.py) validates and tokenizes in the caller's thread; what needs
engine state (a request id in use, a seeded generator, replaying a resumed answer) is here."""

from __future__ import annotations

import torch

from pagedserve.engine.chat_templates import resolve_chat_template
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.engine_core import EngineCore, EngineDeadError
from pagedserve.engine.input_processor import (
    EngineRequest,
    InputProcessor,
    InvalidRequestError,
    PromptType,
)
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.outputs import EngineStats, RequestOutput
from pagedserve.engine.resume import Resume, replay
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.sequence import Sequence

__all__ = ["EngineDeadError", "EngineRequest", "InvalidRequestError", "LLMEngine", "PromptType"]


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
        self.input_processor = InputProcessor(
            self.tokenizer,
            resolve_chat_template(self.tokenizer, config.model),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.batched_tokens,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )
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
        self.add(self.input_processor.process(request_id, prompt, params, resume))

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
