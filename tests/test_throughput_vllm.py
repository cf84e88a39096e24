"""Tests for the parts of benchmarks/throughput.py's vLLM comparison that need no vLLM."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
import torch

from benchmarks import peers, throughput
from benchmarks.common import kv_bytes_per_token
from pagedserve.deploy.make_model import ARCHS, sized


def tiny_llama_config():
    spec = ARCHS["llama"]
    overrides = sized("llama", hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128)
    config = spec.config_cls(**{**spec.presets["tiny"], **overrides})
    config.architectures = [spec.model_cls.__name__]
    return config


def test_identical_outputs_counts_equal_answers_and_where_the_others_first_differ() -> None:
    ours = [[1, 2, 3], [1, 2, 3], [4, 5, 6], [7, 8]]
    theirs = [[1, 2, 3], [1, 9, 3], [0, 5, 6], [7, 8, 9]]
    assert throughput.identical_outputs(ours, theirs) == (1, [1, 0, 2])


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer() -> None:
    # 3 layers, K and V, 2 KV heads of 16, float32
    assert kv_bytes_per_token(tiny_llama_config(), torch.float32) == 3 * 2 * 2 * 16 * 4


def test_vllm_cpu_env_binds_threads_to_cores_when_asked_and_rounds_the_cache_up(
    monkeypatch,
) -> None:
    monkeypatch.setattr(peers.os, "sched_getaffinity", lambda pid: {3, 1, 2}, raising=False)
    env = peers.vllm_cpu_env(2, 2**30 + 1, bind="cores")
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1,2"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    env = peers.vllm_cpu_env(2, 1)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert peers.vllm_cpu_env(2, 1, bind="0-1")["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_a_vllm_that_does_not_start_is_left_out_with_its_log(monkeypatch, tmp_path, capsys) -> None:
    # This venv has no vllm: the script fails on its import, as a broken vLLM venv would.
    monkeypatch.setattr(peers, "vllm_python", lambda: sys.executable)
    monkeypatch.setattr(throughput.tempfile, "tempdir", str(tmp_path))  # the log it keeps
    args = argparse.Namespace(dtype="float32", max_num_seqs=4, seed=0, vllm_threads_bind="auto")
    assert throughput.start_vllm(tmp_path, [[5, 6, 7]], 4, tiny_llama_config(), args) is None
    out = capsys.readouterr().out
    assert "vLLM left out: it did not start: vLLM exited with code 1" in out
    assert "No module named 'vllm'" in out
