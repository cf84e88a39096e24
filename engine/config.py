"""Engine configuration: one dataclass, validated on creation, filled from CLI flags."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes of KV cache on CPU; default 1 GiB
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # default: 2048 on CPU, 8192 on CUDA
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1  # ranks to split the model over; > 1 runs them on Ray
    ray_address: str | None = None  # join this Ray cluster; default: start a local one
    distributed_timeout: float = 60.0  # seconds any collective between ranks may wait
    # Threads each rank's CPU matmuls use; default: torch's (one per core). Several workers
    # (or ranks) on one machine should split the cores: oversubscribed OpenMP threads spin
    # against each other and can run several times slower than one thread each.
    cpu_threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        if self.block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(
                f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if isinstance(self.tensor_parallel_size, bool) or not isinstance(
            self.tensor_parallel_size, int
        ):
            raise ValueError(
                f"tensor_parallel_size must be an integer, got {self.tensor_parallel_size!r}"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}"
            )
        if self.cpu_threads is not None and (
            isinstance(self.cpu_threads, bool)
            or not isinstance(self.cpu_threads, int)
            or self.cpu_threads < 1
        ):
            raise ValueError(f"cpu_threads must be a positive integer, got {self.cpu_threads!r}")
        if self.ray_address is not None and not str(self.ray_address).strip():
            raise ValueError("ray_address is empty; leave it out to start a local Ray")
        if not self.distributed_timeout > 0:
            raise ValueError(
                f"distributed_timeout must be a positive number of seconds, got {self.distributed_timeout}"
            )

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, model_dtype: torch.dtype | None) -> torch.dtype:
        """float32 on CPU unless asked otherwise; the checkpoint's half dtype on CUDA."""
        if self.dtype != "auto":
            dtype = _DTYPES[self.dtype]
            if dtype == torch.float16 and self.torch_device.type == "cpu":
                raise ValueError(
                    "float16 is only supported on CUDA; use bfloat16 or float32 on CPU"
                )
            return dtype
        if self.torch_device.type == "cuda":
            return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        return torch.float32

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_memory if self.kv_cache_memory is not None else 1 << 30

    @property
    def batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.torch_device.type == "cuda" else 2048
