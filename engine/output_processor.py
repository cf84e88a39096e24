"""The output processor (vLLM v1's seam): each new token's text and whether it ends its
sequence, then what each request's caller gets after a step.

Per request it remembers what it has handed out (characters, tokens and logprobs entries of
each sequence), so a request with `output_kind=DELTA` gets only what is new: O(new) per step,
never a copy of the prompt or of the answer so far. CUMULATIVE outputs hold the whole answer
so far; FINAL_ONLY ones come once, at the end. Beam search and best_of > n choose their answers
only when they finish, so they give one whole output then, whatever the kind (a delta from
nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.engine.detokenizer import find_stop_string, update_text, visible_len, visible_text
from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve.engine.sampling_params import RequestOutputKind
from pagedserve.engine.sequence import Sequence, SequenceGroup


@dataclass
class _Sent:
    """How much of one sequence's answer its request's outputs have carried."""

    chars: int = 0
    tokens: int = 0
    logprobs: int = 0
    finished: bool = False


@dataclass
class _RequestState:
    prompt_token_ids: list[int]  # taken once; every output refers to this list
    sent: list[_Sent] = field(default_factory=list)  # by sequence index in the group

    def of(self, index: int) -> _Sent:
        while len(self.sent) <= index:  # a fresh prompt forks into n sequences
            self.sent.append(_Sent())
        return self.sent[index]


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._states: dict[str, _RequestState] = {}

    def check_stop(self, seq: Sequence, token: int) -> None:
        """Detokenize `seq`'s newest token `token`, then finish `seq` if it ends the answer:
        EOS, a stop token, a stop string (the text cut before it), max_tokens, the context."""
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

    def add(self, seq: Sequence) -> None:
        """Start a request's output state; a resumed answer's client already holds its
        resumed tokens and `seq.sent_chars` characters of their text."""
        state = _RequestState(seq.token_ids[: seq.num_prompt_tokens])
        state.sent.append(_Sent(chars=seq.sent_chars, tokens=seq.num_output_tokens))
        self._states[seq.request_id] = state

    def output(self, group: SequenceGroup, force: bool = False) -> RequestOutput | None:
        """The request's output after a step, None when it owes nothing yet; `force` (abort,
        out of memory) ends the request with what it has. A finished request's state goes."""
        params, first = group.params, group.seqs[0]
        finished = group.is_finished
        state = self._states[first.request_id]
        if finished or force:
            del self._states[first.request_id]
        whole_at_end = (
            group.beam is not None
            or params.best_of > params.n
            or params.output_kind is RequestOutputKind.FINAL_ONLY
        )
        if whole_at_end and not (finished or force):
            return None
        if group.beam is not None:
            completions = self._hypotheses(group)
        elif whole_at_end or params.output_kind is RequestOutputKind.CUMULATIVE:
            completions = self._whole(group)
        else:
            completions = [
                c for i, seq in enumerate(group.seqs) if (c := self._delta(i, seq, state.of(i)))
            ]
        metrics = {"arrival_time": first.arrival_time}
        if first.first_token_time is not None:
            metrics["first_token_time"] = first.first_token_time
        return RequestOutput(
            request_id=first.request_id,
            prompt=first.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=metrics,
            prompt_logprobs=first.prompt_logprobs if params.prompt_logprobs is not None else None,
        )

    @staticmethod
    def _delta(index: int, seq: Sequence, sent: _Sent) -> CompletionOutput | None:
        """What is new in `seq` since its last output; None when nothing is."""
        if sent.finished:
            return None
        end = visible_len(seq)
        text = seq.output_text[sent.chars : end] if end > sent.chars else ""
        token_ids = seq.token_ids[seq.num_prompt_tokens + sent.tokens :]
        if not (text or token_ids or seq.is_finished):
            return None
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = seq.logprobs[sent.logprobs :]
            sent.logprobs += len(logprobs)
        sent.chars = max(sent.chars, end)
        sent.tokens += len(token_ids)
        sent.finished = seq.is_finished
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
    def _whole(group: SequenceGroup) -> list[CompletionOutput]:
        seqs, params = group.seqs, group.params
        if params.best_of > params.n:
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: params.n]
        return [
            CompletionOutput(
                index=i,
                text=visible_text(seq),
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if params.logprobs is not None else None,
            )  # fmt: skip
            for i, seq in enumerate(seqs)
        ]

    def _hypotheses(self, group: SequenceGroup) -> list[CompletionOutput]:
        prompt_len = group.beam.prompt_len
        outputs = []
        for i, hyp in enumerate(group.beam.best(group.params.n)):
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
