"""Tool calls: OpenAI's `tools` and `tool_choice` in, `tool_calls` out.

The model's calls are read in the Hermes format most open chat models use (a JSON object
{"name": ..., "arguments": {...}} inside <tool_call></tool_call>), as vLLM's `hermes` parser
does. With `tool_choice` "required" or a named function the output is constrained (vLLM's
approach): a named function's output is its arguments, valid against its parameters schema;
"required" is a JSON array of one or more {"name", "parameters"} objects. Either always parses.
A chat template that does not render tools itself gets them in a system message, and earlier
calls and results as Hermes-style text, so the model sees them in any case.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from batchpilot.sampling_params import StructuredOutputsParams
from batchpilot.server.errors import APIError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """What a chat request asks of tools: `mode` none / auto / required / named."""

    mode: str
    functions: list[dict[str, Any]] = field(default_factory=list)  # each {"name", "description"?, "parameters"?}
    name: str | None = None  # the named function
    parallel: bool = True  # parallel_tool_calls: more than one call per answer

    @property
    def constrains(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            fn = next(f for f in self.functions if f["name"] == self.name)
            return StructuredOutputsParams(json=fn.get("parameters") or {"type": "object"})
        if self.mode == "required":
            one_of = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                        "parameters": f.get("parameters") or {"type": "object"}},
                       "required": ["name", "parameters"], "additionalProperties": False} for f in self.functions]
            array = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
            return StructuredOutputsParams(json=array if self.parallel else {**array, "maxItems": 1})
        return None

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The message's content and its tool calls (OpenAI's shape) from the generated text."""
        if self.mode == "named":
            return "", [_call(self.name or "", text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
                return "", [_call(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]
            except (ValueError, TypeError, KeyError):  # cut short by max_tokens
                return text, []
        if self.mode == "auto" and CALL_OPEN in text:
            calls = []
            for body in _CALL.findall(text):
                try:
                    obj = json.loads(body)
                    args = obj.get("arguments", obj.get("parameters", {}))
                    calls.append(_call(str(obj["name"]), args if isinstance(args, str)
                                       else json.dumps(args, ensure_ascii=False)))
                except (ValueError, TypeError, KeyError, AttributeError):
                    return text, []  # not a well-formed call: the text stands as it is
            content = text[: text.index(CALL_OPEN)]
            return content if content.strip() else None, calls if self.parallel else calls[:1]
        return text, []

    def finish_reason(self, reason: str | None, calls: list[dict[str, Any]]) -> str | None:
        """OpenAI's: "tool_calls" when auto or required called tools, "stop" for a named function."""
        if calls and self.mode in ("auto", "required") and reason == "stop":
            return "tool_calls"
        return reason


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_plan(tools: list[dict[str, Any]] | None, choice: str | dict[str, Any] | None,
              parallel: bool = True) -> ToolPlan | None:
    """The request's plan, or None without tools; a malformed field is a 400 naming it."""
    if not tools:
        if choice not in (None, "none", "auto"):  # auto / none without tools: nothing to call
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return None
    functions = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str) and fn["name"]):
            raise APIError(400, f"tools.{i}: expected {{'type': 'function', 'function': {{'name': ..., "
                                f"'parameters': {{...}}}}}}", "tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(400, f"tools.{i}: function.parameters must be a JSON schema object", "tools")
        functions.append(fn)
    if choice is None or choice in ("auto", "none", "required"):
        return ToolPlan(choice or "auto", functions, parallel=parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(400, "tool_choice must be none, auto, required or {'type': 'function', 'function': "
                            "{'name': ...}}", "tool_choice")
    if name not in {f["name"] for f in functions}:
        raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return ToolPlan("named", functions, name, parallel)


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def hermes_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Messages for a template that knows nothing of tools: the tools in a system message (unless
    tool_choice is none), assistant calls as <tool_call> text, tool results as user turns."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(f"{CALL_OPEN}\n{json.dumps(_as_call(c), ensure_ascii=False)}\n{CALL_CLOSE}"
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": "\n".join(x for x in (m.get("content"), calls) if x)})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if plan is None or plan.mode == "none":
        return out
    listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in plan.functions)
    intro = ("You can call functions. Their signatures are inside <tools></tools>:\n<tools>\n" + listing +
             "\n</tools>\nTo call one, answer with a JSON object of its name and arguments inside "
             f'{CALL_OPEN}{CALL_CLOSE} tags:\n{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}'
             f"\n{CALL_CLOSE}")
    if out and out[0]["role"] in ("system", "developer"):
        return [{"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{intro}"}, *out[1:]]
    return [{"role": "system", "content": intro}, *out]


def _as_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    return {"name": fn.get("name"), "arguments": args}


class ToolStream:
    """One choice's stream under a tool plan: text deltas in, chat deltas out.

    A named function streams its arguments as they come. Auto streams content until a
    <tool_call> opens (holding back a tail that may be the start of the tag), then holds the
    rest and sends the parsed calls at the end; required sends its calls at the end.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""  # all generated so far
        self.sent = 0  # characters of text sent as content
        self.id = call_id()
        self.started = False

    def feed(self, delta: str) -> list[dict[str, Any]]:
        self.text += delta
        if self.plan.mode == "named":
            out = []
            if not self.started:
                self.started = True
                out.append({"tool_calls": [{"index": 0, "id": self.id, "type": "function",
                                            "function": {"name": self.plan.name, "arguments": ""}}]})
            if delta:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta}}]})
            return out
        if self.plan.mode != "auto":
            return []
        at = self.text.find(CALL_OPEN)
        safe = at if at >= 0 else _without_tag_prefix(self.text)
        if safe > self.sent:
            chunk, self.sent = self.text[self.sent: safe], safe
            return [{"content": chunk}]
        return []

    def choices(self, index: int, text: str, logprobs: Any, reason: str | None) -> list[dict[str, Any]]:
        """The stream chunks' choices for one text delta of choice `index` (the finish one last)."""
        deltas = self.feed(text)
        calls: list[dict[str, Any]] = []
        if reason is not None:
            last, calls = self.finish()
            deltas += last
        out = [{"index": index, "delta": d, "logprobs": logprobs if k == 0 else None, "finish_reason": None}
               for k, d in enumerate(deltas)]
        if reason is not None:
            out.append({"index": index, "delta": {}, "logprobs": None,
                        "finish_reason": self.plan.finish_reason(reason, calls)})
        return out

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The last deltas, and the calls made (empty when none)."""
        if self.plan.mode == "named":
            return [], [_call(self.plan.name or "", self.text)]
        content, calls = self.plan.parse(self.text)
        if not calls:
            rest = self.text[self.sent:]
            return ([{"content": rest}] if rest else []), []
        return [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(calls)], calls


def _without_tag_prefix(text: str) -> int:
    """Where a possible start of CALL_OPEN at the end of text begins (len(text) when none)."""
    for k in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-k:]):
            return len(text) - k
    return len(text)
