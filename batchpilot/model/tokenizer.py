"""Tokenizer and chat template of a model folder: `tokenizers` for text, jinja2 for chat."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@dataclass
class TextTokenizer:
    """Encodes prompts, renders chat messages and decodes outputs for one model."""

    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool = False

    @classmethod
    def from_folder(cls, folder: Path, tokenizer_config: dict[str, Any] | None = None) -> TextTokenizer:
        cfg = tokenizer_config if tokenizer_config is not None else _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        template_file = folder / "chat_template.jinja"
        if template is None and template_file.exists():
            template = template_file.read_text()
        return cls(
            tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
            chat_template=template,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=_token_text(cfg.get("eos_token")),
            add_bos_token=bool(cfg.get("add_bos_token", False)),
        )

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the BOS token when the model asks for one."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token:
            bos = self.tokenizer.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental detokenizer: O(1) work per token instead of re-decoding the text."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages the way the model's own template says (as transformers does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain prompt")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(token: str | dict[str, Any] | None) -> str | None:
    # tokenizer_config.json may spell a special token as {"content": "...", ...}.
    return token.get("content") if isinstance(token, dict) else token
