"""Shared pieces of the benchmark scripts: model building, workloads, the machine's bound."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch


def build_random_llama(out: Path, hidden: int, layers: int, heads: int, kv_heads: int,
                       intermediate: int, vocab: int, seed: int = 0) -> Path:  # fmt: skip
    from pagedserve.deploy.make_model import build_model

    if not (out / "config.json").exists():
        overrides = dict(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
            max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.05,
        )  # fmt: skip
        build_model("llama", "small", out, seed=seed, overrides=overrides)
    return out


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def matmul_bound_seconds(hf_config, prefill_tokens: int, decode_tokens: int, dtype) -> float:
    """What this machine could do at best: the model's matmuls alone, at ideal batching
    (1024 tokens per matmul), for every token of the workload, plus the LM head for the
    sampled rows. Attention, norms and everything else are left out, so it is a bound."""
    h, i = hf_config.hidden_size, hf_config.intermediate_size
    head_dim = getattr(hf_config, "head_dim", None) or h // hf_config.num_attention_heads
    q, kv = hf_config.num_attention_heads * head_dim, hf_config.num_key_value_heads * head_dim
    layer_shapes = [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
    n = 1024

    def seconds_per_token(shapes) -> float:
        weights = [torch.randn(a, b, dtype=dtype) for a, b in shapes]
        x = {a: torch.randn(n, a, dtype=dtype) for a, _ in shapes}
        for w in weights:  # warm up
            x[w.shape[0]] @ w
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for w in weights:
                x[w.shape[0]] @ w
            best = min(best, time.perf_counter() - start)
        return best / n

    per_token = seconds_per_token(layer_shapes) * hf_config.num_hidden_layers
    head = seconds_per_token([(h, hf_config.vocab_size)])
    return (prefill_tokens + decode_tokens) * per_token + decode_tokens * head


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def print_table(rows: list[tuple], headers: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A server subprocess, ready when `ready_path` answers 200; always stopped."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, work: Path,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        log = work / f"{name}.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited while starting; see {log}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{name} not ready within 120 s; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def pagedserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "pagedserve.deploy.cli", *args]
