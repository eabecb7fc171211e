"""Model loading: the default model's conversion, tokenizer fidelity and clear errors."""

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
