"""The output processor (vLLM v1's seam): turns the engine core's token ids into what callers
get: text (incremental detokenization), stop strings, logprobs, and RequestOutputs.

Per request it keeps each sequence's text and what its outputs have carried (characters,
tokens and logprobs entries), so a request with `output_kind=DELTA` gets only what is new:
O(new) per step, never a copy of the prompt or of the answer so far. CUMULATIVE outputs hold
the whole answer so far; FINAL_ONLY ones come once, at the end. Beam search and best_of > n
choose their answers only when they finish, so they give one whole output then, whatever the
kind (a delta from nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.engine.detokenizer import IncrementalText, fast_decoder
from pagedserve.engine.engine_core import CoreOutput, SequenceUpdate
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _SeqState:
    """One sequence's answer as the caller sees it, and how much of it has been sent."""

    text: IncrementalText
    token_ids: list[int] = field(default_factory=list)  # the answer's tokens
    logprobs: list[dict[int, float]] = field(default_factory=list)  # per token, when asked
    cumulative_logprob: float = 0.0
    num_output_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_chars: int = 0
    sent_tokens: int = 0
    sent_logprobs: int = 0
    sent_finished: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _RequestState:
    prompt: str | None
    prompt_token_ids: list[int]  # taken once; every output refers to this list
    params: SamplingParams
    arrival_time: float
    seqs: list[_SeqState] = field(default_factory=list)  # by the sequence's index
    prompt_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    first_token_time: float | None = None


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = fast_decoder(tokenizer)  # for the text grown a token at a time
        self._states: dict[str, _RequestState] = {}

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> None:
        self._states[request_id] = _RequestState(prompt, prompt_token_ids, params, arrival_time)

    def drop(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def _seq(self, state: _RequestState, index: int) -> _SeqState:
        while len(state.seqs) <= index:  # a fresh prompt forks into best_of sequences
            text = IncrementalText(state.prompt_token_ids, state.params.skip_special_tokens)
            state.seqs.append(_SeqState(text))
        return state.seqs[index]

    def append_token(
        self, request_id: str, index: int, token: int, core_finished: bool
    ) -> str | None:
        """Take a sequence's next token into its text; returns the stop string it completes,
        if any, unless the core already ended the sequence on EOS or a stop token."""
        state = self._states[request_id]
        return self._take(state, self._seq(state, index), token, core_finished)

    def _take(
        self, state: _RequestState, seq: _SeqState, token: int, core_finished: bool
    ) -> str | None:
        new_chars = len(seq.text.append(self.decoder, token))
        seq.token_ids.append(token)
        params = state.params
        if core_finished or len(seq.token_ids) < params.min_tokens or not params.stop_strings:
            return None
        return seq.text.cut_at_stop(params.stop_strings, new_chars)

    def resumed(self, request_id: str, sent_chars: int) -> None:
        """A resumed answer's client already holds its tokens and `sent_chars` characters of
        their text: its first output starts there."""
        seq = self._seq(self._states[request_id], 0)
        if not 0 <= sent_chars <= len(seq.text.text):
            raise ValueError(
                f"resume.sent_chars must be in [0, {len(seq.text.text)}], the length of the "
                f"resumed tokens' text; got {sent_chars}"
            )
        seq.sent_chars, seq.sent_tokens = sent_chars, len(seq.token_ids)
        seq.num_output_tokens = len(seq.token_ids)

    def process(
        self, core_outputs: list[CoreOutput]
    ) -> tuple[list[RequestOutput], list[tuple[str, int, str]]]:
        """The callers' outputs after a step, and the sequences that hit a stop string
        (request id, sequence index, stop string), for the core to end."""
        outputs, stops = [], []
        for core in core_outputs:
            state = self._states.get(core.request_id)
            if state is None:
                continue
            if core.new_prompt_logprobs is not None:
                state.prompt_logprobs += core.new_prompt_logprobs
            if core.first_token_time is not None:
                state.first_token_time = core.first_token_time
            for update in core.seqs:
                stop = self._update(state, update)
                if stop is not None:
                    stops.append((core.request_id, update.index, stop))
            finished = core.finished or (
                core.hypotheses is None and bool(state.seqs) and all(s.finished for s in state.seqs)
            )
            out = self._output(core, state, finished)
            if out is not None:
                outputs.append(out)
        return outputs, stops

    def _update(self, state: _RequestState, update: SequenceUpdate) -> str | None:
        seq = self._seq(state, update.index)
        core_ended = update.finish_reason == "stop"  # on EOS or a stop token
        stop = None
        for token in update.new_token_ids:
            stop = self._take(state, seq, token, core_ended)
        if update.new_logprobs is not None:
            seq.logprobs += update.new_logprobs
        seq.cumulative_logprob = update.cumulative_logprob
        seq.num_output_tokens = update.num_output_tokens
        if stop is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop
        elif update.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = update.finish_reason, update.stop_reason
        return stop

    def _output(
        self, core: CoreOutput, state: _RequestState, finished: bool
    ) -> RequestOutput | None:
        """The request's output after a step, None when it owes nothing yet. A finished
        request's state goes."""
        params = state.params
        if finished:
            del self._states[core.request_id]
        whole_at_end = (
            core.hypotheses is not None
            or params.use_beam_search
            or params.best_of > params.n
            or params.output_kind is RequestOutputKind.FINAL_ONLY
        )
        if whole_at_end and not finished:
            return None
        if core.hypotheses is not None or params.use_beam_search:
            completions = self._hypotheses(core, state)
        elif whole_at_end or params.output_kind is RequestOutputKind.CUMULATIVE:
            completions = self._whole(state)
        else:
            completions = [
                c for i, seq in enumerate(state.seqs) if (c := self._delta(i, seq, params))
            ]
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(
            request_id=core.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=metrics,
            prompt_logprobs=state.prompt_logprobs if params.prompt_logprobs is not None else None,
        )

    @staticmethod
    def _delta(index: int, seq: _SeqState, params: SamplingParams) -> CompletionOutput | None:
        """What is new in a sequence since its last output; None when nothing is."""
        if seq.sent_finished:
            return None
        end = seq.text.visible_len(params.stop_strings, seq.finished)
        text = seq.text.text[seq.sent_chars : end] if end > seq.sent_chars else ""
        token_ids = seq.token_ids[seq.sent_tokens :]
        if not (text or token_ids or seq.finished):
            return None
        logprobs = None
        if params.logprobs is not None:
            logprobs = seq.logprobs[seq.sent_logprobs :]
            seq.sent_logprobs += len(logprobs)
        seq.sent_chars = max(seq.sent_chars, end)
        seq.sent_tokens += len(token_ids)
        seq.sent_finished = seq.finished
        return CompletionOutput(
            index=index,
            text=text,
            token_ids=token_ids,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=logprobs,
            num_output_tokens=seq.num_output_tokens,
        )

    @staticmethod
    def _whole(state: _RequestState) -> list[CompletionOutput]:
        seqs, params = state.seqs, state.params
        if params.best_of > params.n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: params.n]
        return [
            CompletionOutput(
                index=i,
                text=seq.text.visible(params.stop_strings, seq.finished),
                token_ids=list(seq.token_ids),
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if params.logprobs is not None else None,
                num_output_tokens=seq.num_output_tokens,
            )  # fmt: skip
            for i, seq in enumerate(seqs)
        ]

    def _hypotheses(self, core: CoreOutput, state: _RequestState) -> list[CompletionOutput]:
        prompt_len = len(state.prompt_token_ids)
        outputs = []
        for i, hyp in enumerate(core.hypotheses or []):
            tokens = hyp.token_ids[prompt_len:]
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    token_ids=tokens,
                    finish_reason="stop" if hyp.eos else "length",
                    cumulative_logprob=hyp.cumulative_logprob,
                    logprobs=hyp.logprobs,
                )
            )
        return outputs
