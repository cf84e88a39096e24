"""The engine's CPU memory: tensors on huge pages, and the KV cache and packed weights on them."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

from pagedserve.engine.cpu_memory import on_huge_pages, zeros_on_huge_pages

HUGE_PAGE = 2 << 20
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            inside = int(span[1], 16) <= address < int(span[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_zeros_on_huge_pages_is_a_writable_zeroed_tensor_that_outlives_its_buffer():
    t = zeros_on_huge_pages((3, 1000, 700), torch.float32)
    assert t.shape == (3, 1000, 700) and t.dtype == torch.float32
    assert t.data_ptr() % HUGE_PAGE == 0
    assert not t.any()
    t[1, 2, 3] = 5.0
    view = t[1]
    del t
    gc.collect()  # the mapping lives as long as a tensor on it
    assert view[2, 3] == 5.0 and view.sum() == 5.0


def test_on_huge_pages_copies():
    x = torch.randn(600, 1100, dtype=torch.bfloat16)
    y = on_huge_pages(x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
    assert zeros_on_huge_pages((0, 4), torch.float32).shape == (0, 4)


def test_engine_keeps_its_kv_cache_and_packed_weights_on_huge_pages(engine):
    runner = engine.core.runner
    for cache in runner.k_caches + runner.v_caches:
        assert cache.data_ptr() % HUGE_PAGE == 0
    packed = [getattr(m, "packed", None) for m in runner.model.modules()]
    packed = [p.data for p in packed if hasattr(p, "data")]  # the CPU kernels' float32 packing
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert packed
    for data in packed:
        assert data.data_ptr() % HUGE_PAGE == 0
    if THP.exists() and "[never]" not in THP.read_text():
        assert huge_page_kib(runner.k_caches[0].data_ptr()) >= 2048
