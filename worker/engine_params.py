"""Wire requests -> the engine's SamplingParams: OpenAI's completion and chat fields and
FastChat's GenerateParams, converted in one place so both protocols sample alike.

A field left out (None) takes the engine's neutral value; a greedy request (temperature 0)
samples with top_p 1; every request streams deltas (RequestOutputKind.DELTA), which the
worker's streams send and its non-streaming answers join. A value the engine refuses is a
400 that says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.protocol.fastchat import GenerateParams
from pagedserve.protocol.openai import SamplingFields
from pagedserve.worker.requests import RequestError

if TYPE_CHECKING:
    from pagedserve.engine.chat_templates import ChatTemplate

MAX_BEST_OF = 16  # as OpenAI's n: sequences one request may generate

# What a field left out means: the engine's neutral value.
_NEUTRAL = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
}


def from_openai(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    chat_template: ChatTemplate | None = None,
) -> SamplingParams:
    """`chat_template`: a chat request's, whose end-of-turn strings and tokens stop it too."""
    if req.best_of is not None and req.best_of > MAX_BEST_OF:
        raise RequestError(
            400, f"best_of must be at most {MAX_BEST_OF}, got {req.best_of}", param="best_of"
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    stop_ids = list(req.stop_token_ids or [])
    if chat_template is not None:
        stop += [s for s in chat_template.stop if s not in stop]
        stop_ids += [t for t in chat_template.stop_token_ids if t not in stop_ids]
    return _sampling_params(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=stop or None,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        skip_special_tokens=req.skip_special_tokens,
        n=req.n,
        best_of=req.best_of,
        use_beam_search=req.use_beam_search,
        logprobs=logprobs,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
    )


def from_fastchat(params: GenerateParams) -> SamplingParams:
    """As FastChat's vLLM worker converts them: a temperature near zero is greedy."""
    unsupported = params.unsupported()
    if unsupported:
        raise RequestError(
            400,
            "not supported by pagedserve's engine yet: " + ", ".join(unsupported),
            param=unsupported[0],
        )
    return _sampling_params(
        temperature=0.0 if params.temperature <= 1e-5 else params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_new_tokens,
        stop=params.stop or None,
        stop_token_ids=params.stop_token_ids,
        seed=params.seed,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        logprobs=params.logprobs,
        best_of=params.best_of,
        use_beam_search=bool(params.use_beam_search),
    )


def _sampling_params(**fields: Any) -> SamplingParams:
    for name, neutral in _NEUTRAL.items():
        if fields.get(name) is None:
            fields[name] = neutral
    # greedy ignores top_p; otherwise it stays above 0, which SamplingParams refuses
    fields["top_p"] = 1.0 if fields["temperature"] == 0 else max(fields["top_p"], 1e-5)
    try:
        return SamplingParams(**fields, output_kind=RequestOutputKind.DELTA)
    except ValueError as e:
        raise RequestError(400, str(e)) from e


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids as JSON keys (strings)."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise RequestError(
                400, f"logit_bias keys must be token ids; got {key!r}", param="logit_bias"
            ) from None
    return out or None
