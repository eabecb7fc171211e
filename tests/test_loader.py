"""Model loading: the default model's conversion, tokenizer fidelity and clear errors."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchpilot.model.loader import ModelLoadError, default_gguf_path, load_checkpoint

TEXTS = [
    "Hello world!",
    "  leading spaces and trailing  ",
    "Numbers: 1234567 and 3.14159, dates 2024-11-25.",
    "Code: def f(x):\n    return x ** 2  # square\n",
    "Unicode: café naïve 日本語 🚀 — “quotes”",
    "<|im_start|>user\nHi<|im_end|>\n",
    "don't won't I'm they'll we've",
]


def test_gguf_tokenizer_matches_transformers(default_model_dir):
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = load_checkpoint(default_model_dir).tokenizer
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text


@functools.lru_cache(maxsize=1)
def small_vocabulary(size: int = 4000) -> tuple[list[str], list[int], list[str], int, int]:
    """The default model's first `size` tokens, their types, and the merges among them: a valid
    byte-level BPE small enough for quick GGUF round trips (the 49k-token file takes seconds to parse)."""
    from gguf import GGUFReader

    source = GGUFReader(default_gguf_path())
    field = lambda key: source.fields[key].contents()  # noqa: E731
    tokens = field("tokenizer.ggml.tokens")[:size]
    kept = set(tokens)
    merges = [m for m in field("tokenizer.ggml.merges") if {*m.split(" "), m.replace(" ", "")} <= kept]
    return (tokens, field("tokenizer.ggml.token_type")[:size], merges, field("tokenizer.ggml.bos_token_id"),
            field("tokenizer.ggml.eos_token_id"))


def write_tokenizer_gguf(path: Path, pre: str, model: str = "gpt2") -> Path:
    """A one-tensor llama GGUF carrying a byte-level vocabulary under pre-tokenizer `pre`."""
    import numpy as np
    from gguf import GGUFWriter

    tokens, types, merges, bos, eos = small_vocabulary()
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPLIT_TEXTS = TEXTS + [
    "I'M HERE, YOU'RE THERE, WE'LL SEE",  # Llama-3 splits contractions case-insensitively
    "12345678901 items cost 1,000,000.50",
    "line one\n\n\n   line two\r\n\tindented   \n",
    "tabs\tand    many     spaces    ",
    "mixed: αβγ Ελληνικά, русский, عربى, 中文字符 and emoji 👩‍💻🎉",
]


@pytest.mark.parametrize("pre", ["llama-bpe", "llama3", "qwen2", "gpt2", "smollm"])
def test_gguf_pre_tokenizers_split_as_transformers_gguf_loader(tmp_path, pre):
    from transformers import AutoTokenizer

    from batchpilot.model.loader import load_tokenizer

    path = write_tokenizer_gguf(tmp_path / f"{pre}.gguf", pre)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = load_tokenizer(path)
    for text in SPLIT_TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_llama3_split_is_not_gpt2s(tmp_path):
    """The bug this guards against: a llama-bpe vocabulary tokenized with GPT-2's split."""
    from batchpilot.model.loader import load_tokenizer

    llama3 = load_tokenizer(write_tokenizer_gguf(tmp_path / "a.gguf", "llama-bpe"))
    gpt2 = load_tokenizer(write_tokenizer_gguf(tmp_path / "b.gguf", "gpt2"))
    assert any(llama3.encode(t) != gpt2.encode(t) for t in SPLIT_TEXTS)


@pytest.mark.parametrize("pre,model,named", [
    ("mystery-bpe", "gpt2", "'mystery-bpe'"),
    ("default", "llama", "SentencePiece"),
    ("default", "bert", "'bert'"),
])
def test_unsupported_gguf_tokenizers_are_refused_by_name(tmp_path, pre, model, named):
    from batchpilot.model.loader import load_tokenizer

    path = write_tokenizer_gguf(tmp_path / "m.gguf", pre, model)
    with pytest.raises(ModelLoadError, match=named):
        load_tokenizer(path)
    with pytest.raises(ModelLoadError, match=named):
        load_checkpoint(path)


def test_gguf_weights_are_dequantised_one_at_a_time(monkeypatch):
    """A GGUF is never held in float32 whole: each tensor is dequantised when the model takes it."""
    import torch

    from batchpilot.model import gguf_file

    calls = []
    real = gguf_file.dequantize
    monkeypatch.setattr(gguf_file, "dequantize", lambda data, kind: calls.append(1) or real(data, kind))
    ckpt = load_checkpoint(default_gguf_path())
    assert not calls and len(ckpt.weights) > 100 and "model.norm.weight" in ckpt.weights and not calls
    q = ckpt.weights["model.layers.0.self_attn.q_proj.weight"]
    assert len(calls) == 1 and q.dtype == torch.float32 and q.shape == (576, 576)


def test_chat_template_renders_like_transformers(default_model_dir):
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = load_checkpoint(default_model_dir).tokenizer.apply_chat_template(messages)
    assert ours == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_CONVERT = "from batchpilot.model.loader import default_model_dir; print(default_model_dir())"


def test_default_model_converts_once_even_when_two_processes_start_together(tmp_path):
    env = {**os.environ, "BATCHPILOT_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert sorted(x.name for x in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert load_checkpoint(folder).generation_defaults == {"temperature": 0.2, "top_p": 0.9}
    assert not [x for x in folder.parent.iterdir() if x.name.startswith(".convert-")]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", _CONVERT], env=env, capture_output=True, text=True, timeout=300)
    assert again.stdout.strip() == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "no such file" in str(e.value)


def test_unsupported_architecture_names_the_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(tmp_path)
    assert "config.json" in str(e.value) and "GPT2LMHeadModel" in str(e.value)


def test_corrupt_safetensors_names_the_file(tmp_path, default_model_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((default_model_dir / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(tmp_path)
    assert "model.safetensors" in str(e.value) and "corrupt" in str(e.value)


def test_corrupt_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(default_gguf_path().read_bytes()[:5000])
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(bad)
    assert "broken.gguf" in str(e.value)


def test_cli_reports_a_bad_model_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "batchpilot.cli", "generate", "--model", str(tmp_path / "x.gguf"), "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "x.gguf" in lines[0] and "Traceback" not in r.stderr


def test_every_eos_id_of_the_configs_ends_a_generation(tmp_path, default_model_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(default_model_dir / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 11], "temperature": 0.5}))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.generation_defaults == {"temperature": 0.5}
    assert ckpt.tokenizer.eos_token_id == 2
    assert set(ckpt.eos_token_ids) == {2, 7, 11, *ckpt.args.eos_token_ids}


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.parametrize("quantized", [False, True])
def test_reading_a_gguf_tensor_leaves_none_of_its_pages_resident(tmp_path, quantized):
    """Mapped pages of the file count in the process's memory until dropped: a loader that kept them
    held a 7B file (3.6 GB) beside the model built from it."""
    import numpy as np
    import torch

    from batchpilot.model import gguf_file, quant
    from tests.helpers import write_gguf

    data = np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32)  # 16 MiB
    path = write_gguf(tmp_path / "big.gguf", "llama", {"blk.0.ffn_down.weight": data},
                      quantize="Q4_0" if quantized else None)
    weights = gguf_file.GGUFWeights(gguf_file.open_gguf(path), {"model_type": "llama", "num_attention_heads": 4,
                                                                "num_key_value_heads": 2})
    name = "model.layers.0.mlp.down_proj.weight"
    first = weights[name]
    assert _mapped_rss_kib(path) < 1024
    if quantized:
        pairs, scale, low = weights.int4_blocks(name)
        assert _mapped_rss_kib(path) < 1024
        q = quant.unpack_pairs(pairs)
        assert torch.equal((q.float().view(1024, 128, 32) * scale.unsqueeze(-1) + low.unsqueeze(-1)).view(1024, 4096),
                           first)
    assert torch.equal(weights[name], first)  # read again: the pages come back from the file
