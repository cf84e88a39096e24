"""Compile the Triton kernels for an NVIDIA GPU on a machine without one.

Triton's interpreter runs the kernels on CPU tensors but checks neither types nor layouts as its
compiler does, so a kernel that passes every interpreted test may still fail to compile. This
script calls the public kernel functions with CPU tensors, the way the engine and the benchmark
do, with a stand-in driver that targets `--arch`: each launch is compiled down to a cubin (with
triton's bundled ptxas) instead of run, and its registers, spills and shared memory are printed.

    python tests/triton_compile.py --arch 90 [--quick]

Exit status: 0 all compiled, 1 a kernel failed to compile, 3 nothing to compile with (no triton
or no ptxas), with the reason on the last line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from itertools import product

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 80 or 90")
    parser.add_argument("--quick", action="store_true", help="a few configurations, not all")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing")
        return 3
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError as err:
        print(f"triton is not installed ({err})")
        return 3

    if not hasattr(JITFunction, "_do_compile") or not hasattr(driver, "set_active"):
        print(f"triton {triton.__version__} lacks the hooks this script compiles through")
        return 3
    from triton import knobs

    try:  # the ptxas triton compiles this architecture with (bundled with its Linux wheels)
        ptxas = (knobs.nvidia.ptxas if args.arch < 90 else knobs.nvidia.ptxas_blackwell).path
    except (AttributeError, RuntimeError) as err:
        print(f"no ptxas for sm_{args.arch} ({err})")
        return 3
    print(f"compiling for sm_{args.arch} with {ptxas}")
    target = GPUTarget("cuda", args.arch, 32)

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

    driver.set_active(CompileOnlyDriver())
    results: list[tuple[str, str, object]] = []
    labels = [""]

    def compile_instead_of_launch(self, key, signature, device, constexprs, options, attrs, warmup):
        src = self.ASTSource(self, signature, constexprs, attrs)
        kernel = triton.compile(src, target=target, options=options.__dict__)
        results.append((self.__name__, labels[0], kernel))
        return None  # JITFunction.run launches nothing without a kernel

    JITFunction._do_compile = compile_instead_of_launch
    modules = ["store_kv", "copy_blocks", "paged_attention", "rms_norm", "rotary", "silu_and_mul"]
    kernels = {m: importlib.import_module(f"pagedserve.kernels.triton.{m}") for m in modules}
    for module in kernels.values():  # CPU tensors are this script's stand-ins for CUDA ones
        module.check_device = lambda *tensors: None

    failures = 0
    start = time.perf_counter()
    for label, launch in configurations(kernels, args.quick):
        labels[0] = label
        try:
            launch()
        except Exception as err:  # report every configuration, then fail
            failures += 1
            print(f"FAILED {label}: {type(err).__name__}: {str(err)[:2000]}")
    print(f"{'kernel':<26} {'configuration':<58} regs  spill  shared")
    for name, label, kernel in results:
        regs, spill = resource_usage(kernel)
        print(f"{name:<26} {label:<58} {regs:>4}  {spill:>5}  {kernel.metadata.shared:>6}")
    print(f"{len(results)} kernels compiled for sm_{args.arch} in {time.perf_counter() - start:.0f} s, "
          f"{failures} configurations failed")  # fmt: skip
    return 1 if failures else 0


def resource_usage(kernel) -> tuple[str, str]:
    """Registers and local-memory (spill) bytes per thread, as cuobjdump reads the cubin."""
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except (AttributeError, RuntimeError):
        return "?", "?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (regs.group(1) if regs else "?"), (local.group(1) if local else "?")


def configurations(kernels, quick: bool):
    """(label, launch) pairs: the public functions called with stand-in CPU tensors."""
    attention = kernels["paged_attention"].paged_attention

    def attend(dtype, head_dim, group, block_size, kind, window, kv_heads=8):
        seqs = {"decode": 4, "split": 2, "prefill": 3}[kind]
        tokens = seqs if kind != "prefill" else 300
        q = torch.zeros(tokens, kv_heads * group, head_dim, dtype=dtype)
        cache = torch.zeros(64, block_size, kv_heads, head_dim, dtype=dtype)
        tables = torch.zeros(seqs, 8, dtype=torch.int32)
        lens = torch.ones(seqs, dtype=torch.int32)
        starts = torch.arange(seqs + 1, dtype=torch.int32)
        split = {"num_segments": 4} if kind == "split" else {}
        return lambda: attention(q, cache, cache, tables, lens, starts, 0.1, window, **split)

    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    if quick:  # the benchmark's shapes, and each odd case once
        cases = [
            (torch.bfloat16, 128, 4, 16, "decode", None),
            (torch.bfloat16, 128, 4, 16, "split", None),
            (torch.bfloat16, 128, 4, 16, "prefill", None),
            (torch.float16, 80, 8, 8, "prefill", 512),
            (torch.float32, 64, 1, 32, "decode", 512),
            (torch.float32, 128, 1, 16, "prefill", None),
            (torch.float16, 96, 2, 32, "split", 100),
        ]
    else:
        cases = product(dtypes, [64, 80, 96, 128], [1, 2, 4, 8], [8, 16, 32],
                        ["decode", "split", "prefill"], [None, 512])  # fmt: skip
    for dtype, head_dim, group, block_size, kind, window in cases:
        name = str(dtype).removeprefix("torch.")
        label = f"{kind} {name} d{head_dim} gqa{group} bs{block_size} window={window}"
        yield label, attend(dtype, head_dim, group, block_size, kind, window)

    for dtype in dtypes[:1] if quick else dtypes:
        name = str(dtype).removeprefix("torch.")
        x = torch.zeros(5, 4096, dtype=dtype)
        w = torch.zeros(4096, dtype=dtype)
        yield f"rms_norm {name}", lambda x=x, w=w: kernels["rms_norm"].rms_norm(x, w, 1e-6, x)
        yield (
            f"rms_norm {name} no residual",
            lambda x=x, w=w: kernels["rms_norm"].rms_norm(x, w, 1e-6),
        )
        yield f"silu_and_mul {name}", lambda x=x: kernels["silu_and_mul"].silu_and_mul(x)
        kv = torch.zeros(5, 8, 128, dtype=dtype)
        cache = torch.zeros(4, 16, 8, 128, dtype=dtype)
        slots = torch.zeros(5, dtype=torch.long)
        yield (
            f"store_kv {name}",
            lambda kv=kv, c=cache, s=slots: kernels["store_kv"].store_kv(kv, kv, c, c, s),
        )
        src = torch.tensor([0])
        yield (
            f"copy_blocks {name}",
            lambda c=cache, s=src: kernels["copy_blocks"].copy_blocks([c], [c], s, s + 1),
        )
        q, k = torch.zeros(5, 32, 128, dtype=dtype), torch.zeros(5, 8, 128, dtype=dtype)
        cos = torch.zeros(64, 32)
        pos = torch.zeros(5, dtype=torch.long)
        yield f"rotary {name} rotary_dim=32", lambda q=q, k=k, c=cos, p=pos: kernels["rotary"].rotary_embedding(p, q, k, c, c, 32)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
