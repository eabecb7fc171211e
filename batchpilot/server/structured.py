"""What a request's output must match, read from the fields clients use to say it.

OpenAI's `response_format` (`text`, `json_object`, `json_schema`), vLLM's `structured_outputs`
object and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` all
become one StructuredOutputsParams; more than one of them in a request is a 400 naming the
second, as is a malformed one.
"""

from __future__ import annotations

from typing import Any

from batchpilot.sampling_params import SamplingParamsError, StructuredOutputsParams
from batchpilot.server.errors import APIError

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_SPEC_KEYS = ("json", "json_object", "regex", "choice", "grammar")


def structured_outputs_of(req: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's output constraint and the field that set it (None, None without one)."""
    found: list[tuple[dict[str, Any], str]] = []
    fmt = req.response_format
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append((spec, "response_format"))
    if req.structured_outputs is not None:
        unknown = sorted(set(req.structured_outputs) - set(_SPEC_KEYS))
        if unknown:
            raise APIError(400, f"structured_outputs: unsupported key {unknown[0]!r} (supported: "
                                f"{', '.join(_SPEC_KEYS)})", "structured_outputs")
        spec = {k: v for k, v in req.structured_outputs.items() if v not in (None, False)}
        found.append((spec, "structured_outputs"))
    for name, key in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append(({key: value}, name))
    if not found:
        return None, None
    if len(found) > 1:
        raise APIError(400, f"{found[1][1]}: give one output constraint, not {found[0][1]} and {found[1][1]}",
                       found[1][1])
    spec, name = found[0]
    try:
        return StructuredOutputsParams(**spec), name
    except SamplingParamsError as e:
        raise APIError(400, f"{name}: {e}", name) from e
    except TypeError as e:
        raise APIError(400, f"{name}: {e}", name) from e


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        body = fmt.get("json_schema")
        schema = body.get("schema") if isinstance(body, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format: json_schema needs a 'schema' object "
                                "({'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}})",
                           "response_format")
        return {"json": schema}
    raise APIError(400, f"response_format: type must be text, json_object or json_schema, got {kind!r}",
                   "response_format")


def logit_bias_of(req: Any) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": bias}) with integer keys."""
    if not req.logit_bias:
        return None
    try:
        return {int(k): float(v) for k, v in req.logit_bias.items()}
    except ValueError as e:
        raise APIError(400, f"logit_bias: keys must be token ids, got {e}", "logit_bias") from e
