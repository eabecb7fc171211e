"""Engine configuration: plain dataclasses, validated where they are made."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16")


@dataclass
class CacheConfig:
    """Size of the paged KV cache."""

    block_size: int = 16
    kv_cache_gib: float | None = None  # None: derived from free memory
    num_blocks: int | None = None  # exact block count, overrides kv_cache_gib (tests)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"--block-size must be at least 1, got {self.block_size}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ValueError(f"--kv-cache-gib must be positive, got {self.kv_cache_gib}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {self.num_blocks}")


@dataclass
class SchedulerConfig:
    """Per-step budget. The context cap is the smaller of this and the model's own."""

    max_num_batched_tokens: int = 512
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {self.max_model_len}")


@dataclass
class ControllerConfig:
    """Which batch-size policy runs, and its bounds."""

    name: str = "static"
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")


@dataclass
class EngineConfig:
    """Everything one engine needs; `model=None` is the default model."""

    model: str | None = None
    dtype: str = "bfloat16"
    threads: int | None = None  # torch threads; None: all cores
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
