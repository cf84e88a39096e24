"""Engine configuration: one dataclass, validated on creation, filled from CLI flags.

Each field says what it means once, in its `help`; `pagedserve worker` builds one flag per
field from it (named by `flag`), so a new field is a new flag with the same default. Torch is
imported only by the methods that need it: the CLI reads these fields without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")  # kernels/ops.py's, and auto


def _setting(default: Any, help: str, none_means: str | None = None) -> Any:
    """A field with its help text; `none_means` says what a None default stands for."""
    return field(default=default, metadata={"help": help, "none_means": none_means})


@dataclass
class EngineConfig:
    model: str = field(metadata={"help": "Model folder (Hugging Face layout) or GGUF file."})
    tokenizer: str | None = _setting(None, "Tokenizer folder.", none_means="the model's own")
    dtype: str = _setting(
        "auto",
        "auto (float32 on a CPU, the checkpoint's half type on CUDA), float32, bfloat16 "
        "or float16 (CUDA only).",
    )
    device: str = _setting("auto", "auto (CUDA when there is one), cpu or cuda.")
    attention_backend: str = _setting(
        "auto",
        "Kernels for attention, norms and activations, chosen once at start: auto "
        "(PAGEDSERVE_ATTENTION_BACKEND if set, else triton on CUDA when installed, the C++ "
        "kernels on a CPU when they build, else torch), torch (the PyTorch reference), cpu "
        "or triton.",
    )
    max_model_len: int | None = _setting(None, "Longest sequence.", none_means="the model's")
    block_size: int = _setting(16, "Tokens per KV-cache block: 8, 16 or 32.")
    kv_cache_memory: int | None = _setting(
        None,
        "Bytes of KV cache on a CPU (on CUDA: --gpu-memory-utilization).",
        none_means="1 GiB",
    )
    gpu_memory_utilization: float = _setting(
        0.9, "Share of a GPU's memory the model, activations and KV cache may fill, in (0, 1]."
    )
    max_num_seqs: int = _setting(256, "Most sequences in one step.")
    max_num_batched_tokens: int | None = _setting(
        None, "Most tokens in one step.", none_means="2048 on a CPU, 8192 on CUDA"
    )
    enable_chunked_prefill: bool = _setting(
        True, "Split long prompts over several steps, beside the running decodes."
    )
    enable_prefix_caching: bool = _setting(
        True, "Reuse the KV blocks of a prompt prefix already cached."
    )
    tensor_parallel_size: int = _setting(
        1, "Ranks to split the model over; more than 1 runs them as Ray actors."
    )
    ray_address: str | None = _setting(
        None,
        "Ray cluster the ranks join when --tensor-parallel-size > 1.",
        none_means="start a local Ray",
    )
    distributed_timeout: float = _setting(
        60.0, "Seconds any collective between ranks may wait before the engine fails."
    )
    # Oversubscribed OpenMP threads spin against each other and can run several times slower
    # than one thread each, hence the advice to split the cores.
    cpu_threads: int | None = _setting(
        None,
        "Threads each rank's CPU matmuls use; split the cores between the workers (and "
        "ranks) of one machine.",
        none_means="torch's, one per core",
    )
    seed: int = _setting(0, "Seed of the engine's random sampling.")

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                f"got {self.attention_backend!r}"
            )
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
                "distributed_timeout must be a positive number of seconds, "
                f"got {self.distributed_timeout}"
            )

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, model_dtype: torch.dtype | None) -> torch.dtype:
        """float32 on CPU unless asked otherwise; the checkpoint's half dtype on CUDA."""
        import torch

        if self.dtype != "auto":
            dtype = getattr(torch, self.dtype)
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
    def kv_cache_flag(self) -> str:
        """The flag that sizes the KV cache on this config's device, for messages."""
        cuda = self.torch_device.type == "cuda"
        return flag("gpu_memory_utilization" if cuda else "kv_cache_memory")

    @property
    def batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 8192 if self.torch_device.type == "cuda" else 2048


def flag(name: str) -> str:
    """The command-line flag of an EngineConfig field: max_model_len -> --max-model-len."""
    if name not in {f.name for f in fields(EngineConfig)}:
        raise ValueError(f"EngineConfig has no field {name!r}")
    return "--" + name.replace("_", "-")
