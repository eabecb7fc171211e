"""Tokenizer and chat template of a model folder: `tokenizers` for text, jinja2 for chat."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError, nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=8)
def compile_chat_template(source: str) -> Template:
    """A chat template compiled in transformers' Jinja environment (sandboxed, trim_blocks and
    lstrip_blocks, loop controls, raise_exception, strftime_now, tojson without ASCII escaping)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _default_template(template: str | list[dict[str, str]] | None) -> str | None:
    """tokenizer_config.json may hold named templates; the one named "default" serves chat."""
    if not isinstance(template, list):
        return template
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
        raise ValueError(f"chat_template lists {sorted(map(str, named))} but no 'default' template")
    return named["default"]


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
        template = _default_template(cfg.get("chat_template"))
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
    def num_added_tokens(self) -> int:
        """Added (special) tokens; random benchmark prompts draw ids above them, as vLLM's random dataset."""
        return len(self.tokenizer.get_added_tokens_decoder())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """The most characters of text one token can stand for (its longest vocabulary entry: each
        of a token's characters stands for at most one character of text), so a text longer than
        this times a context cannot fit in it. None when a normalizer (which may drop characters)
        breaks that bound."""
        if self.tokenizer.normalizer is not None:
            return None
        return max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the BOS token when the model asks for one.

        Through `encode_batch`, which releases the GIL (`encode` holds it): a server encoding a
        long prompt on a worker thread keeps answering meanwhile."""
        ids = self.tokenizer.encode_batch([text], add_special_tokens=False)[0].ids
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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """Render messages the way the model's own template says (as transformers does);
        `template_kwargs` (a request's chat_template_kwargs) are extra template variables."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain prompt")
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **template_kwargs}
        return compile_chat_template(self.chat_template).render(
            variables, messages=messages, add_generation_prompt=add_generation_prompt)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(token: str | dict[str, Any] | None) -> str | None:
    # tokenizer_config.json may spell a special token as {"content": "...", ...}.
    return token.get("content") if isinstance(token, dict) else token
