"""Runs a scheduled step on the real model: builds the batch tensors, runs, samples."""

from __future__ import annotations

import logging

import torch

from batchpilot.config import CacheConfig
from batchpilot.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from batchpilot.engine.request import Request
from batchpilot.executors.decode_inputs import DecodeInputs
from batchpilot.model import kernels
from batchpilot.model.attention import AttentionMetadata, PrefillChunk
from batchpilot.model.hugepages import HugePageArena
from batchpilot.model.llama import LlamaModel
from batchpilot.model.sampler import SamplingRow, greedy_as_is, sample
from batchpilot.sampling_params import TokenLogprobs

logger = logging.getLogger(__name__)

# Without --kv-cache-gib the pool takes this share of available memory, up to the cap.
_AUTO_KV_FRACTION = 0.5
_AUTO_KV_CAP_GIB = 4.0


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def num_kv_blocks(cache: CacheConfig, bytes_per_token: int) -> int:
    """Blocks that fit the configured size, or a share of free memory when none is set."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_gib is not None:
        budget = cache.kv_cache_gib * 2**30
    else:
        budget = min(available_memory_bytes() * _AUTO_KV_FRACTION, _AUTO_KV_CAP_GIB * 2**30)
    blocks = int(budget // (bytes_per_token * cache.block_size))
    if blocks < 1:
        raise ValueError(f"--kv-cache-gib {cache.kv_cache_gib} holds less than one block")
    return blocks


def _sampling_row(req: Request, generator: torch.Generator) -> SamplingRow:
    if not req.sampling_params.shapes_logits and req.grammar is None:
        return SamplingRow(req.sampling_params, req.output_token_ids, generator)
    return SamplingRow(req.sampling_params, req.output_token_ids, generator, req.prompt_token_ids, req.grammar,
                       req.bad_word_ids, req.stop_token_set)


def _prompt_logprob_rows(ordered: list[ScheduledRequest]) -> list[tuple[ScheduledRequest, int, list[int]]]:
    """For requests that want prompt logprobs: the batch rows of this step whose logits predict
    a prompt token (position p predicts token p + 1), and the first such position."""
    out, row0 = [], 0
    for s in ordered:
        req = s.request
        if req.sampling_params.prompt_logprobs is not None:
            last = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)
            if s.start < last:
                out.append((s, s.start, list(range(row0, row0 + last - s.start))))
        row0 += s.num_new_tokens
    return out


def _prompt_logprobs(logits: torch.Tensor, prompt_rows: list[tuple[ScheduledRequest, int, list[int]]]
                     ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out, k = {}, 0
    for s, first, rows in prompt_rows:
        lp = logprobs[k: k + len(rows)]
        k += len(rows)
        # the prompt token each row predicts (the last may be in the next chunk, not this batch)
        actual = torch.tensor(s.request.prompt_token_ids[first + 1: first + 1 + len(rows)], dtype=torch.long)
        chosen = lp.gather(1, actual.unsqueeze(1))
        ranks = (lp > chosen).sum(dim=1) + 1
        n = s.request.sampling_params.prompt_logprobs or 0
        top_values, top_ids = lp.topk(n, dim=-1) if n else (lp[:, :0], lp[:, :0].long())
        out[s.request.request_id] = (first, [
            TokenLogprobs(v, list(zip(ids, vals)), rank)
            for v, ids, vals, rank in zip(chosen.squeeze(1).tolist(), top_ids.tolist(), top_values.tolist(),
                                          ranks.tolist())])
    return out


class TorchRunner:
    """Owns the model and its KV cache tensors; executes SchedulerOutputs."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int, seed: int = 0,
                 native_attention: bool = True):
        a = model.args
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        # One mapping for every layer, on huge pages as the weights (at 32-128 rows level with torch's
        # 4 KB pages so far: docs/reproduction.md). Zeroed, and so touched here rather than mid-step:
        # decode attention gathers whole blocks, and a never-written slot holding NaN would poison
        # probs @ V even where the mask gives it weight 0.
        pool = HugePageArena().empty((a.num_layers, 2, a.num_kv_heads, slots, a.head_dim), model.dtype).zero_()
        self.kv_caches = [(layer[0], layer[1]) for layer in pool]  # per layer: K, V [KVH, S, D], contiguous
        self.cache_pointers = kernels.cache_pointers(self.kv_caches)  # for decode_layers, built once
        self.native_attention = native_attention and kernels.native_available()
        # a decode-only step's inputs in buffers made once; its tables' width suits the native attention only
        self.decode_inputs = DecodeInputs(block_size) if self.native_attention else None
        self._generators: dict[str, torch.Generator] = {}
        self._seed_source = torch.Generator().manual_seed(seed)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        if self._decode_only(sched.scheduled):
            return self._execute(sched)  # no autograd state to skip there; the mode's enter and exit cost ~40 us cold
        with torch.inference_mode():
            return self._execute(sched)

    def _decode_only(self, scheduled: list[ScheduledRequest]) -> bool:
        """Whether every row decodes one token on the native attention: the steps decode_inputs serves."""
        return self.decode_inputs is not None and bool(scheduled) and all(s.num_new_tokens == 1 for s in scheduled)

    def _execute(self, sched: SchedulerOutput) -> RunnerOutput:
        for rid in sched.finished_ids:
            self._generators.pop(rid, None)
        if not sched.scheduled:
            return RunnerOutput({})
        # Single-token rows first: they share one batched attention call.
        ordered = sorted(sched.scheduled, key=lambda s: s.num_new_tokens != 1)
        token_ids, positions, meta, sample_rows = self._prepare(ordered)
        prompt_rows = _prompt_logprob_rows(ordered)
        wanted = [row for row, _ in sample_rows] + [row for _, _, rows in prompt_rows for row in rows]
        # every row in order (a decode-only step): no index tensor, no gather of the lm_head's input
        every_row = len(wanted) == len(token_ids) and wanted == list(range(len(wanted)))
        rows = [_sampling_row(s.request, self._generator(s)) for _, s in sample_rows]
        argmax = None
        if every_row and not prompt_rows and greedy_as_is(rows):
            logits, argmax = self.model.forward_greedy(token_ids, positions, self.kv_caches, meta)
        else:
            logits = self.model.forward(token_ids, positions, self.kv_caches, meta,
                                        None if every_row else torch.tensor(wanted, dtype=torch.long))
        prompt_lps = _prompt_logprobs(logits[len(sample_rows):], prompt_rows) if prompt_rows else {}
        tokens, logprobs = sample(logits if logits.shape[0] == len(sample_rows) else logits[: len(sample_rows)], rows,
                                  argmax)
        ids = [s.request.request_id for _, s in sample_rows]
        return RunnerOutput(
            dict(zip(ids, tokens)),
            {rid: lp for rid, lp in zip(ids, logprobs) if lp is not None},
            prompt_lps,
        )

    def _generator(self, s: ScheduledRequest) -> torch.Generator:
        rid = s.request.request_id
        gen = self._generators.get(rid)
        if gen is None:
            seed = s.request.sampling_params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
            gen = self._generators[rid] = torch.Generator().manual_seed(seed)
        return gen

    def _prepare(self, ordered: list[ScheduledRequest]):
        bs = self.block_size
        if self._decode_only(ordered):
            tokens, positions, slots, tables, lens = self.decode_inputs.fill(ordered)
            meta = AttentionMetadata(slot_mapping=slots, block_size=bs, num_decodes=len(ordered), decode_tables=tables,
                                     decode_lens=lens, native=True, prefills=[], cache_pointers=self.cache_pointers)
            return tokens, positions, meta, [(row, s) for row, s in enumerate(ordered) if s.sample]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[tuple[int, ScheduledRequest]] = []
        decodes: list[ScheduledRequest] = []
        prefills: list[PrefillChunk] = []
        for s in ordered:
            start, end = s.start, s.start + s.num_new_tokens
            row0 = len(tokens)
            tokens += s.request.token_ids(start, end)
            positions += range(start, end)
            table = s.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if s.sample:
                sample_rows.append((len(tokens) - 1, s))
            if s.num_new_tokens == 1:
                decodes.append(s)
            elif start == 0:
                prefills.append(PrefillChunk(row0, len(tokens), 0, None, None))
            else:
                ctx = self._context_slots(table, end)
                q_pos = torch.arange(start, end).unsqueeze(1)
                mask = torch.arange(end).unsqueeze(0) <= q_pos  # [n, end]
                prefills.append(PrefillChunk(row0, len(tokens), start, ctx, mask))
        decode_tables = decode_lens = None
        if decodes:
            decode_tables, decode_lens = self._decode_context(decodes)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            block_size=bs,
            num_decodes=len(decodes),
            decode_tables=decode_tables,
            decode_lens=decode_lens,
            native=self.native_attention,
            prefills=prefills,
            cache_pointers=self.cache_pointers,
        )
        return (torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                meta, sample_rows)

    def _context_slots(self, table: list[int], length: int) -> torch.Tensor:
        blocks = torch.tensor(table[: -(-length // self.block_size)], dtype=torch.long)
        return (blocks.unsqueeze(1) * self.block_size + torch.arange(self.block_size)).flatten()[:length]

    def _decode_context(self, decodes: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables padded to a common width W [B, W], and context lengths [B]."""
        lens = [s.start + 1 for s in decodes]
        width = -(-max(lens) // self.block_size)
        # Short tables are padded with their first block; positions past a length are never read.
        padded = [s.block_table[:width] for s in decodes]
        tables = torch.tensor([t + [t[0]] * (width - len(t)) for t in padded], dtype=torch.long)
        return tables, torch.tensor(lens, dtype=torch.long)
