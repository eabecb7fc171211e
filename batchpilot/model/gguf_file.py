"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: config, dequantised weights, tokenizer.

GGUF stores the tokenizer as metadata (tokens, merges, token types) and the weights under
llama.cpp names, with the Q and K projections permuted for its rotary layout. We undo both
so that the rest of batchpilot sees exactly what a Hugging Face folder holds.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED.
_CONTROL, _USER_DEFINED = 3, 4

# How a byte-level BPE vocabulary splits text before merging, by `tokenizer.ggml.pre`: the split its
# merges were learned on (the model's own tokenizer.json; llama.cpp and transformers' GGUF loader
# use the same). A name not listed here is refused: a wrong split gives silently wrong tokens.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"gpt2", "default"}  # ByteLevel's own (GPT-2) split
_SINGLE_DIGIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}  # + digits
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
SUPPORTED_PRE_TOKENIZERS = sorted(_GPT2_PRE | _SINGLE_DIGIT_PRE | set(_SPLIT_PRE))

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_PAIR_ROWS = 1024  # rows of 4-bit blocks re-paired at a time (int4_blocks)
# Bytes per block of 32 weights: an f16 scale (and an f16 minimum for Q4_1), then 16 bytes of nibbles.
_Q4_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    return f"{_TOP_NAMES[stem]}.{suffix}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's convert-time permutation of Q/K rows (interleaved -> halves rotary)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader: GGUFReader) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2)")

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_heads = get("attention.head_count")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": get("vocab_size", vocab),
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", num_heads),
        "head_dim": get("rope.dimension_count", get("embedding_length") // num_heads),
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get("rope.freq_base", 10000.0),
        "tie_word_embeddings": not has_output,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    return config


class GGUFWeights(Mapping[str, torch.Tensor]):
    """The file's tensors under their Hugging Face names, each dequantised to float32 when read.

    NOTE: lazy on purpose. The model converts each tensor to its dtype as it takes it, so a
    loader holds one float32 tensor at a time, not the whole model (a 7B Q4 file would need
    28 GB in float32); the file itself is memory-mapped by GGUFReader.
    """

    def __init__(self, reader: GGUFReader, config: dict[str, Any]):
        self._tensors = {_hf_name(t.name): t for t in reader.tensors}
        self._file = getattr(reader.data, "_mmap", None)  # the file's mapping, to drop pages already read
        self._heads = {}  # projection -> heads, for the weights llama.cpp permuted for its rotary layout
        if config["model_type"] == "llama":
            self._heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        module, _, kind = name.rpartition(".")
        heads = self._heads.get(module.rpartition(".")[2]) if kind == "weight" else None
        if heads is not None:
            data = _unpermute(data, heads)
        data = np.ascontiguousarray(data)
        if not data.flags.writeable:  # an unquantised tensor is a view of the read-only file mapping
            data = data.copy()
        self._release(t)
        return torch.from_numpy(data)

    def _release(self, t) -> None:
        """Drop the mapped pages of a tensor that has been copied out. Pages of the file a process has
        read count in its resident set until unmapped, so a loader that reads the whole file held
        the file and the model built from it at once (a 7B Q4 file: 3.6 GB on top of the weights,
        docs/reproduction.md). Reading the tensor again faults its pages back in from the file."""
        if self._file is None:
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        self._file.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)

    def int4_blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A Q4_0 or Q4_1 weight's own 4-bit blocks, for --quantization int4 to run as they are: the
        integers in 0..15 as nibble pairs ([N, K / 2] bytes, quant.pack_pairs' order), scale and low
        [N, K / 32] (value = q * scale + low, exactly what the file's dequantization gives); None for
        any other type. Re-paired a band of rows at a time, never a byte a weight: on a 7B file's FFN
        that temporary was the load's peak (docs/reproduction.md)."""
        t = self._tensors[name]
        kind = GGMLQuantizationType(t.tensor_type)
        if kind not in _Q4_BLOCK_BYTES:
            return None
        size = _Q4_BLOCK_BYTES[kind]
        rows = int(t.shape[1])
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(rows, -1, size)
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == GGMLQuantizationType.Q4_0:  # value = d * (q - 8)
            low, nibbles = -8 * scale, blocks[..., 2:]
        else:  # Q4_1: value = d * q + m
            low, nibbles = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32), blocks[..., 4:]
        # a block's byte i holds element i low and element i + 16 high; pairs hold 2j low and 2j + 1 high
        pairs = np.empty((rows, nibbles.shape[1], 16), dtype=np.uint8)
        for r in range(0, rows, _PAIR_ROWS):
            band = nibbles[r:r + _PAIR_ROWS]
            first, second = band & 0xF, band >> 4  # elements 0-15, 16-31
            pairs[r:r + _PAIR_ROWS, :, :8] = first[..., 0::2] | (first[..., 1::2] << 4)
            pairs[r:r + _PAIR_ROWS, :, 8:] = second[..., 0::2] | (second[..., 1::2] << 4)
        return self._blocks_out(name, pairs.reshape(rows, -1), scale, low)

    def int8_blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A Q8_0 weight's own blocks, for --quantization int8 (and the int8 lm_head) to run as they are:
        the integers [N, K] int8 and the scales [N, K / 32] (value = q * scale, exactly what the file's
        dequantization gives); None for any other type."""
        t = self._tensors[name]
        if GGMLQuantizationType(t.tensor_type) != GGMLQuantizationType.Q8_0:
            return None
        rows = int(t.shape[1])
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(rows, -1, 34)  # an f16 scale, then 32 int8
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        return self._blocks_out(name, blocks[..., 2:].copy().view(np.int8).reshape(rows, -1), scale)

    def _blocks_out(self, name: str, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
        """A tensor's block arrays (one row per output) as tensors: rows unpermuted as __getitem__
        unpermutes the floats, the file's pages then dropped."""
        heads = self._heads.get(name.rpartition(".")[0].rpartition(".")[2]) if name.endswith(".weight") else None
        if heads is not None:
            arrays = tuple(_unpermute(a, heads) for a in arrays)
        out = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        self._release(self._tensors[name])
        return out

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_weights(reader: GGUFReader, config: dict[str, Any]) -> GGUFWeights:
    """Every tensor under its Hugging Face name, dequantised to float32 one at a time, when read."""
    return GGUFWeights(reader, config)


def read_tokenizer(reader: GGUFReader) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer from GGUF metadata (the `gpt2` tokenizer model).

    Raises:
        ValueError: the tokenizer model or its pre-tokenizer is not one we rebuild exactly (named).
    """
    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind == "llama":
        raise ValueError("unsupported GGUF tokenizer model 'llama' (SentencePiece: Llama-2, Mistral, TinyLlama); "
                         "supported: 'gpt2' (byte-level BPE). Load the model's Hugging Face folder instead")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2' (byte-level BPE)")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); supported: "
                         f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _SINGLE_DIGIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    return tok


def tokenizer_config(reader: GGUFReader) -> dict[str, Any]:
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        idx = _field(reader, key)
        return tokens[idx] if idx is not None else None

    return {
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    }


def open_gguf(path: Path) -> GGUFReader:
    reader = GGUFReader(path)
    if reader.fields.get("general.architecture") is None:
        raise ValueError("not a model GGUF (no general.architecture)")
    return reader


def write_hf_folder(path: Path, out_dir: Path) -> None:
    """Convert a GGUF file into a Hugging Face folder (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    reader = open_gguf(path)
    config = read_config(reader)
    save_file(dict(read_weights(reader, config)), str(out_dir / "model.safetensors"))
    read_tokenizer(reader).save(str(out_dir / "tokenizer.json"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(reader), indent=2))

