"""Offline API shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from tqdm import tqdm

from batchpilot.config import CacheConfig, ControllerConfig, EngineConfig, SchedulerConfig, SLAClass
from batchpilot.controllers import make_controller
from batchpilot.engine.block_pool import BlockPool, KVCacheManager
from batchpilot.engine.engine import LLMEngine
from batchpilot.engine.output_processor import CompletionOutput, RequestOutput
from batchpilot.engine.scheduler import Scheduler
from batchpilot.engine.trace import TraceWriter
from batchpilot.executors.torch_runner import TorchRunner, num_kv_blocks
from batchpilot.model.llama import LlamaModel
from batchpilot.model.loader import load_checkpoint
from batchpilot.sampling_params import SamplingParams, fan_out

logger = logging.getLogger(__name__)

PromptType = str | list[int]


def build_engine(config: EngineConfig, model: LlamaModel | None = None) -> LLMEngine:
    """Load the model and wire pool, scheduler, controller and runner into an engine. `model`: one
    already built from the same checkpoint, dtype and quantization, shared instead of loaded again
    (engines side by side in one process, as the lockstep benchmark runs them)."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    ckpt = load_checkpoint(config.model)
    dtype = getattr(torch, config.dtype)
    if model is None:
        model = LlamaModel(ckpt.args, ckpt.weights, dtype, config.quantization)
    del ckpt.weights
    elem = torch.finfo(dtype).bits // 8
    num_blocks = num_kv_blocks(config.cache, ckpt.args.kv_bytes_per_token * elem)
    block_size = config.cache.block_size
    pool = BlockPool(num_blocks, block_size)
    runner = TorchRunner(model, num_blocks, block_size, seed=config.seed)
    kv = KVCacheManager(pool, enable_prefix_caching=config.cache.enable_prefix_caching)
    scheduler = Scheduler(config.scheduler, kv, make_controller(config.controller, config.class_tpots_ms),
                          ckpt.args.max_position_embeddings)
    logger.info(
        "model %s (%s, %s%s); KV cache %d blocks x %d tokens = %d tokens (%.2f GiB)",
        ckpt.path, ckpt.args.architecture, config.dtype,
        f", {config.quantization} weights" if config.quantization else "", num_blocks, block_size,
        num_blocks * block_size, num_blocks * block_size * ckpt.args.kv_bytes_per_token * elem / 2**30,
    )
    trace = TraceWriter(config.controller.trace_path) if config.controller.trace_path else None
    vocab = min(ckpt.args.vocab_size, ckpt.tokenizer.vocab_size)
    return LLMEngine(scheduler, runner, ckpt.tokenizer, trace=trace, vocab_size=vocab,
                     sampling_defaults=ckpt.generation_defaults, eos_token_ids=ckpt.eos_token_ids)


class LLM:
    """Generate offline from a batch of prompts, through the continuous-batching engine."""

    def __init__(self, model: str | None = None, *, dtype: str = "bfloat16", quantization: str | None = None,
                 kv_cache_gib: float | None = None, max_num_seqs: int = 256,
                 batch_controller: str = "combined", threads: int | None = None, seed: int = 0,
                 max_num_batched_tokens: int = 512, max_model_len: int | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None, enable_prefix_caching: bool = True,
                 scheduling_policy: str = "fcfs", sla_classes: Sequence[str | SLAClass] = (),
                 default_sla_class: str | None = None, priority_aging_s: float = 60.0,
                 **controller_options: Any):
        """Args mirror vLLM's; `sla_classes` as --sla-class ('interactive:tpot=60,ttft=2000') or
        SLAClass; `controller_options` are ControllerConfig fields (min_num_seqs, memory_mode,
        mem_epsilon, sla_tpot_ms, trace_path, ...)."""
        config = EngineConfig(
            model=model, dtype=dtype, quantization=quantization, threads=threads, seed=seed,
            cache=CacheConfig(block_size=block_size, kv_cache_gib=kv_cache_gib, num_blocks=num_kv_blocks,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                scheduling_policy=scheduling_policy, priority_aging_s=priority_aging_s,
                sla_classes=tuple(c if isinstance(c, SLAClass) else SLAClass.parse(c) for c in sla_classes),
                default_sla_class=default_sla_class),
            controller=ControllerConfig(name=batch_controller, max_num_seqs=max_num_seqs, **controller_options),
        )
        self._init(config)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm._init(config)
        return llm

    def _init(self, config: EngineConfig) -> None:
        self.config = config
        self.engine = build_engine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False, priority: Sequence[int] | None = None,
                 sla_class: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; results in prompt order.

        Args:
            prompts: a string, a list of token ids, vLLM's {"prompt": ...} / {"prompt_token_ids": ...}
                dicts, or a list of any of these.
            sampling_params: one for all prompts, or one per prompt.
            priority: one per prompt, lower first (needs scheduling_policy="priority"), as vLLM's.
            sla_class: one SLA class name for all prompts, or one per prompt (None: the default).
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = [_engine_prompt(p) for p in prompts]  # type: ignore[union-attr]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or self.default_sampling_params()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params: need one per prompt, or a single one")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        classes = [sla_class] * len(prompts) if sla_class is None or isinstance(sla_class, str) else list(sla_class)
        for name, values in (("priority", priorities), ("sla_class", classes)):
            if len(values) != len(prompts):
                raise ValueError(f"{name}: need one per prompt")
        for p, c, params in zip(priorities, classes, params_list):  # all checked before any is queued
            self.engine.check_options(p, c)
            self.engine.check_params(params)
            if params.structured_outputs is not None:
                self.engine.compile_grammar(params)  # a spec that does not compile fails here, not mid-run
        return self._run(prompts, params_list, use_tqdm, priorities, classes)

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (vLLM's behaviour)."""
        return SamplingParams(**self.engine.sampling_defaults)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Render each conversation with the model's chat template (and `chat_template_kwargs`,
        extra template variables such as enable_thinking), then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        kwargs = chat_template_kwargs or {}
        prompts = [self.tokenizer.apply_chat_template(c, **kwargs) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams], use_tqdm: bool,
             priorities: list[int] | None = None, classes: list[str | None] | None = None) -> list[RequestOutput]:
        engine = self.engine
        results: dict[str, RequestOutput] = {}
        # n > 1 becomes n engine requests "{i}:{k}", merged back into one result per prompt.
        owners: dict[str, tuple[int, int]] = {}
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            for k, child in enumerate(fan_out(params)):
                rid = engine.add_request(prompt, child, f"{i}:{k}:{id(self)}", priorities[i] if priorities else 0,
                                         classes[i] if classes else None)
                owners[rid] = (i, k)
        merged: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(owners), disable=not use_tqdm, desc="requests")
        while engine.has_unfinished_requests():
            for delta in engine.step():
                i, k = owners[delta.request_id]
                results.setdefault(delta.request_id, delta)
                out = _accumulate(results, delta)
                if out.finished:
                    bar.update(1)
                    merged[i] = _merge_child(merged[i], out, k, str(i))
        bar.close()
        return [m for m in merged if m is not None]


def _engine_prompt(prompt: PromptType | dict[str, Any]) -> PromptType:
    """Text or token ids, from any form vLLM's LLM.generate takes: a string, a list of token ids, or its
    TextPrompt / TokensPrompt dicts ({"prompt": text}, {"prompt_token_ids": ids})."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError(f"prompts: a dict prompt needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, numbers.Integral) for t in prompt):
        return [int(t) for t in prompt]  # numpy's integers too
    raise ValueError("prompts: each prompt must be a string, a list of token ids (int), or a dict with 'prompt' or "
                     f"'prompt_token_ids'; got {type(prompt).__name__}")


def _accumulate(results: dict[str, RequestOutput], delta: RequestOutput) -> RequestOutput:
    acc = results[delta.request_id]
    if acc is not delta:
        c, d = acc.outputs[0], delta.outputs[0]
        c.text += d.text
        c.token_ids += d.token_ids
        if c.logprobs is not None and d.logprobs:
            c.logprobs += d.logprobs
        c.finish_reason = d.finish_reason
        acc.finished = delta.finished
        acc.num_preemptions = delta.num_preemptions
        acc.num_cached_tokens = delta.num_cached_tokens
        acc.queue_time_s = delta.queue_time_s
    return acc


def _merge_child(parent: RequestOutput | None, child: RequestOutput, k: int, rid: str) -> RequestOutput:
    completion: CompletionOutput = replace(child.outputs[0], index=k)
    if parent is None:
        return RequestOutput(rid, child.prompt, child.prompt_token_ids, [completion], True,
                             child.num_preemptions, child.queue_time_s, child.num_cached_tokens, child.prompt_logprobs)
    parent.prompt_logprobs = parent.prompt_logprobs or child.prompt_logprobs
    parent.outputs.append(completion)
    parent.outputs.sort(key=lambda o: o.index)
    parent.num_preemptions += child.num_preemptions
    if child.queue_time_s is not None:  # the request waited until its first sequence ran
        parent.queue_time_s = min(parent.queue_time_s or child.queue_time_s, child.queue_time_s)
    return parent
