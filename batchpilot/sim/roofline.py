"""Analytic step time from model shape and hardware spec (a roofline per step).

A step does the FLOPs of every scheduled token through the weights, attention over each
sequence's context, and the LM head for the sampled rows; it reads the weights once and the
KV cache of every context. Its time is the larger of compute time and memory time at the
stated efficiencies, divided over `tp` devices, plus two all-reduces per layer and a fixed
per-step overhead. Presets live in hardware.json and models.json beside this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from batchpilot.executors.simulated import StepShape

BYTES = 2  # bf16 weights and KV cache
GIB = 2**30


def _preset(file: str, name: str) -> dict:
    table = json.loads(resources.files("batchpilot.sim").joinpath(file).read_text())
    table.pop("_comment", None)
    if name not in table:
        raise ValueError(f"unknown preset {name!r} in {file} (choose from {', '.join(table)})")
    return table[name]


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_context: int
    tied_embeddings: bool = False

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        return cls(name=name, **_preset("models.json", name))

    @property
    def layer_params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + embeddings

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float
    mem_bw_gbs: float
    mem_gib: float
    compute_eff: float
    mem_eff: float
    link_bw_gbs: float
    step_overhead_ms: float

    @classmethod
    def preset(cls, name: str) -> Hardware:
        return cls(name=name, **_preset("hardware.json", name))


class RooflineModel:
    def __init__(self, model: ModelShape, hardware: Hardware, tp: int = 1, mem_util: float = 0.9):
        if tp < 1:
            raise ValueError(f"--tp must be at least 1, got {tp}")
        self.model, self.hw, self.tp, self.mem_util = model, hardware, tp, mem_util

    def kv_capacity_tokens(self, kv_cache_gib: float | None = None) -> int:
        """Tokens of KV cache that fit in the memory the weights leave (over all tp devices),
        or in `kv_cache_gib` when given."""
        if kv_cache_gib is not None:
            return int(kv_cache_gib * GIB // self.model.kv_bytes_per_token)
        free = self.hw.mem_gib * GIB * self.mem_util * self.tp - self.model.params * BYTES
        if free <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp} x {self.hw.name}")
        return int(free // self.model.kv_bytes_per_token)

    def step_time(self, step: StepShape) -> float:
        """Seconds for one step."""
        m = self.model
        tokens = step.num_tokens
        if tokens == 0:
            return 0.0
        # QK^T and PV over each context (causal within the chunk: about half of the new-token block)
        attended = step.decode_context - step.num_decodes / 2 + sum(n * (ctx - n / 2) for n, ctx in step.prefills)
        flops = (2 * m.layers * m.layer_params * tokens + 2 * m.vocab * m.hidden * step.num_sampled
                 + 4 * m.layers * m.heads * m.head_dim * attended)
        kv_read = (step.decode_context + sum(ctx for _, ctx in step.prefills)) * m.kv_bytes_per_token
        weight_bytes = m.params * BYTES
        compute = flops / (self.hw.peak_tflops * 1e12 * self.hw.compute_eff * self.tp)
        memory = (weight_bytes + kv_read) / (self.hw.mem_bw_gbs * 1e9 * self.hw.mem_eff * self.tp)
        allreduce = 0.0
        if self.tp > 1:  # ring all-reduce of the activations, twice per layer
            volume = 2 * (self.tp - 1) / self.tp * tokens * m.hidden * BYTES
            allreduce = 2 * m.layers * volume / (self.hw.link_bw_gbs * 1e9)
        return max(compute, memory) + allreduce + self.hw.step_overhead_ms / 1000
