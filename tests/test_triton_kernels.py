"""The Triton kernels against the PyTorch reference (kernels/reference.py), on random inputs of
odd sizes: in Triton's interpreter on CPU tensors where there is no GPU (CI), natively on a GPU
where there is one.

Triton decides between compiling and interpreting when each `@triton.jit` function is defined,
its own standard library's (`tl.zeros`, `tl.sum`, ...) included, so TRITON_INTERPRET=1 must be
set before `triton` is first imported. Run alone, this module sets it itself. In the whole suite
an earlier module has usually imported triton already (transformers imports torch._dynamo, which
imports triton), and then `test_kernels_in_a_fresh_process` runs this module again in a process
of its own instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kernel_cases
import pytest
import torch
from servers import skip_or_fail_in_ci

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _triton_imported_compiled() -> bool:
    if "triton" not in sys.modules:
        return False
    from triton.language import standard

    return type(getattr(standard, "zeros", None)).__name__ != "InterpretedFunction"


DELEGATED = not ON_GPU and _triton_imported_compiled()
if not ON_GPU and not DELEGATED:
    os.environ["TRITON_INTERPRET"] = "1"

# triton >= 3.7 comes with the dev extra (pagedserve[triton]): 3.7 is the oldest interpreter
# that runs these kernels (3.6's fails on data-dependent loops). Without it, collection fails.
from pagedserve.kernels import ops  # noqa: E402
from pagedserve.kernels import reference as ref  # noqa: E402
from pagedserve.kernels import triton as tk  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


# The only skips a fresh process on a CPU may report, by test and reason; any other skip there
# (a kernel test, or the whole module) fails the parent under CI and skips it elsewhere.
CHILD_SKIPS = {
    "test_kernels_in_a_fresh_process": "this process runs the kernel tests itself",
    "test_large_batches_on_gpu": "needs a CUDA device",
}


@pytest.mark.timeout(900)
@pytest.mark.skipif(not DELEGATED, reason="this process runs the kernel tests itself")
def test_kernels_in_a_fresh_process(tmp_path):
    """Every test of this module, run in a process of its own; it passes only if each of them
    ran there and passed, or skipped for a reason in CHILD_SKIPS."""
    report = tmp_path / "kernels.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-rs", "-p", "no:cacheprovider",
         f"--junitxml={report}"],
        env=env, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    output = done.stdout[-8000:] + done.stderr[-2000:]
    assert done.returncode == 0, output
    outcomes = child_outcomes(report)
    assert {name.split("[")[0] for name in outcomes} == {*CHILD_TESTS, *CHILD_SKIPS}, output
    unexpected = {
        name: why
        for name, why in outcomes.items()
        if why is not None and why != CHILD_SKIPS.get(name.split("[")[0])
    }
    if unexpected:
        skip_or_fail_in_ci(f"the fresh process skipped {len(unexpected)} test(s): {unexpected}")


def child_outcomes(report: Path) -> dict[str, str | None]:
    """A JUnit XML report's tests: name -> None if passed, the reason if skipped; a failure or
    an error raises."""
    import xml.etree.ElementTree as ET

    outcomes: dict[str, str | None] = {}
    for case in ET.parse(report).iter("testcase"):
        bad = [e.get("message") for e in case if e.tag in ("failure", "error")]
        assert not bad, f"{case.get('name')}: {bad}"
        skip = case.find("skipped")
        outcomes[case.get("name", "")] = None if skip is None else skip.get("message", "")
    return outcomes


# Tolerances for outputs of order 1: the kernels accumulate in float32 but round P to the
# 16-bit dtype for the P.V product, as flash attention does.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


# --- paged attention ------------------------------------------------------------------------


def make_case(seqs, **options):
    return kernel_cases.make_case(seqs, device=DEVICE, **options)


def check_attention(seqs, *, window=None, dtype=torch.float32, seed=0, **options):
    case_args = {k: options.pop(k) for k in ("block_size", "num_heads", "num_kv_heads", "head_dim")
                 if k in options}  # fmt: skip
    case = make_case(seqs, dtype=dtype, seed=seed, **case_args)
    scale = case[0].shape[-1] ** -0.5
    got = tk.paged_attention(*case, scale, sliding_window=window, **options)
    # The specification, in float32 (NaN-free caches: the reference multiplies masked slots by 0).
    clean = [t.float().nan_to_num() if t.is_floating_point() else t for t in case]
    want = ref.paged_attention(*clean, scale, sliding_window=window)
    assert got.shape == case[0].shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, **TOL[dtype])


MIXED = kernel_cases.MIXED


@pytest.mark.parametrize(
    ("block_size", "num_heads", "num_kv_heads", "head_dim"),
    [(8, 4, 4, 64), (16, 4, 2, 80), (32, 8, 2, 96), (16, 8, 1, 128), (8, 2, 1, 80)],
)
def test_mixed_batch_matches_reference(block_size, num_heads, num_kv_heads, head_dim):
    # GQA ratios 1, 2, 4, 8 and 2; block_m 32 so long chunks span several query tiles.
    check_attention(MIXED, block_size=block_size, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, head_dim=head_dim, block_m=32, tile_n=16)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seqs", [MIXED, [(ctx, 1) for ctx in (3, 17, 40, 129)]])
def test_16_bit_dtypes_match_reference(dtype, seqs):
    check_attention(seqs, dtype=dtype, num_heads=8, num_kv_heads=2, tile_n=32)


@pytest.mark.parametrize(("block_size", "tile_n"), [(8, 32), (32, 16), (16, 16)])
def test_decodes_match_reference(block_size, tile_n):
    # Key tiles wider and narrower than a block.
    seqs = [(ctx, 1) for ctx in (1, 9, 17, 31, 64, 65)]
    check_attention(seqs, block_size=block_size, num_heads=8, num_kv_heads=2, tile_n=tile_n)


@pytest.mark.parametrize("segments", [2, 5])
@pytest.mark.parametrize("window", [None, 23])
def test_split_kv_decodes_match_reference(segments, window):
    # Few sequences, one long: segments beyond a short context or before the window stay empty.
    seqs = [(300, 1), (7, 1), (129, 1)]
    check_attention(seqs, window=window, num_heads=8, num_kv_heads=1, head_dim=96,
                    num_segments=segments, tile_n=32)  # fmt: skip


def test_split_kv_is_chosen_for_long_contexts_with_few_sequences():
    from pagedserve.kernels.triton.paged_attention import MIN_SEGMENT_TOKENS, _num_segments

    h100 = 132  # streaming multiprocessors
    assert _num_segments(1, 8, 8192, h100) == 8192 // MIN_SEGMENT_TOKENS
    assert 1 < _num_segments(16, 8, 8192, h100) < 8
    assert _num_segments(64, 8, 8192, h100) == 1
    assert _num_segments(1, 8, MIN_SEGMENT_TOKENS - 1, h100) == 1


def test_prefill_only_batch_matches_reference():
    # No decode in the batch; chunks that start mid-block over a cached prefix.
    seqs = [(23, 23), (50, 7), (40, 2), (90, 33)]
    check_attention(seqs, block_size=8, num_heads=4, num_kv_heads=2, block_m=16, tile_n=32)


@pytest.mark.parametrize("window", [1, 4, 13])
def test_sliding_window_matches_reference(window):
    check_attention(MIXED, window=window, block_size=8, block_m=16, tile_n=16)


def test_single_token():
    check_attention([(1, 1)], num_heads=4, num_kv_heads=4)


def test_single_sequence_long_prefill_over_a_prefix():
    check_attention([(200, 40)], block_size=8, num_heads=4, num_kv_heads=1, head_dim=80)


def test_empty_batch_returns_an_empty_output():
    query = torch.empty(0, 4, 64, device=DEVICE)
    cache = torch.zeros(3, 16, 2, 64, device=DEVICE)
    tables = torch.empty(0, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.empty(0, dtype=torch.int32, device=DEVICE)
    starts = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = tk.paged_attention(query, cache, cache, tables, lens, starts, 0.125)
    assert out.shape == (0, 4, 64)


def test_strided_query_from_a_fused_qkv_projection():
    query, k_cache, v_cache, *rest = make_case(MIXED, head_dim=64)
    qkv = torch.randn(query.shape[0], 4 * 64 + 2 * 2 * 64, device=DEVICE)
    q = qkv[:, : 4 * 64].view(-1, 4, 64)  # rows strided by the whole qkv width
    q.copy_(query)
    got = tk.paged_attention(q, k_cache, v_cache, *rest, 0.125)
    want = tk.paged_attention(query, k_cache, v_cache, *rest, 0.125)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- store_kv and copy_blocks ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_store_kv_matches_reference_and_skips_padding(dtype):
    gen = torch.Generator().manual_seed(1)
    num_tokens, kv_heads, head_dim = 9, 3, 80
    qkv = torch.randn(num_tokens, 3 * kv_heads * head_dim, generator=gen).to(DEVICE, dtype)
    key = qkv[:, : kv_heads * head_dim].view(num_tokens, kv_heads, head_dim)  # strided rows
    value = qkv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(num_tokens, kv_heads, -1)
    slots = torch.tensor([13, -1, 2, 7, 40, -1, 0, 47, 21], device=DEVICE)  # 6 blocks of 8
    caches = [torch.randn(6, 8, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)]
    caches.append(torch.randn(caches[0].shape, generator=gen).to(DEVICE, dtype))
    want = [c.clone() for c in caches]
    tk.store_kv(key, value, *caches, slots)
    ref.store_kv(key, value, *want, slots)
    assert torch.equal(caches[0], want[0]) and torch.equal(caches[1], want[1])


def test_store_kv_then_attention_reads_back_what_was_stored():
    block_size, kv_heads, heads, head_dim, ctx = 8, 2, 4, 64, 19
    k_cache = torch.zeros(6, block_size, kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    table = [4, 1, 3]
    key = torch.randn(ctx, kv_heads, head_dim, device=DEVICE)
    value = torch.randn(ctx, kv_heads, head_dim, device=DEVICE)
    slots = [table[p // block_size] * block_size + p % block_size for p in range(ctx)]
    tk.store_kv(key, value, k_cache, v_cache, torch.tensor(slots, device=DEVICE))
    query = torch.randn(ctx, heads, head_dim, device=DEVICE)
    ints = dict(dtype=torch.int32, device=DEVICE)
    got = tk.paged_attention(
        query, k_cache, v_cache, torch.tensor([table], **ints), torch.tensor([ctx], **ints),
        torch.tensor([0, ctx], **ints), head_dim**-0.5, block_m=16,
    )  # fmt: skip
    want = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), key.repeat_interleave(2, 1).transpose(0, 1),
        value.repeat_interleave(2, 1).transpose(0, 1), is_causal=True,
    ).transpose(0, 1)  # fmt: skip
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_blocks_matches_reference_in_every_layer(dtype):
    gen = torch.Generator().manual_seed(2)
    shape = (7, 16, 2, 48)  # a block of 1536 elements: two chunks, the second partial
    layers = [[torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3)] for _ in "kv"]
    want = [[c.clone() for c in caches] for caches in layers]
    src, dst = torch.tensor([1, 4, 1], device=DEVICE), torch.tensor([5, 0, 6], device=DEVICE)
    tk.copy_blocks(*layers, src, dst)
    ref.copy_blocks(*want, src, dst)
    for got_caches, want_caches in zip(layers, want, strict=True):
        for got, expected in zip(got_caches, want_caches, strict=True):
            assert torch.equal(got, expected)


def test_copy_blocks_with_mismatched_layer_lists_is_refused():
    caches = [torch.zeros(2, 4, 1, 16, device=DEVICE)] * 2
    with pytest.raises(ValueError):
        tk.copy_blocks(caches, caches[:1], torch.tensor([0]), torch.tensor([1]))


# --- fused RMSNorm, rotary embedding, SiLU-and-mul ------------------------------------------

# Each rounds where its reference rounds; only reductions and exp may differ in the last bit.
# Except in the interpreter, whose float32 -> bfloat16 casts truncate (triton 3.9) where a GPU
# rounds to nearest: there bfloat16 results may be two units in the last place off.
FUSED_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=2**-5, rtol=2**-6) if tk.INTERPRETED else dict(atol=8e-3, rtol=8e-3),
}
EXACT_BUT_BF16_IN_INTERPRETER = {dt: dict(atol=0, rtol=0) for dt in FUSED_TOL}
EXACT_BUT_BF16_IN_INTERPRETER[torch.bfloat16] = FUSED_TOL[torch.bfloat16]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 100, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(100, generator=gen)).to(DEVICE, dtype)
    residual = torch.randn(7, 100, generator=gen).to(DEVICE, dtype) if with_residual else None
    got = tk.rms_norm(x, weight, 1e-5, residual)
    want = ref.rms_norm(x, weight, 1e-5, residual)
    if with_residual:  # the new residual: one rounded add, exact
        torch.testing.assert_close(got[1], want[1], **EXACT_BUT_BF16_IN_INTERPRETER[dtype])
        got, want = got[0], want[0]
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **FUSED_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (80, 20), (96, 96)])
def test_rotary_embedding_in_place_matches_reference(dtype, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(4)
    num_tokens, heads, kv_heads = 11, 4, 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = torch.arange(64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    positions = torch.randint(0, 64, (num_tokens,), generator=gen).to(DEVICE)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(
        DEVICE, dtype
    )
    want = qkv.clone()
    for buf, rotate in ((qkv, tk.rotary_embedding), (want, ref.rotary_embedding)):
        q, k, _ = buf.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
        rotate(positions, q.view(num_tokens, heads, -1), k.view(num_tokens, kv_heads, -1),
               cos, sin, rotary_dim)  # fmt: skip
    torch.testing.assert_close(qkv, want, **FUSED_TOL[dtype])  # v and the unrotated dims: untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(dtype):
    gen = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(2, 5, 2 * 1100, generator=gen)).to(DEVICE, dtype)  # two column tiles
    got, want = tk.silu_and_mul(x), ref.silu_and_mul(x)
    assert got.shape == (2, 5, 1100)
    torch.testing.assert_close(got, want, **FUSED_TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_engine_layers_compute_through_the_kernels(monkeypatch, backend):
    """RMSNorm, the rotary embedding and the gated SiLU of engine/layers.py are the kernels'
    ops: exactly the reference on the torch backend, within rounding on the CPU kernels."""
    from torch import nn

    from pagedserve.engine.layers import ActAndMul, RMSNorm, RotaryEmbedding

    monkeypatch.setenv(ops.ENV_VAR, backend)
    tol = {} if backend == "cpu" else dict(rtol=0, atol=0)
    gen = torch.Generator().manual_seed(7)
    norm = RMSNorm(48, 1e-6)
    norm.weight.data = torch.randn(48, generator=gen)
    x, residual = torch.randn(5, 48, generator=gen), torch.randn(5, 48, generator=gen)
    torch.testing.assert_close(norm(x), ref.rms_norm(x, norm.weight, 1e-6), **tol)
    for got, want in zip(
        norm(x, residual), ref.rms_norm(x, norm.weight, 1e-6, residual), strict=True
    ):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(ActAndMul(nn.SiLU())(x), ref.silu_and_mul(x), **tol)

    rotary = RotaryEmbedding(80, 40, 64, {"rope_theta": 10000.0})
    positions = torch.tensor([0, 5, 63, 7])
    q, k = torch.randn(4, 4, 80, generator=gen), torch.randn(4, 2, 80, generator=gen)
    want_q, want_k = q.clone(), k.clone()
    ref.rotary_embedding(positions, want_q, want_k, rotary.cos, rotary.sin, 40)
    got_q, got_k = rotary(positions, q, k)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(got_k, want_k, **tol)


# --- backend selection and the engine -------------------------------------------------------


def test_backend_is_cpu_on_cpu_triton_on_cuda_unless_forced(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.attention_backend("cpu") == "cpu"  # the C++ kernel builds here
    assert ops.attention_backend("cuda") == "triton"
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.attention_backend("cuda") == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    assert ops.attention_backend("cpu") == "triton"
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="torch"):
        ops.attention_backend("cpu")


def test_kernels_interface_dispatches_to_the_chosen_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(tk, "silu_and_mul", lambda x: calls.append("triton") or x)
    monkeypatch.setattr(ref, "silu_and_mul", lambda x: calls.append("torch") or x)
    x = torch.zeros(2, 4, device=DEVICE)
    for backend in ("triton", "torch"):
        monkeypatch.setenv(ops.ENV_VAR, backend)
        ops.silu_and_mul(x)
    assert calls == ["triton", "torch"]


def test_engine_greedy_and_copy_on_write_match_the_torch_backend(tiny_llama, monkeypatch):
    """The engine end to end on the Triton kernels (paged attention, store_kv, copy_blocks for
    the parallel samples' shared last block) gives the torch backend's tokens."""
    from pagedserve.engine.llm import LLM
    from pagedserve.engine.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(5, 1000, (n,), generator=gen).tolist() for n in (13, 4, 22)]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    sampled = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)

    def run(backend):
        monkeypatch.setenv(ops.ENV_VAR, backend)
        memory = {"gpu_memory_utilization": 0.2} if ON_GPU else {"kv_cache_memory": 1 << 20}
        llm = LLM(tiny_llama, max_model_len=64, block_size=8, device=DEVICE, dtype="float32",
                  **memory)  # fmt: skip
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        outs += llm.generate(prompts[:1], sampled, use_tqdm=False)
        return [[c.token_ids for c in o.outputs] for o in outs], llm.engine.stats().num_cow_copies

    (want, cow), (got, cow_triton) = run("torch"), run("triton")
    assert got == want
    assert cow_triton == cow > 0


# --- compiled for a real GPU, and on one ----------------------------------------------------


def test_every_kernel_compiles_for_sm90_without_a_gpu():
    """Triton's interpreter does not type-check like its compiler: compile each kernel
    configuration the engine and benchmark launch, down to a cubin, for an H100."""
    script = Path(__file__).with_name("triton_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(script), "--arch", "90", "--quick"], env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode == 3:  # no ptxas, which triton's Linux wheels bundle
        skip_or_fail_in_ci(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_batches_on_gpu(dtype):
    # The benchmark's shapes, smaller: decodes with and without split-KV, and long prefills.
    decodes = [(int(n), 1) for n in torch.randint(1, 3000, (24,))]
    check_attention(decodes, dtype=dtype, num_heads=32, num_kv_heads=8, head_dim=128)
    check_attention(decodes[:2], dtype=dtype, num_heads=32, num_kv_heads=8, head_dim=128)
    prefill = [(1500, 1500), (900, 300), (2000, 1), (77, 77)]
    check_attention(prefill, dtype=dtype, num_heads=32, num_kv_heads=8, head_dim=128)
    check_attention(prefill, dtype=dtype, window=512, num_heads=16, num_kv_heads=2, head_dim=80)


# the tests that test_kernels_in_a_fresh_process expects the fresh process to run
CHILD_TESTS = [
    n for n in globals() if n.startswith("test_") and n != "test_kernels_in_a_fresh_process"
]
if DELEGATED:  # the fresh process runs every test above; here each would only be one more skip
    for _name in CHILD_TESTS:
        del globals()[_name]
