"""The CPU kernels (kernels/cpu/, C++ built on first use) against the PyTorch reference:
decode attention read in place from NaN-poisoned paged caches (mixed batches, GQA ratios, odd
head dims, sliding windows, bfloat16), RMSNorm with its residual, the rotary embedding in
place, SiLU-and-mul, the store of keys and values; and the fallback where they cannot be
built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import MIXED, make_case
from servers import skip_or_fail_in_ci

from pagedserve.engine.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    pack_linear_weights,
)
from pagedserve.engine.parallel import ParallelContext
from pagedserve.kernels import cpu, ops
from pagedserve.kernels import reference as ref


@pytest.fixture(scope="module")
def built() -> None:
    """For the tests that call the compiled kernel: a skip where it does not build (no C++
    toolchain), a failure under CI (CI=true), whose image has one."""
    if not cpu.available():
        skip_or_fail_in_ci(
            "the CPU kernel does not build here (no C++ toolchain?); see its warning"
        )


needs_kernel = pytest.mark.usefixtures("built")


def check(seqs, *, window=None, dtype=torch.float32, clean=False, **case):
    """`clean`: NaN-free caches, for batches with prefill rows (the reference computes those,
    and it multiplies masked slots by zero)."""
    args = make_case(seqs, dtype=dtype, **case)
    if clean:
        args = [t.nan_to_num() if t.is_floating_point() else t for t in args]
    scale = args[0].shape[-1] ** -0.5
    got = cpu.paged_attention(*args, scale, sliding_window=window)
    want = ref.paged_attention(
        *[t.float().nan_to_num() if t.is_floating_point() else t for t in args], scale,
        sliding_window=window,
    )  # fmt: skip
    assert got.shape == args[0].shape and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


DECODES = [(ctx, 1) for ctx in (1, 7, 8, 16, 17, 31, 64, 65, 200)]


@needs_kernel
@pytest.mark.parametrize(
    ("block_size", "num_heads", "num_kv_heads", "head_dim"),
    [(8, 4, 4, 64), (16, 4, 2, 80), (32, 8, 2, 96), (16, 8, 1, 128), (8, 6, 2, 24), (16, 3, 3, 20)],
)
def test_decodes_read_only_their_own_slots(block_size, num_heads, num_kv_heads, head_dim):
    # GQA ratios 1, 2, 4, 8, 3 and 1; contexts ending at, before and after block edges.
    check(DECODES, block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
          head_dim=head_dim)  # fmt: skip


@needs_kernel
@pytest.mark.parametrize("window", [1, 5, 16, 23, 500])
def test_sliding_window_decodes(window):
    check(DECODES, window=window, block_size=8, num_heads=4, num_kv_heads=2)


# Prefill rows go row-wise through the decode kernel (short sequences, AVX-512) or to SDPA and
# the reference (ROW_WISE_KEYS 0: every sequence is long).
ROW_WISE = pytest.mark.parametrize("row_wise_keys", [cpu.ROW_WISE_KEYS, 0])


@needs_kernel
@ROW_WISE
@pytest.mark.parametrize("window", [None, 13])
def test_mixed_batch_decode_and_prefill_rows(window, row_wise_keys, monkeypatch):
    monkeypatch.setattr(cpu, "ROW_WISE_KEYS", row_wise_keys)
    check(MIXED, window=window, clean=True, block_size=8, num_heads=8, num_kv_heads=2)


@needs_kernel
@ROW_WISE
def test_prefill_only_batch_is_the_reference(row_wise_keys, monkeypatch):
    monkeypatch.setattr(cpu, "ROW_WISE_KEYS", row_wise_keys)
    check([(23, 23), (50, 7), (90, 33)], clean=True, block_size=8)


@needs_kernel
@ROW_WISE
@pytest.mark.parametrize("window", [None, 30])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_whole_prompts_attend_causally_one_at_a_time(
    window, num_kv_heads, row_wise_keys, monkeypatch
):
    # Whole prompts (query = context) take SDPA's causal kernel unless the window cuts in (40).
    monkeypatch.setattr(cpu, "ROW_WISE_KEYS", row_wise_keys)
    check([(23, 23), (40, 40), (16, 16), (3, 3)], window=window, clean=True, block_size=8,
          num_heads=4, num_kv_heads=num_kv_heads)  # fmt: skip


# Prefill chunks (after a cached prefix, and whole prompts) whose rows the kernel takes a few
# at a time: row counts that do and do not fill its blocks of rows, one to 37 rows.
PREFILL_ROWS = [(9, 1), (12, 3), (23, 23), (50, 7), (90, 37), (17, 4), (33, 5)]


@needs_kernel
@pytest.mark.parametrize(
    ("block_size", "num_heads", "num_kv_heads", "head_dim"),
    [(8, 4, 4, 64), (16, 4, 2, 80), (32, 8, 2, 96), (16, 8, 1, 128), (8, 6, 2, 24), (16, 3, 3, 20)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rows_match_reference(block_size, num_heads, num_kv_heads, head_dim, dtype):
    check(PREFILL_ROWS + DECODES[:3], dtype=dtype, clean=True, block_size=block_size,
          num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)  # fmt: skip


@needs_kernel
def test_bfloat16_decodes():
    check(DECODES, dtype=torch.bfloat16, num_heads=8, num_kv_heads=2)


@needs_kernel
@pytest.mark.parametrize("seqs", [DECODES, PREFILL_ROWS], ids=["decodes", "prefill_rows"])
def test_strided_query_from_a_fused_qkv_projection(seqs):
    query, k_cache, v_cache, *rest = make_case(seqs)
    qkv = torch.randn(query.shape[0], 4 * 64 + 2 * 2 * 64)
    q = qkv[:, : 4 * 64].view(-1, 4, 64)  # rows strided by the whole qkv width
    q.copy_(query)
    got = cpu.paged_attention(q, k_cache, v_cache, *rest, 0.125)
    want = cpu.paged_attention(query, k_cache, v_cache, *rest, 0.125)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- the fused per-token ops --------------------------------------------------------------

FUSED_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=0, atol=0)}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    """bfloat16 exactly: the kernel rounds where the reference rounds."""
    gen = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(7, 3, 200, generator=gen)).to(dtype)
    weight = torch.randn(200, generator=gen).to(dtype)
    residual = torch.randn(7, 3, 200, generator=gen).to(dtype) if with_residual else None
    got = cpu.rms_norm(x, weight, 1e-5, residual)
    want = ref.rms_norm(x, weight, 1e-5, residual)
    for g, w in zip(*((got, want) if with_residual else ((got,), (want,))), strict=True):
        assert g.shape == w.shape and g.dtype == dtype
        torch.testing.assert_close(g, w, **FUSED_TOL[dtype])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (80, 20), (24, 12)])
def test_rotary_in_place_on_a_fused_qkv_matches_reference(dtype, head_dim, rotary_dim):
    """q and k as strided views of one qkv projection: rotated in place, v and the dims past
    rotary_dim untouched."""
    gen = torch.Generator().manual_seed(4)
    tokens, heads, kv_heads, max_pos = 9, 6, 2, 300
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    freqs = torch.rand(max_pos, rotary_dim // 2, generator=gen) * 3
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    want = qkv.clone()
    for buf, rotate in ((want, ref.rotary_embedding), (qkv, cpu.rotary_embedding)):
        q, k, _ = buf.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        rotate(positions, q.view(tokens, heads, -1), k.view(tokens, kv_heads, -1), cos, sin,
               rotary_dim)  # fmt: skip
    torch.testing.assert_close(qkv, want, **FUSED_TOL[dtype])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(dtype):
    """Gates far into both tails (exp(-|g|) underflows) and around zero; within an ulp of the
    dtype (the kernel's exp is its own, within an ulp of libm's)."""
    gen = torch.Generator().manual_seed(5)
    x = (8 * torch.randn(5, 3, 2 * 136, generator=gen)).to(dtype)
    x[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0]).to(dtype)
    got, want = cpu.silu_and_mul(x), ref.silu_and_mul(x)
    assert got.shape == want.shape == (5, 3, 136) and got.dtype == dtype
    ulp = dict(rtol=3e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(got, want, **ulp)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_from_a_fused_qkv_matches_reference(dtype):
    """Keys and values as strided views of one qkv projection; slot -1 (padding) stores
    nothing; every other slot of the caches keeps what it held."""
    gen = torch.Generator().manual_seed(6)
    tokens, kv_heads, head_dim, blocks, block_size = 7, 2, 16, 4, 8
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    _, k, v = qkv.split([4 * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.tensor([3, 17, -1, 30, 0, 9, -1])
    caches = [torch.randn(blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
              for _ in range(2)]  # fmt: skip
    want = [c.clone() for c in caches]
    ref.store_kv(k, v, *want, slots)
    cpu.store_kv(k, v, *caches, slots)
    for got, expected in zip(caches, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_kernel
def test_runs_on_torchs_threads():
    """The kernel's work items run on torch's intra-op pool: one thread and two agree."""
    args = make_case([(ctx, 1) for ctx in range(1, 120, 7)], num_heads=8, num_kv_heads=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.paged_attention(*args, 0.125)
        torch.set_num_threads(2)
        two = cpu.paged_attention(*args, 0.125)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize(
    ("configured", "env", "backend"),
    [("torch", "cpu", "torch"), ("cpu", "torch", "cpu"), ("auto", "torch", "torch"),
     ("auto", None, "cpu")],
)  # fmt: skip
def test_the_engine_resolves_its_backend_once_at_start(
    tiny_llama, monkeypatch, configured, env, backend
):
    """EngineConfig.attention_backend (auto: the env override, else the device's default)
    binds one backend's kernels to the model's layers when the engine starts; its steps call
    them directly, without looking at the environment or the tensors' device again."""
    from pagedserve.engine.layers import KERNEL_LAYERS
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    if env is None:
        monkeypatch.delenv(ops.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ops.ENV_VAR, env)
    llm = LLM(tiny_llama, attention_backend=configured, device="cpu", kv_cache_memory=1 << 20,
              max_model_len=64)  # fmt: skip
    runner = llm.engine.core.runner
    assert runner.attention_backend == backend
    assert runner.kernels is ops.backend_module(backend)
    layers = [m for m in runner.model.modules() if isinstance(m, KERNEL_LAYERS)]
    assert layers and all(m.kernels is runner.kernels for m in layers)

    def lookup(*args, **kwargs):
        raise AssertionError("a kernel call looked its backend up")

    monkeypatch.setattr(ops, "attention_backend", lookup)
    monkeypatch.setattr(ops, "resolve_backend", lookup)
    params = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=4, ignore_eos=True)
    out = llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)  # copy_blocks too (n=2)
    assert [len(c.token_ids) for c in out[0].outputs] == [4, 4]


def test_the_config_names_the_kernels_backends() -> None:
    from pagedserve.engine.config import ATTENTION_BACKENDS, EngineConfig

    assert ATTENTION_BACKENDS[1:] == ops.BACKENDS and ATTENTION_BACKENDS[0] == "auto"
    with pytest.raises(ValueError, match="attention_backend must be one of auto, torch"):
        EngineConfig(model="m", attention_backend="cuda")


def test_without_a_compiler_the_reference_runs_and_says_why(tmp_path):
    """No toolchain (here: a compiler that fails, and an empty extension cache): the backend
    falls back to the reference with a warning; forcing the CPU kernel is refused clearly."""
    script = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from pagedserve.kernels import ops\n"
        "print('backend', ops.attention_backend('cpu'))\n"
        "import os; os.environ[ops.ENV_VAR] = 'cpu'\n"
        "try:\n    ops.attention_backend('cpu')\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop(ops.ENV_VAR, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert "backend torch" in done.stdout, done.stdout + done.stderr
    assert "CPU kernels unavailable" in done.stderr
    assert "refused: PAGEDSERVE_ATTENTION_BACKEND=cpu" in done.stdout


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path) -> None:
    lock = tmp_path / "lock"
    assert not cpu.remove_stale_build_lock(tmp_path)  # no lock
    lock.touch()
    assert not cpu.remove_stale_build_lock(tmp_path) and lock.exists()  # a build under way
    old = lock.stat().st_mtime - cpu.STALE_BUILD_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    assert cpu.remove_stale_build_lock(tmp_path) and not lock.exists()


# --- packed linear layers: the CPU kernels' float32 matmul, else oneDNN ---------------------


def kernel_packing():
    if not cpu.available():
        skip_or_fail_in_ci("the CPU kernel does not build here (no C++ toolchain?)")
    if not cpu._ops().built_with_avx512():
        pytest.skip("the CPU kernels' matmul needs AVX-512, which this CPU lacks")
    return cpu.pack_linear


@pytest.mark.parametrize(
    ("dtype", "packing"),
    [(torch.float32, "onednn"), (torch.bfloat16, "onednn"), (torch.float32, "kernels"),
     (torch.bfloat16, "kernels")],
)  # fmt: skip
def test_packed_linear_layers_match_f_linear(dtype, packing):
    """The weights the model runner packs give F.linear's products, bias and all, at 1 to 8
    rows (each tile shape of the kernels' matmul), a decode batch and a prefill batch, on
    widths that are not whole panels; a packed layer's plain weight is freed unless an
    embedding tied to it still reads it. The kernels take float32 only: bfloat16 falls
    back to oneDNN."""
    pack = kernel_packing() if packing == "kernels" else None
    tp = ParallelContext()
    embedding = VocabParallelEmbedding(300, 72, tp=tp)
    tied_head = ParallelLMHead(300, 72, tp=tp)
    tied_head.weight = embedding.weight
    layers = [
        ColumnParallelLinear(96, {"q": (4, 16), "k": (2, 16), "v": (2, 16)}, bias=True, tp=tp),
        RowParallelLinear((4, 24), 80, bias=True, tp=tp),
        ParallelLMHead(300, 72, tp=tp),
        tied_head,
    ]
    model = torch.nn.ModuleList([*layers, embedding]).to(dtype)
    gen = torch.Generator().manual_seed(5)
    for p in model.parameters():
        p.data.normal_(generator=gen)
    weights = [layer.weight.detach().clone() for layer in layers]
    pack_linear_weights(model, pack)
    assert [layer.weight.numel() == 0 for layer in layers] == [True, True, True, False]
    kinds = {type(layer.packed).__name__ for layer in layers}
    assert kinds == {"PackedLinear" if pack and dtype == torch.float32 else "OneDNNWeight"}
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for layer, weight in zip(layers, weights, strict=True):
        assert layer.packed is not None
        bias = getattr(layer, "bias", None)  # the LM head has none
        assert layer.packed.shape == tuple(weight.shape)
        for rows in (1, 2, 3, 5, 7, 8, 13, 32, 200, 2900):  # 2,900: several blocks of rows
            x = torch.randn(rows, weight.shape[1], generator=gen).to(dtype)
            want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
            torch.testing.assert_close(layer(x).float(), want, **tol)
        wide = torch.randn(13, weight.shape[1] + 5, generator=gen).to(dtype)
        x = wide[:, 2 : 2 + weight.shape[1]]  # rows strided, as a view of a wider projection
        want = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        torch.testing.assert_close(layer(x).float(), want, **tol)


@needs_kernel
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 33, 8192])
def test_greedy_sample_is_argmax_and_its_log_softmax(vocab):
    """Small integer logits, so that most rows hold ties, some across the vector lanes and the
    tail: the first index of the largest, as torch.argmax."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randint(0, 4, (9, vocab), generator=gen).float()
    logits[0] = -float("inf")  # every token banned: token 0, as argmax
    if vocab > 3:
        logits[1, [2, vocab - 1]] = -float("inf")
    tokens, logprobs = cpu.greedy_sample(logits)
    assert torch.equal(tokens, logits.argmax(-1))
    want = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs[1:], want[1:])
