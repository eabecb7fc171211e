"""Constrained decoding: a request's grammar, compiled once per spec, one matcher per sequence.

The grammar engine is llguidance (a Rust library with no Python dependencies; xgrammar pulls
transformers and triton, which break a CPU torch install). A spec (JSON schema, regex, choice,
Lark/GBNF grammar, any JSON object) is compiled once and cached; each sequence runs a copy of
the compiled matcher, which says at every step which tokens may come next (a bitmask the
sampler applies) and consumes the token sampled. Compiling can take from milliseconds to a
second for a large schema, so front ends call `compile()` off the step loop.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance

from batchpilot.model.tokenizer import TextTokenizer
from batchpilot.sampling_params import StructuredOutputsParams

_CACHE_SIZE = 256  # compiled specs kept (least recently used dropped)


class GrammarError(ValueError):
    """A spec the grammar engine cannot compile (front ends answer 400 naming the field)."""


def llguidance_grammar(spec: StructuredOutputsParams) -> str:
    """The spec in llguidance's grammar format."""
    if spec.json_object:
        return llguidance.grammar_from("json_schema", '{"type": "object"}')
    if spec.json is not None:
        schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from e
    if spec.regex is not None:
        return llguidance.grammar_from("regex", spec.regex)
    if spec.choice is not None:
        return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
    try:
        return llguidance.grammar_from("grammar", spec.grammar or "")
    except ValueError as e:
        raise GrammarError(str(e)) from e


class Grammar:
    """One sequence's matcher: which tokens may come next, and what it has consumed."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def fill_bitmask(self, pointer: int, num_bytes: int) -> None:
        """Write the allowed next tokens as bits (token t: bit t % 32 of int32 word t // 32)."""
        self.matcher.unsafe_compute_mask_ptr(pointer, num_bytes)

    def accept(self, token: int) -> None:
        """Consume a sampled token. Only tokens the mask allowed are sampled, so a refusal is a bug;
        the matcher then stays in its error state and `is_terminated()` ends the sequence."""
        self.matcher.consume_token(token)

    def is_terminated(self) -> bool:
        """Nothing more can follow (the grammar is complete, or the matcher failed)."""
        return self.matcher.is_stopped() or self.matcher.is_error()


class GrammarCompiler:
    """Compiles specs against one tokenizer and caches them. Safe from any thread."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._text_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self._eos = list(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about a second: it indexes the vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._text_tokenizer.tokenizer.to_str(), n_vocab=self.vocab_size,
                    eos_token=self._eos or None)
            return self._ll_tokenizer

    def compile(self, spec: StructuredOutputsParams) -> Grammar:
        """A fresh matcher for one sequence; raises GrammarError for a spec that does not compile."""
        key = spec.key()
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
        if template is None:
            template = llguidance.LLMatcher(self.ll_tokenizer, llguidance_grammar(spec), log_level=0)
            if template.is_error():
                raise GrammarError(template.get_error())
            with self._lock:
                self._compiled[key] = template
                while len(self._compiled) > _CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return Grammar(template.deep_copy())
