"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq

from tqdm import tqdm

from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine, PromptType
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """`with LLM(model, tensor_parallel_size=2) as llm: ...` stops the ranks at the end;
    otherwise call `shutdown()` (nothing to stop with one rank)."""

    def __init__(self, model: str, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=str(model), **engine_args))
        self._ids = itertools.count()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in the order of the prompts."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, Seq) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        # Validate every prompt before adding any, so a bad one leaves the engine untouched.
        # Only the final outputs are kept, so only they are made.
        final = RequestOutputKind.FINAL_ONLY
        processor = self.engine.input_processor
        requests = [
            processor.process(str(next(self._ids)), p, dataclasses.replace(sp, output_kind=final))
            for p, sp in zip(prompts, params, strict=True)
        ]
        order = {r.request_id: i for i, r in enumerate(requests)}
        for request in requests:
            self.engine.add(request)
        results: list[RequestOutput | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
        return results
