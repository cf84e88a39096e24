"""Tests for `pagedserve worker`'s engine flags (deploy/engine_options.py, deploy/cli.py): one
flag per EngineConfig field with the field's own default, reaching the engine's config, and
engine messages that name only flags the worker has."""

from __future__ import annotations

import json
import re
import tokenize
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from pagedserve.deploy.cli import app
from pagedserve.engine.config import EngineConfig, flag
from pagedserve.worker.config import WorkerConfig

ENGINE_DIR = Path(__file__).resolve().parents[1] / "engine"


def worker_command():
    return typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]


def worker_flags() -> set[str]:
    return {o for p in worker_command().params for o in (*p.opts, *p.secondary_opts)}


def run_worker(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Result, list]:
    """Invoke `pagedserve worker --model-path /models/m --no-register ARGS` up to the point where
    it would serve; returns the result and the WorkerConfig it would have served (if any)."""
    served: list[WorkerConfig] = []
    monkeypatch.setattr("pagedserve.worker.server.serve", served.append)
    argv = ["worker", "--model-path", "/models/m", "--no-register", *args]
    return CliRunner().invoke(app, argv), served


def test_every_engine_field_but_model_is_a_worker_flag_with_its_default() -> None:
    params = {p.name: p for p in worker_command().params}
    engine_fields = [f for f in fields(EngineConfig) if f.name != "model"]
    assert engine_fields
    for f in engine_fields:
        param = params.get(f.name)
        assert param is not None, f"EngineConfig.{f.name} has no worker flag"
        assert flag(f.name) in param.opts
        assert param.default == f.default, f.name
        assert param.help == f.metadata["help"]
        if isinstance(f.default, bool):
            assert param.secondary_opts == ["--no-" + flag(f.name)[2:]]
    assert "model" not in params  # the engine's model is --model-path


def test_worker_without_engine_flags_builds_the_default_engine_config(monkeypatch) -> None:
    result, served = run_worker(monkeypatch)
    assert result.exit_code == 0, result.output
    assert served[0].engine == EngineConfig(model="/models/m")


def test_engine_flags_reach_the_workers_engine_config(monkeypatch) -> None:
    result, served = run_worker(
        monkeypatch,
        *("--tokenizer", "/models/tok", "--dtype", "bfloat16", "--device", "cpu"),
        *("--max-model-len", "512", "--block-size", "32", "--kv-cache-memory", "1048576"),
        *("--gpu-memory-utilization", "0.5", "--max-num-seqs", "8"),
        *("--max-num-batched-tokens", "1024", "--no-enable-chunked-prefill"),
        *("--no-enable-prefix-caching", "--tensor-parallel-size", "2"),
        *("--ray-address", "ray://head:10001", "--distributed-timeout", "5.5"),
        *("--cpu-threads", "3", "--seed", "7", "--attention-backend", "torch"),
    )
    assert result.exit_code == 0, result.output
    assert served[0].engine == EngineConfig(
        model="/models/m",
        tokenizer="/models/tok",
        dtype="bfloat16",
        device="cpu",
        max_model_len=512,
        block_size=32,
        kv_cache_memory=1 << 20,
        gpu_memory_utilization=0.5,
        max_num_seqs=8,
        max_num_batched_tokens=1024,
        enable_chunked_prefill=False,
        enable_prefix_caching=False,
        tensor_parallel_size=2,
        ray_address="ray://head:10001",
        distributed_timeout=5.5,
        cpu_threads=3,
        seed=7,
        attention_backend="torch",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--block-size", "7"], "block_size must be 8, 16 or 32"),
        (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization must be in (0, 1]"),
        (["--dtype", "float8"], "dtype must be 'auto' or one of"),
        (["--distributed-timeout", "0"], "distributed_timeout must be a positive"),
        (["--attention-backend", "cuda"], "attention_backend must be one of"),
        (["--block-size", "big"], "Invalid value for '--block-size'"),
    ],
)
def test_bad_engine_flag_is_a_usage_error_not_a_traceback(monkeypatch, args, message) -> None:
    result, served = run_worker(monkeypatch, *args)
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # click's usage error, no traceback
    assert message in " ".join(result.output.replace("│", " ").split())
    assert not served


def test_worker_config_refuses_an_engine_for_another_model() -> None:
    with pytest.raises(ValueError, match="differs from model_path"):
        WorkerConfig(model_path="/models/m", engine=EngineConfig(model="/models/other"))


def test_kv_cache_flag_is_the_budget_flag_of_the_device(monkeypatch) -> None:
    import torch

    assert EngineConfig(model="m", device="cpu").kv_cache_flag == "--kv-cache-memory"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert EngineConfig(model="m").kv_cache_flag == "--gpu-memory-utilization"
    assert {"--kv-cache-memory", "--gpu-memory-utilization"} <= worker_flags()


def test_flag_refuses_a_name_that_is_no_field() -> None:
    with pytest.raises(ValueError, match="no field 'kv_cache_bytes'"):
        flag("kv_cache_bytes")


def _named_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", text))


def _block_bytes(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_key_value_heads"] * head_dim * 4 * 16 * cfg["num_hidden_layers"]


@pytest.mark.parametrize("blocks", [0, 1], ids=["no-block", "short-of-one-sequence"])
def test_kv_cache_errors_name_the_cpu_budget_flag(tiny_llama: Path, blocks: int) -> None:
    from pagedserve.engine.llm_engine import LLMEngine

    budget = _block_bytes(tiny_llama) * blocks or 100
    config = EngineConfig(
        model=str(tiny_llama), device="cpu", kv_cache_memory=budget, max_model_len=64
    )
    with pytest.raises(ValueError) as refused:
        LLMEngine(config)
    named = _named_flags(str(refused.value))
    assert "--kv-cache-memory" in named
    assert named <= worker_flags()


def test_every_flag_the_engine_names_is_a_worker_flag() -> None:
    """Messages and help in engine/ name flags by hand too: each must exist."""
    named: dict[str, str] = {}
    for path in sorted(ENGINE_DIR.rglob("*.py")):
        with tokenize.open(path) as f:
            for tok in tokenize.generate_tokens(f.readline):
                if tok.type in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)):
                    named.update(dict.fromkeys(_named_flags(tok.string), path.name))
    assert "--max-model-len" in named  # the scan sees the engine's messages
    missing = {name: where for name, where in named.items() if name not in worker_flags()}
    assert not missing, f"engine names flags the worker lacks: {missing}"
