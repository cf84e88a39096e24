"""Shared pieces of the benchmark scripts: model building, workloads, the machine's bound
and limit, services. torch is imported where it is used, so that a load-generating client that needs none
(benchmarks/serving.py) starts in a second instead of five."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def build_random_model(arch: str, root: Path, hidden: int, layers: int, heads: int,
                       kv_heads: int, intermediate: int, vocab: int, seed: int = 0) -> Path:  # fmt: skip
    """A random `arch` model of the given sizes under `root` (built once, then reused): the
    family's tiny preset (its layout: parallel residual, partial rotary, biases...) resized."""
    from pagedserve.deploy.make_model import build_model, sized

    name = f"{arch}-h{hidden}-l{layers}-a{heads}-kv{kv_heads}-i{intermediate}-v{vocab}"
    out = root / name
    if not (out / "config.json").exists():
        overrides = sized(
            arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
            intermediate=intermediate, max_positions=4096, init_std=0.05,
        )  # fmt: skip
        # Llama keeps the untied head the figures in RESULTS.md were first measured with.
        preset = "small" if arch == "llama" else "tiny"
        build_model(arch, preset, out, seed=seed, overrides={**overrides, "vocab_size": vocab})
    return out


def random_prompts(count: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def matmul_bound_seconds(hf_config, prefill_tokens: int, decode_tokens: int, dtype) -> float:
    """What this machine could do at best: the model's matmuls alone, at ideal batching
    (1024 tokens per matmul, by the fastest GEMM at hand), for every token of the workload,
    plus the LM head for the sampled rows. Attention, norms and everything else are left out, so it is a bound.

    The matmuls are those of the engine's own model for `hf_config`, read off its linear
    layers (built on the meta device), so any architecture the engine serves is measured."""
    import torch
    from torch import nn

    from pagedserve.engine.model_loader import meta_model

    model = meta_model(hf_config)
    shapes: dict[tuple[int, int], int] = {}  # (in, out) -> layers of that shape
    for module in model.model.modules():
        if isinstance(module, nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    vocab, embed_dim = model.lm_head.weight.shape
    n = 1024

    def best_of_five(run) -> float:
        run()  # warm up
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        return best

    def seconds_per_token(k: int, m: int) -> float:
        """The fastest GEMM at hand: torch's matmul (MKL on a CPU) or, where the engine uses
        them, oneDNN's with the weight reordered once and the CPU kernels' float32 matmul on
        its packed weight (engine/layers.py)."""
        from pagedserve.engine.layers import OneDNNWeight
        from pagedserve.kernels import cpu

        w, x = torch.randn(k, m, dtype=dtype), torch.randn(n, k, dtype=dtype)
        runs = [lambda: x @ w]
        if dtype in (torch.float32, torch.bfloat16):
            for packed in (OneDNNWeight(w.t()), cpu.pack_linear(w.t())):
                if packed is not None:
                    runs.append(lambda packed=packed: packed(x))
        return min(best_of_five(run) for run in runs) / n

    per_token = sum(count * seconds_per_token(*shape) for shape, count in shapes.items())
    head = seconds_per_token(embed_dim, vocab)
    return (prefill_tokens + decode_tokens) * per_token + decode_tokens * head


def decode_kv_tokens(prompt_lens: list[int], output_len: int, window: int | None = None) -> int:
    """Tokens of K/V that one layer reads over the decode steps of the workload: a sequence's
    first output token comes from its prompt's step, and its decode step t (1..output_len-1)
    attends over prompt_len + t tokens (the last `window` of them under a sliding window)."""
    return sum(
        min(p + t, window) if window else p + t for p in prompt_lens for t in range(1, output_len)
    )


def kv_bytes_per_token(hf_config, dtype) -> int:
    """Bytes of K/V that one cached token holds over all the layers of the engine's model for
    `hf_config`: per layer, 2 (K and V) x num_kv_heads x head_dim x the dtype's bytes."""
    from pagedserve.engine.layers import PagedAttention
    from pagedserve.engine.model_loader import meta_model

    layers = [m for m in meta_model(hf_config).modules() if isinstance(m, PagedAttention)]
    return sum(2 * m.num_kv_heads * m.head_dim * dtype.itemsize for m in layers)


def kv_read_bytes(hf_config, prompt_lens: list[int], output_len: int, dtype) -> int:
    """Bytes of K/V read by one read of every running sequence's cache per decode step: per
    layer and token, 2 (K and V) x num_kv_heads x head_dim x the dtype's bytes. The layers are
    the engine's own for `hf_config` (built on the meta device), as in `matmul_bound_seconds`."""
    from pagedserve.engine.layers import PagedAttention
    from pagedserve.engine.model_loader import meta_model

    layers = [m for m in meta_model(hf_config).modules() if isinstance(m, PagedAttention)]
    tokens: dict[int | None, int] = {}  # one count per distinct window
    total = 0
    for layer in layers:
        if layer.sliding_window not in tokens:
            tokens[layer.sliding_window] = decode_kv_tokens(
                prompt_lens, output_len, layer.sliding_window
            )
        per_token = 2 * layer.num_kv_heads * layer.head_dim * dtype.itemsize
        total += per_token * tokens[layer.sliding_window]
    return total


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second that a `torch.sum` reads here: the best of `repeats` sums over a
    float32 tensor of `nbytes` (256 MiB, far beyond any cache)."""
    import torch

    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


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
    """A server subprocess, ready when `ready_path` answers 200 (within `ready_timeout`
    seconds); always stopped. With wait=False the constructor only starts it (so that several
    start side by side) and `wait_ready()` waits."""

    def __init__(self, name: str, argv: list[str], port: int, ready_path: str, work: Path,
                 env: dict[str, str] | None = None, wait: bool = True,
                 ready_timeout: float = 120) -> None:  # fmt: skip
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.ready_timeout = ready_timeout
        self.log = work / f"{name}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            )  # fmt: skip
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        name, log, ready_path = self.name, self.log, self.ready_path
        deadline = time.monotonic() + self.ready_timeout
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
                raise TimeoutError(f"{name} not ready within {self.ready_timeout:.0f} s; see {log}")
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


def wait_for_workers(controller_url: str, count: int, timeout: float = 30) -> None:
    """Until a pagedserve controller lists `count` workers."""
    deadline = time.monotonic() + timeout
    while len(httpx.get(controller_url + "/workers").json()["workers"]) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} workers did not register within {timeout:.0f} s")
        time.sleep(0.1)
