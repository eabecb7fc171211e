"""OpenAI request bodies (pydantic), with the ranges OpenAI and vLLM document.

Types are strict (no "yes" for a boolean, no "0.5" for a number). Unknown fields are ignored,
as vLLM does, so clients that send vendor extras keep working; of OpenAI's own fields, those that
do not change the output (`store`, `metadata`, `service_tier`, `user`, `stream_options.
continuous_usage_stats`) are accepted and ignored. Sampling fields accept JSON null as "use the
default". Fields that would change the output and that we do not implement (`UNSUPPORTED`) are a
400 naming them, never silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 16
MAX_LOGPROBS = 20
SSE_DONE = "data: [DONE]\n\n"  # the last event of every stream


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False
    continuous_usage_stats: bool = False


def _invalid_unicode_at(value: Any, path: str) -> str | None:
    """Where a string of `value` holds a lone surrogate (JSON can spell one, "\\ud800", that no
    text encoding can carry), as a dotted path; None when every string is valid."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            if (found := _invalid_unicode_at(getattr(value, name), f"{path}.{name}" if path else name)) is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if (found := _invalid_unicode_at(item, f"{path}.{i}")) is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if (found := _invalid_unicode_at(key, path) or _invalid_unicode_at(item, f"{path}.{key}")) is not None:
                return found
    return None


class _RequestBody(BaseModel):
    """A request body: every string in it must be valid Unicode (a 400 naming the field)."""

    @model_validator(mode="after")
    def _valid_unicode(self) -> _RequestBody:
        path = _invalid_unicode_at(self, "")
        if path is not None:
            raise PydanticCustomError("invalid_unicode", "{param}: invalid Unicode (a lone surrogate)",
                                      {"param": path})
        return self


# OpenAI and vLLM fields that change the output and are not implemented: a 400 naming the field.
UNSUPPORTED = ("functions", "function_call", "audio", "prediction", "web_search_options", "use_beam_search",
               "length_penalty")


class _SamplingFields(_RequestBody):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM's sampling extras
    min_tokens: int = Field(0, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM: logprobs of the prompt tokens
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)  # vLLM's extra: lower runs first
    sla_class: str | None = None  # one of the server's --sla-class names (or the x-batchpilot-sla header)

    functions: Any = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    truncate_prompt_tokens: int | None = Field(None, ge=1)  # vLLM: keep only the prompt's last N tokens
    modalities: list[str] | None = None
    parallel_tool_calls: bool = True

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        neutral = (None, False) if info.field_name != "length_penalty" else (None, 1, 1.0)
        if not any(v is n or (type(v) is type(n) and v == n) for n in neutral):
            raise ValueError("not supported")
        return v

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and v != ["text"]:
            raise ValueError("only ['text'] is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        values = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in values):
            raise ValueError("stop strings must be non-empty")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message answers this call

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat template reads it."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables (vLLM's field)


class TokenizeRequest(_RequestBody):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the model's template."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int]
