"""Llama-family forward pass (Llama 1/2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Our own code, in the shape of gpt-fast: plain tensors, projections fused at load time
(QKV into one matmul, gate and up into another) so a layer is five matmuls and the
attention. The KV cache is owned by the caller; the model only reads and writes slots.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchpilot.model import kernels, quant
from batchpilot.model.args import ModelArgs
from batchpilot.model.attention import AttentionMetadata, paged_attention
from batchpilot.model.hugepages import HugePageArena, return_freed_memory
from batchpilot.model.linear import Linear, pack_all


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [(H + 2 * KVH) * D, hidden], bias [(H + 2 * KVH) * D] (Qwen2 only)
    o: Linear  # [hidden, H * D]
    ffn_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama-3 frequency-dependent scaling when configured."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if not s:
        return inv_freq.float()
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(medium, blended, scaled).float()


class DecodeBuffers:
    """The tensors a decode_layers step writes (the residual stream, the normed rows, the kernels' scratch, the
    logits and their argmax), made once for the most rows seen and viewed per row count: a step's allocations,
    from the caches the weights' stream left cold, cost ~15 us each (docs/reproduction.md). The logits and
    argmax a step returns are these buffers: valid until the model's next decode step."""

    def __init__(self, hidden: int, scratch_per_row: int, vocab: int, dtype: torch.dtype,
                 logits_dtype: torch.dtype):
        self.hidden, self.scratch_per_row, self.vocab = hidden, scratch_per_row, vocab
        self.dtype, self.logits_dtype = dtype, logits_dtype
        self.capacity = 0
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}

    def rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, hidden], y [n, hidden], scratch [n * scratch_per_row], logits [n, vocab], argmax [n]."""
        views = self._views.get(n)
        if views is None:
            if n > self.capacity:  # grown geometrically, so a batch that grows a row a step allocates rarely
                self.capacity = max(n, 2 * self.capacity)
                c = self.capacity
                with torch.inference_mode(False):  # usable in and out of inference mode
                    self._x = torch.empty(c, self.hidden, dtype=self.dtype)
                    self._y = torch.empty(c, self.hidden, dtype=self.dtype)
                    self._scratch = torch.empty(c * self.scratch_per_row, dtype=self.dtype)
                    self._logits = torch.empty(c, self.vocab, dtype=self.logits_dtype)
                    self._argmax = torch.empty(c, dtype=torch.long)
                self._views.clear()
            views = self._views[n] = (self._x[:n], self._y[:n], self._scratch[: n * self.scratch_per_row],
                                      self._logits[:n], self._argmax[:n])
        return views


class LlamaModel:
    """Weights of one model in one dtype, and the forward pass over a paged KV cache."""

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 quantization: str | None = None):
        self.args = args
        self.dtype = dtype
        self.quantization = quantization  # quant.QUANTIZATIONS: the layers' weights (lm_head int8), weight-only
        # the copies a decode step streams, on huge pages, one stream per thread (kernels.GemvTiles); each
        # moved as it is made, so its temporary is freed (and reused by the next) before another is built:
        # a 7B load's peak stays one layer's copies
        streams = [HugePageArena() for _ in range(torch.get_num_threads())]

        def w(name: str) -> torch.Tensor:
            return weights[name].to(dtype).contiguous()

        def linear(*names: str, bias: torch.Tensor | None = None, mode: str | None = quantization,
                   int8_group: int = 0) -> Linear:
            """One Linear of the named weights stacked; quantized straight from the checkpoint's values
            (float32), so a GGUF's Q4_1 blocks come back as they were, not after a bf16 rounding."""
            if mode is None:
                return Linear(torch.cat([w(n) for n in names]), bias)
            read_blocks = getattr(weights, f"{mode}_blocks", None)  # a GGUF's Q4_0 / Q4_1 (int4) or Q8_0 (int8)
            blocks = [read_blocks(n) for n in names] if read_blocks else []
            if blocks and all(b is not None for b in blocks):  # the file's own blocks, run as they are
                arrays = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*blocks)]
                del blocks  # the parts, before the tiles are made: a 7B load's peak is one layer's copies
                from_blocks = quant.int4_from_blocks if mode == "int4" else quant.int8_from_blocks
                layer = Linear.from_quantized(from_blocks(*arrays, dtype), bias)
            else:
                parts = [weights[n].float() for n in names]
                layer = Linear(parts[0] if len(parts) == 1 else torch.cat(parts), bias)
                del parts
                layer.quantize(mode, dtype, int8_group)
            layer.move_streamed(streams)
            return_freed_memory()
            return layer

        blocks = weights.int4_blocks("model.embed_tokens.weight") \
            if quantization == "int4" and hasattr(weights, "int4_blocks") else None
        # a GGUF's Q4 embedding stays in its blocks under int4, rows expanded at lookup; else a float table
        self.embed: torch.Tensor | quant.Int4Rows = quant.Int4Rows.from_blocks(*blocks, dtype) if blocks \
            else w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        if quantization is not None:  # lm_head in int8 under either mode, as llama.cpp's Q4 files keep their output
            # matrix at 8 bits: at one sequence its bf16 read was a fifth of an int4 step (docs/reproduction.md).
            # Scales per 32 inputs (Q8_0's, or the file's own Q8_0 blocks): per output, it cost most of int8's
            # perplexity. Built first: its float32 copy (0.8 GB for a 49k x 4096 head) rises over little.
            self.lm_head = linear("model.embed_tokens.weight" if args.tie_word_embeddings else "lm_head.weight",
                                  mode="int8", int8_group=quant.Q8_GROUP)
        self.layers = []
        for i in range(args.num_layers):  # layer by layer: a quantized model's float weights never all in memory
            p = f"model.layers.{i}."
            bias = None
            if args.qkv_bias:
                bias = torch.cat([w(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            self.layers.append(
                LayerWeights(
                    attn_norm=w(p + "input_layernorm.weight"),
                    qkv=linear(*(p + f"self_attn.{x}_proj.weight" for x in "qkv"), bias=bias),
                    o=linear(p + "self_attn.o_proj.weight"),
                    ffn_norm=w(p + "post_attention_layernorm.weight"),
                    gate_up=linear(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    down=linear(p + "mlp.down_proj.weight"),
                )
            )
        if quantization is None:
            self.lm_head = Linear(self.embed if args.tie_word_embeddings else w("lm_head.weight"))
            self.lm_head.float_out = True  # float32 logits where the GEMV computes them: no ties made by rounding
            # in the order a step reads them: the layers, then the lm_head
            pack_all([lin for ly in self.layers for lin in self._linears(ly)] + [self.lm_head], streams)
            return_freed_memory()
        inv_freq = rope_inv_freq(args)
        angles = torch.outer(torch.arange(args.max_position_embeddings, dtype=torch.float32), inv_freq)
        self.rope_cos = angles.cos()  # [max_pos, D/2]
        self.rope_sin = angles.sin()
        # The fused element-wise kernels (kernels.py), or the torch code they reproduce.
        self.fused = kernels.layer_ops_supports(dtype)
        self.decode_weights, self.decode_formats, self.decode_max_rows = self._decode_layers_weights()
        head = self.lm_head
        self.decode_buffers = DecodeBuffers(
            args.hidden_size, kernels.decode_scratch_elements(1, args.hidden_size, args.num_heads, args.num_kv_heads,
                                                              args.head_dim, args.intermediate_size),
            head.gemv.n if head.gemv is not None else 0, dtype, torch.float32 if head.float_out else dtype)

    def _decode_layers_weights(self):
        """kernels.decode_layers' per-layer pointers and formats, and the most rows it takes; None, None, 0
        where some projection does not run a native few-row kernel or has a bias beyond QKV's."""
        projections = [self._linears(layer) for layer in self.layers]
        operands = [[lin.kernel_operands() for lin in lins] for lins in projections]
        if not (self.fused and self.dtype == torch.bfloat16 and kernels.decode_layers_available()) or any(
                ops is None for layer_ops in operands for ops in layer_ops) or any(
                lin.bias is not None for lins in projections for lin in lins[1:]):
            return None, None, 0
        pointers, formats = [], []
        for layer, layer_ops, next_norm in zip(self.layers, operands, self._next_norms()):
            for (weight, scales, lows, bits, group, parts), _ in layer_ops:
                pointers += [weight, scales, lows]
                formats += [bits, group, parts]
            pointers += [layer.qkv.bias, layer.ffn_norm, next_norm]
        rows = min(max_rows for layer_ops in operands for _, max_rows in layer_ops)
        return kernels.pointers(pointers), (ctypes.c_int64 * len(formats))(*formats), rows

    def _next_norms(self) -> list[torch.Tensor]:
        """The norm after each layer: the next layer's input norm, the final norm after the last."""
        return [layer.attn_norm for layer in self.layers[1:]] + [self.norm]

    @staticmethod
    def _linears(layer: LayerWeights) -> tuple[Linear, ...]:
        return layer.qkv, layer.o, layer.gate_up, layer.down

    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: ([S, KVH, D], [S, KVH, D])
        meta: AttentionMetadata,
        logits_rows: torch.Tensor | None,  # [R] rows whose next-token logits are wanted; None: every row, in order
    ) -> torch.Tensor:
        """Run the batch through the model; returns logits [R, vocab] in the model's dtype, or float32 where
        the lm_head's GEMV computed them (the sampler converts to float32 only what needs it: a greedy
        batch takes its argmax from bf16 directly)."""
        if self.fused:
            return self._forward_fused(token_ids, positions, kv_caches, meta, logits_rows, None)[0]
        a = self.args
        t = token_ids.shape[0]
        h, kvh, d = a.num_heads, a.num_kv_heads, a.head_dim
        cos = self.rope_cos[positions].to(self.dtype).unsqueeze(1)  # [T, 1, D/2]
        sin = self.rope_sin[positions].to(self.dtype).unsqueeze(1)
        scale = 1.0 / math.sqrt(d)
        x = self.embed[token_ids]  # [T, hidden]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            y = _rms_norm(x, layer.attn_norm, a.rms_norm_eps)
            qkv = layer.qkv(y)
            q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
            q = _rope(q.view(t, h, d), cos, sin)
            k = _rope(k.view(t, kvh, d), cos, sin)
            o = paged_attention(q, k, v.view(t, kvh, d), k_cache, v_cache, meta, scale)
            x = x + layer.o(o.view(t, h * d))
            y = _rms_norm(x, layer.ffn_norm, a.rms_norm_eps)
            gate, up = layer.gate_up(y).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = _rms_norm(x if logits_rows is None else x[logits_rows], self.norm, a.rms_norm_eps)
        return self.lm_head(x)

    def forward_greedy(self, token_ids: torch.Tensor, positions: torch.Tensor,
                       kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                       meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward() of every row, for a step that samples each greedily: the logits, and each row's argmax
        where the step's one native call computed it too (None: the sampler takes it). Inside that call the
        scan reads the logits from the threads' caches, with no Python after the weights' stream."""
        if not self.fused:
            return self.forward(token_ids, positions, kv_caches, meta, None), None
        return self._forward_fused(token_ids, positions, kv_caches, meta, None, greedy=True)

    def _forward_fused(self, token_ids, positions, kv_caches, meta, logits_rows,
                       greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward() with its element-wise steps fused: ~12 calls a layer instead of ~45. Where the lm_head runs
        inside a decode step's native call, greedy asks for the logits' argmax there too; returns the logits and
        the argmax where it was computed, else None."""
        a = self.args
        t = token_ids.shape[0]
        h, kvh, d = a.num_heads, a.num_kv_heads, a.head_dim
        scale = 1.0 / math.sqrt(d)
        if (self.decode_weights is not None and t <= self.decode_max_rows and meta.native and not meta.prefills
                and meta.num_decodes == t):  # every layer in one native call: the same kernels, in order
            return self._decode_step(token_ids, positions, kv_caches, meta, logits_rows, greedy)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [T, D/2] float32
        x = self.embed[token_ids]  # [T, hidden], the residual stream, updated in place
        y = torch.empty_like(x)  # the normed input of the next projection
        kernels.add_rms_norm(x, None, self.layers[0].attn_norm, y, a.rms_norm_eps)
        for layer, (k_cache, v_cache), next_norm in zip(self.layers, kv_caches, self._next_norms()):
            qkv = layer.qkv(y)
            kernels.rope_in_place(qkv, cos, sin, h + kvh, d)
            q = qkv[:, : h * d].view(t, h, d)
            k = qkv[:, h * d : (h + kvh) * d].view(t, kvh, d)
            v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
            o = paged_attention(q, k, v, k_cache, v_cache, meta, scale)
            kernels.add_rms_norm(x, layer.o(o.view(t, h * d)), layer.ffn_norm, y, a.rms_norm_eps)
            kernels.add_rms_norm(x, layer.down(kernels.silu_mul(layer.gate_up(y))), next_norm, y, a.rms_norm_eps)
        return self.lm_head(y if logits_rows is None else y[logits_rows]), None

    def _decode_step(self, token_ids, positions, kv_caches, meta, logits_rows,
                     greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A decode-only step in one native call (kernels.decode_layers) on the model's DecodeBuffers: the
        embedding rows and the rotary angles are looked up in the call, the lm_head runs in it where its bf16
        tiles take these rows and every row wants logits, and with greedy the argmax too."""
        a = self.args
        t = token_ids.shape[0]
        x, y, scratch, logits, argmax = self.decode_buffers.rows(t)
        lm = self.lm_head
        head = lm.gemv_for(t) if logits_rows is None and lm.bias is None else None
        embed = self.embed if isinstance(self.embed, torch.Tensor) else None
        if embed is None:  # a quantized table expands its rows in Python
            x.copy_(self.embed[token_ids])
        kernels.decode_layers(x, y, scratch, embed, token_ids, self.decode_weights, self.decode_formats,
                              meta.cache_pointers if meta.cache_pointers is not None
                              else kernels.cache_pointers(kv_caches),
                              a.num_layers, self.rope_cos, self.rope_sin, positions, meta.slot_mapping,
                              meta.decode_tables, meta.decode_lens, meta.block_size, kv_caches[0][0].shape[1],
                              a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size, a.rms_norm_eps,
                              1.0 / math.sqrt(a.head_dim), self.layers[0].attn_norm, head,
                              None if head is None else logits, argmax if head is not None and greedy else None)
        if head is not None:
            return logits, argmax if greedy else None
        return self.lm_head(y if logits_rows is None else y[logits_rows]), None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2), the Hugging Face layout. x: [T, heads, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the statistics in float32 (bf16 sums of squares lose the answer)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * normed.to(x.dtype)
