"""The paged-KV inference engine."""

from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.llm import LLM
from pagedserve.engine.llm_engine import InvalidRequestError, LLMEngine
from pagedserve.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from pagedserve.engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineStats",
    "InvalidRequestError",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]
