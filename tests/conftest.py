"""Shared fixtures: random-weight models built once per test session, and an engine on one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

BuildCached = Callable[..., Path]


@pytest.fixture(scope="session")
def build_cached(tmp_path_factory: pytest.TempPathFactory) -> BuildCached:
    """`build_cached(arch, preset, seed=0) -> Path`: each combination is built once a session.

    The folders are shared between tests: read them, never write into them.
    """
    # Imported here so that test modules which need no model never pay for transformers.
    from pagedserve.deploy.make_model import build_model

    built: dict[tuple[str, str, int], Path] = {}

    def build(arch: str, preset: str, seed: int = 0) -> Path:
        key = (arch, preset, seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{arch}-{preset}-seed{seed}")
            built[key] = build_model(arch, preset, out, seed=seed)
        return built[key]

    return build


@pytest.fixture(scope="session", autouse=True)
def cpu_attention_kernel() -> None:
    """Build (or load) the C++ attention kernel once, before any test starts a server, so that
    no server's start-up timeout pays for the first compile."""
    from pagedserve.kernels import ops

    ops.attention_backend("cpu")


@pytest.fixture(scope="session")
def tiny_llama(build_cached: BuildCached) -> Path:
    """A tiny Llama (2 layers, hidden 64, GQA, tied embeddings) with its tokenizer."""
    return build_cached("llama", "tiny")


@pytest.fixture(scope="module")
def engine(tiny_llama: Path) -> Iterator:
    """An LLMEngine on the tiny Llama (max_model_len 256, a 16 MiB cache), one per test module;
    a module that needs another engine defines its own `engine`."""
    from pagedserve.engine.config import EngineConfig
    from pagedserve.engine.llm_engine import LLMEngine

    config = EngineConfig(model=str(tiny_llama), max_model_len=256, kv_cache_memory=16 << 20)
    with LLMEngine(config) as e:
        yield e


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, fetched once into the model cache (skips offline)."""
    from pagedserve.deploy import model_store

    try:
        return model_store.fetch_model("smollm2-135m-instruct")
    except model_store.ModelFetchError as e:
        pytest.skip(f"cannot fetch smollm2-135m-instruct (offline?): {e}")


@pytest.fixture(scope="session")
def small_llama(build_cached: BuildCached) -> Path:
    """A small Llama (4 layers, hidden 256, GQA, untied embeddings) with its tokenizer."""
    return build_cached("llama", "small")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
