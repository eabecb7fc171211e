"""From an OpenAI request to engine requests and back: validation, fan-out for n, responses.

Every check that can fail runs before anything reaches the engine, so a bad request is a
400 that names its field and costs the other requests nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from jinja2 import TemplateError

from batchpilot.config import SLAClass
from batchpilot.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from batchpilot.engine.output_processor import RequestOutput
from batchpilot.engine.scheduler import RequestRejectedError
from batchpilot.model.grammar import GrammarError
from batchpilot.sampling_params import (
    SamplingParams,
    SamplingParamsError,
    StructuredOutputsParams,
    TokenLogprobs,
    fan_out,
)
from batchpilot.server.errors import APIError, error_body
from batchpilot.server.jobs import Choice, Job, merge_streams
from batchpilot.server.logprobs import LogprobFormat
from batchpilot.server.metrics import FinishedRequest, ServerMetrics
from batchpilot.server.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    sse,
)
from batchpilot.server.structured import logit_bias_of, structured_outputs_of
from batchpilot.server.tools import ToolPlan, ToolStream, hermes_messages, template_renders_tools, tool_plan

access_log = logging.getLogger("batchpilot.access")


SLA_HEADER = "x-batchpilot-sla"  # names the request's SLA class when its body does not


class Serving:
    def __init__(self, engine: AsyncEngine, model_names: list[str], metrics: ServerMetrics, max_queue: int,
                 model_root: str | None = None):
        self.engine = engine
        self.model_names = model_names
        # vLLM's bench client names the model by its card's `root` in /tokenize: the same model.
        self.accepted_names = set(model_names) | ({model_root} if model_root else set())
        self.metrics = metrics
        self.max_queue = max_queue
        self.tokenizer = engine.engine.tokenizer
        self.logprobs = LogprobFormat(self.tokenizer)
        self.max_model_len = engine.engine.snapshot().max_model_len
        self.num_reserved = 0  # choices accepted and not yet finished (running ones included)

    # ---- validation ---------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.accepted_names:
            raise APIError(404, f"model {model!r} does not exist (served: {', '.join(self.model_names)})",
                           "model", "model_not_found")

    async def completion_job(self, req: CompletionRequest, sla_header: str | None = None) -> Job:
        self.check_model(req.model)
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported_parameter")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise APIError(400, "best_of must equal n (beam search is not supported)", "best_of")
        prompts = await self._completion_prompts(req.prompt)
        job = await self._job("cmpl", prompts, req, req.max_tokens, req.logprobs, "prompt", sla_header)
        if req.echo:
            texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            keep_text = req.truncate_prompt_tokens is None  # else the text of the tokens kept
            job.echo = [t if isinstance(t, str) and keep_text else self.tokenizer.decode(p)
                        for t, p in zip(texts, job.prompts)]
        return job

    async def chat_job(self, req: ChatCompletionRequest, sla_header: str | None = None) -> Job:
        self.check_model(req.model)
        plan = tool_plan(req.tools, req.tool_choice, req.parallel_tool_calls)
        structured = None
        if plan is not None and plan.constrains:
            _, other = structured_outputs_of(req)
            if other is not None:
                raise APIError(400, f"tool_choice {plan.mode!r} constrains the output already; drop {other}",
                               other)
            structured = (plan.constraint(), "tools")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree", "max_completion_tokens")
        text = self._render(req.messages, req.add_generation_prompt, req.chat_template_kwargs, plan)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        job = await self._job("chatcmpl", [await self._encode(text, "messages")], req, max_tokens, logprobs,
                              "messages", sla_header, structured)
        job.tools = plan
        return job

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        """vLLM's /tokenize answer: the ids (and their strings when asked), count and context size."""
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            text = self._render(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        else:
            text = req.prompt
        ids = await self._encode(text, "messages" if req.messages is not None else "prompt", req.add_special_tokens)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids}
        if req.return_token_strs:
            out["token_strs"] = [self.tokenizer.tokenizer.id_to_token(t) for t in ids]
        return out

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def _render(self, messages: list[Any], add_generation_prompt: bool,
                template_kwargs: dict[str, Any] | None, plan: ToolPlan | None = None) -> str:
        dicts = [m.as_dict() for m in messages]
        kwargs = dict(template_kwargs or {})
        if template_renders_tools(self.tokenizer.chat_template):
            if plan is not None and plan.mode != "none":
                kwargs.setdefault("tools", [{"type": "function", "function": f} for f in plan.functions])
        elif plan is not None or any(m.tool_calls or m.role == "tool" for m in messages):
            dicts = hermes_messages(dicts, plan)
        try:
            return self.tokenizer.apply_chat_template(dicts, add_generation_prompt, **kwargs)
        except (TemplateError, ValueError, TypeError) as e:  # TypeError: chat_template_kwargs that clash
            raise APIError(400, f"messages: cannot render the chat template: {e}", "messages") from e

    async def _encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a request's text, encoded on a worker thread (a long text must not stall the
        event loop), after a check that needs no encoding: a text with more characters than the
        context's tokens can stand for is refused at once."""
        per_token = self.tokenizer.max_chars_per_token
        if per_token is not None and len(text) > self.max_model_len * per_token:
            raise APIError(400, f"{param}: {len(text)} characters cannot fit in the context of {self.max_model_len} "
                                f"tokens", param, "context_length_exceeded")
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)

    async def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt must not be empty", "prompt")
        return [await self._encode(p, "prompt") if isinstance(p, str) else list(p) for p in items]

    def _options(self, req: Any, sla_header: str | None) -> tuple[int, SLAClass | None]:
        """The request's priority and SLA class (named by the body's field, else the header), checked."""
        name = req.sla_class if req.sla_class is not None else sla_header
        try:
            cls = self.engine.engine.check_options(0, name)
        except RequestRejectedError as e:
            raise APIError(400, f"sla_class: {e}", "sla_class" if req.sla_class is not None else SLA_HEADER) from e
        try:
            self.engine.engine.check_options(req.priority, None)
        except RequestRejectedError as e:
            raise APIError(400, f"priority: {e}", "priority") from e
        return req.priority, cls

    async def _job(self, kind: str, prompts: list[list[int]], req: Any, max_tokens: int | None,
                   logprobs: int | None, prompt_param: str, sla_header: str | None = None,
                   constraint: tuple[StructuredOutputsParams | None, str] | None = None) -> Job:
        """`constraint`: the output constraint and the field that set it, when not the request's own
        structured-output fields (tool_choice)."""
        structured, structured_field = constraint or structured_outputs_of(req)
        if req.truncate_prompt_tokens is not None:
            prompts = [p[-req.truncate_prompt_tokens:] for p in prompts]
        priority, sla = self._options(req, sla_header)
        longest = max(len(p) for p in prompts)
        for p in prompts:
            try:
                self.engine.engine.check_prompt(p)
            except RequestRejectedError as e:
                code = "context_length_exceeded" if len(p) >= self.max_model_len else None
                raise APIError(400, f"{prompt_param}: {e}", prompt_param, code) from e
        room = self.max_model_len - longest
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens}, but the context holds {self.max_model_len} tokens "
                                f"and the prompt uses {longest}: at most {room} can be generated",
                           "max_tokens", "context_length_exceeded")
        try:
            d = self.engine.engine.sampling_defaults  # the model's generation_config.json
            params = SamplingParams(
                n=req.n or 1, temperature=_default(req.temperature, d.get("temperature", 1.0)),
                top_p=_default(req.top_p, d.get("top_p", 1.0)), top_k=_default(req.top_k, d.get("top_k", 0)),
                min_p=_default(req.min_p, d.get("min_p", 0.0)), seed=req.seed,
                presence_penalty=_default(req.presence_penalty, 0.0),
                frequency_penalty=_default(req.frequency_penalty, 0.0), max_tokens=max_tokens or room,
                stop=req.stop, stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                logprobs=logprobs, include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens, structured_outputs=structured,
                logit_bias=logit_bias_of(req), allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words or [],
                min_tokens=req.min_tokens, repetition_penalty=_default(req.repetition_penalty,
                                                                      d.get("repetition_penalty", 1.0)),
                prompt_logprobs=_prompt_logprobs_wanted(req, logprobs),
            )
            self.engine.engine.check_params(params)
        except SamplingParamsError as e:
            raise APIError(400, str(e), e.param) from e
        if structured is not None:
            try:  # compiled (and cached) off the event loop; each choice then copies it
                await asyncio.to_thread(self.engine.engine.compile_grammar, params)
            except GrammarError as e:
                raise APIError(400, f"{structured_field}: {e}", structured_field) from e
        job = Job(f"{kind}-{uuid.uuid4().hex}", prompts, params, priority, sla)
        if job.num_choices > self.max_queue:  # could never be queued: not a retryable 503
            raise APIError(400, f"{len(prompts)} prompt(s) x n={params.n} = {job.num_choices} sequences, more "
                           f"than the server queues at once (--max-queue {self.max_queue})",
                           "n" if params.n > 1 else "prompt")
        queued = self.num_reserved - self.engine.engine.snapshot().num_running
        if queued + job.num_choices > self.max_queue:
            self.metrics.rejected.labels(self.metrics.model_name, "503").inc()
            raise APIError(503, f"server busy: {queued} requests already waiting (--max-queue {self.max_queue})",
                           None, "queue_full", headers={"Retry-After": "1"})
        self.num_reserved += job.num_choices
        job.release = weakref.finalize(job, self._release, job.num_choices)
        return job

    def _release(self, n: int) -> None:
        self.num_reserved -= n

    # ---- generation ---------------------------------------------------------------------------

    async def run(self, job: Job, choices: list[Choice]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas of every choice, interleaved, as (choice index, delta), each also accumulated into
        `choices` (one per choice). Leaving early aborts all."""
        streams = []
        for i, prompt in enumerate(job.prompts):
            for k, p in enumerate(fan_out(job.params)):
                grammar = self.engine.engine.compile_grammar(p) if p.structured_outputs is not None else None
                streams.append(self.engine.generate(prompt, p, f"{job.request_id}-{i * job.params.n + k}",
                                                    job.priority, job.sla.name if job.sla else None, grammar,
                                                    checked=True))
        start = time.perf_counter()
        try:
            async for index, delta in merge_streams(streams):
                out = delta.outputs[0]
                c = choices[index]
                if out.token_ids:
                    now = time.perf_counter() - start
                    if c.first_token_s is None:
                        c.first_token_s = now
                    else:
                        self.metrics.observe_gap(now - c.last_token_s)
                    c.last_token_s = now
                c.text += out.text
                c.token_ids += out.token_ids
                c.logprobs += out.logprobs or []
                c.num_cached_tokens = delta.num_cached_tokens
                if delta.prompt_logprobs is not None:
                    c.prompt_logprobs = delta.prompt_logprobs
                if delta.finished:
                    c.finish_reason = out.finish_reason
                    c.queue_s, c.finished_s = delta.queue_time_s, time.perf_counter() - start
                yield index, delta
        finally:
            job.release()
            e2e = time.perf_counter() - start
            for i, c in enumerate(choices):
                self.metrics.observe_request(FinishedRequest(
                    len(job.prompts[i // job.params.n]), len(c.token_ids), job.params.max_tokens, job.params.n,
                    c.first_token_s, e2e if c.finished_s is None else c.finished_s, c.queue_s, c.finish_reason,
                    job.sla))
            first = min((c.first_token_s for c in choices if c.first_token_s is not None), default=None)
            access_log.info(json.dumps({
                "id": job.request_id, "prompt_tokens": sum(len(p) for p in job.prompts),
                "completion_tokens": sum(len(c.token_ids) for c in choices),
                "ttft_ms": None if first is None else round(first * 1000, 1), "e2e_ms": round(e2e * 1000, 1),
                "finish_reasons": [c.finish_reason or "abort" for c in choices],
            }))

    async def collect(self, job: Job) -> list[Choice]:
        choices = [Choice() for _ in range(job.num_choices)]
        async for _ in self._guarded(job, choices):
            pass
        return choices

    async def _guarded(self, job: Job, choices: list[Choice]) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            async for item in self.run(job, choices):
                yield item
        except EngineDeadError as e:
            raise APIError(503, f"engine failed: {e}", None, "engine_dead") from e
        except RequestFailedError as e:
            raise APIError(500, str(e), None, "engine_step_failed") from e
        except RequestRejectedError as e:
            raise APIError(400, str(e), "prompt") from e

    # ---- responses ----------------------------------------------------------------------------

    def usage(self, job: Job, choices: list[Choice]) -> dict[str, Any]:
        """OpenAI's usage: each prompt counted once (its first choice says what was cached)."""
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(c.token_ids) for c in choices)
        cached = sum(c.num_cached_tokens for c in choices[:: job.params.n])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _completion_choice_logprobs(self, job: Job, i: int, c: Choice) -> dict[str, Any] | None:
        if job.params.logprobs is None:
            return None
        if job.echo:
            return self._echoed_logprobs(job.prompts[i // job.params.n], c.prompt_logprobs, c.logprobs, c.token_ids)
        return self.logprobs.completion(c.logprobs, c.token_ids)

    def _echoed_logprobs(self, prompt: list[int], prompt_lps: list[TokenLogprobs | None] | None,
                         lps: list[TokenLogprobs], token_ids: list[int]) -> dict[str, Any]:
        """Completions logprobs of an echoed prompt followed by its generated tokens."""
        return self.logprobs.completion([*(prompt_lps or [None] * len(prompt)), *lps], prompt + token_ids)

    def model_name(self, requested: str | None) -> str:
        return requested or self.model_names[0]

    async def completion(self, req: CompletionRequest, job: Job) -> dict[str, Any]:
        choices = await self.collect(job)
        return {
            "id": job.request_id, "object": "text_completion", "created": job.created,
            "model": self.model_name(req.model),
            "choices": [{
                "index": i, "text": self._echo(job, i) + c.text, "finish_reason": c.finish_reason,
                "logprobs": self._completion_choice_logprobs(job, i, c),
                **({"prompt_logprobs": self.logprobs.vllm_prompt(job.prompts[i // job.params.n], c.prompt_logprobs)}
                   if req.prompt_logprobs is not None else {}),
            } for i, c in enumerate(choices)],
            "usage": self.usage(job, choices),
        }

    @staticmethod
    def _echo(job: Job, choice: int) -> str:
        return job.echo[choice // job.params.n] if job.echo else ""

    async def chat(self, req: ChatCompletionRequest, job: Job) -> dict[str, Any]:
        choices = await self.collect(job)
        return {
            "id": job.request_id, "object": "chat.completion", "created": job.created,
            "model": self.model_name(req.model),
            **({"prompt_logprobs": self.logprobs.vllm_prompt(job.prompts[0], choices[0].prompt_logprobs)}
               if req.prompt_logprobs is not None else {}),
            "choices": [{
                "index": i, **self._chat_message(job, c),
                "logprobs": self.logprobs.chat(c.logprobs, c.token_ids) if job.params.logprobs is not None else None,
            } for i, c in enumerate(choices)],
            "usage": self.usage(job, choices),
        }

    @staticmethod
    def _chat_message(job: Job, c: Choice) -> dict[str, Any]:
        """A choice's message and finish_reason, with its tool calls read from the text."""
        if job.tools is None:
            return {"message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason}
        content, calls = job.tools.parse(c.text)
        message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
        return {"message": message, "finish_reason": job.tools.finish_reason(c.finish_reason, calls)}

    async def stream(self, req: CompletionRequest | ChatCompletionRequest, job: Job, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta, a usage chunk if asked, then [DONE]."""
        base = {"id": job.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": job.created, "model": self.model_name(req.model)}
        choices = [Choice() for _ in range(job.num_choices)]
        if chat:
            for i in range(job.num_choices):
                yield sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        first_delta = set(range(job.num_choices))  # choices whose first delta is still to come
        tool_streams = {i: ToolStream(job.tools) for i in range(job.num_choices)} if job.tools else {}
        try:
            async for index, delta in self._guarded(job, choices):
                out = delta.outputs[0]
                reason = out.finish_reason if delta.finished else None
                # a completion's prompt text and logprobs go with its first delta (computed by then)
                with_prompt = not chat and index in first_delta and (job.echo or req.prompt_logprobs is not None)
                first_delta.discard(index)
                if not out.text and reason is None and not with_prompt:
                    continue
                lps = None
                extra: dict[str, Any] = {}
                if with_prompt:
                    prompt = job.prompts[index // job.params.n]
                    if req.prompt_logprobs is not None:
                        extra["prompt_logprobs"] = self.logprobs.vllm_prompt(prompt, delta.prompt_logprobs)
                    if job.echo:
                        out = replace(out, text=self._echo(job, index) + out.text)
                        if job.params.logprobs is not None:
                            lps = self._echoed_logprobs(prompt, delta.prompt_logprobs, out.logprobs or [],
                                                        out.token_ids)
                if lps is None and job.params.logprobs is not None and out.logprobs:
                    builder = self.logprobs.chat if chat else self.logprobs.completion
                    lps = builder(out.logprobs, out.token_ids)
                if index in tool_streams:
                    for choice in tool_streams[index].choices(index, out.text, lps, reason):
                        yield sse({**base, "choices": [choice]})
                    continue
                if chat:
                    choice = {"index": index, "delta": {"content": out.text} if out.text else {},
                              "logprobs": lps, "finish_reason": reason}
                else:
                    choice = {"index": index, "text": out.text, "logprobs": lps, "finish_reason": reason, **extra}
                yield sse({**base, "choices": [choice]})
        except APIError as e:
            yield sse(error_body(e.status, e.message, e.param, e.code))
            yield SSE_DONE
            return
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": self.usage(job, choices)})
        yield SSE_DONE


def _prompt_logprobs_wanted(req: Any, logprobs: int | None) -> int | None:
    """Top alternatives per prompt token to compute: vLLM's prompt_logprobs, or as many as
    `logprobs` when a completion echoes its prompt with logprobs."""
    wanted = [n for n in (req.prompt_logprobs, logprobs if getattr(req, "echo", False) else None) if n is not None]
    return max(wanted) if wanted else None


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value
