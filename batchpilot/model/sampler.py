"""Turn next-token logits into tokens, one row per request, with each request's own options.

Greedy rows take the argmax. Random rows apply temperature, top-k, top-p and min-p, then
sample by inverting the CDF (in two levels) with one uniform number drawn from the request's own generator,
so a seeded request gives the same tokens in any batch. (One number per row, not one per
vocabulary entry as the exponential race needs: at batch 128 that race cost 90 ms a step.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from batchpilot.model import kernels
from batchpilot.sampling_params import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from batchpilot.model.grammar import Grammar


@dataclass
class SamplingRow:
    params: SamplingParams
    output_token_ids: list[int]
    generator: torch.Generator
    prompt_token_ids: Sequence[int] = ()  # for repetition_penalty
    grammar: Grammar | None = None  # the tokens it allows next, if the output is constrained
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    stop_token_ids: frozenset[int] = frozenset()  # not sampled before params.min_tokens


def greedy_as_is(rows: list[SamplingRow]) -> bool:
    """Whether every row's token is the argmax of its logits as they are: greedy, with no logprobs, penalties
    or shaping (then the model may compute it with the logits: LlamaModel.forward_greedy)."""
    return all(r.params.greedy and _as_is(r) for r in rows)


def _as_is(r: SamplingRow) -> bool:
    return r.params.logprobs is None and not _penalised(r) and not _shapes(r)


def sample(logits: torch.Tensor, rows: list[SamplingRow],
           argmax: torch.Tensor | None = None) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Pick one token per row of logits [R, V] (bf16 or float32; float32 is modified in place). argmax: each
    row's argmax of the logits where the model computed it already ([R] int64), used when greedy_as_is(rows).

    A batch of greedy rows without logprobs or penalties takes its argmax from the logits as they
    are (bf16 converts to float32 exactly, so the argmax is the same; the conversion of [128, 49152]
    cost more than the argmax). A batch of rows that ask for temperature alone is drawn from them as
    they are too (the native kernel). Anything else works on a float32 copy.

    Returns:
        The sampled token ids, and per row the logprobs asked for (None where not asked).
        Logprobs are of the model's raw distribution, before penalties and temperature.
    """
    if greedy_as_is(rows):
        return (_argmax(logits) if argmax is None else argmax).tolist(), [None] * len(rows)
    as_is = all(_as_is(r) for r in rows)
    if (as_is and logits.dtype in kernels.LOGIT_DTYPES and kernels.native_available()
            and all(_temperature_only(r) for r in rows)):
        return _sample_random(logits, rows).tolist(), [None] * len(rows)  # read in place, bf16 or not
    logits = logits.float()
    want_logprobs = [r.params.logprobs is not None for r in rows]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
    _apply_penalties(logits, rows)
    shaped = [i for i, r in enumerate(rows) if _shapes(r)]
    if shaped:
        _shape_logits(logits, [rows[i] for i in shaped], shaped)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(random_rows) == len(rows):  # no greedy row: no argmax, and no copy of the rows
        tokens = _sample_random(logits, rows)
    else:
        tokens = _argmax(logits)
        if random_rows:
            idx = torch.tensor(random_rows)
            tokens[idx] = _sample_random(logits[idx], [rows[i] for i in random_rows])
    token_list = tokens.tolist()
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for i, r in enumerate(rows):
            if want_logprobs[i]:
                logprobs[i] = _token_logprobs(raw_logprobs[i], token_list[i], r.params.logprobs or 0)
    return token_list, logprobs


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch's argmax does not vectorise (7 ms at [128, 49152] on two cores); the native one does."""
    if kernels.native_available() and logits.dtype in kernels.LOGIT_DTYPES:
        return kernels.argmax_rows(logits)
    return logits.argmax(dim=-1)


def _penalised(r: SamplingRow) -> bool:
    return (r.params.presence_penalty != 0 or r.params.frequency_penalty != 0) and bool(r.output_token_ids)


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    for i, r in enumerate(rows):
        p = r.params
        if not _penalised(r):
            continue
        counts = torch.bincount(torch.tensor(r.output_token_ids), minlength=logits.shape[1])
        counts = counts[: logits.shape[1]].to(logits.dtype)
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _shapes(r: SamplingRow) -> bool:
    return r.grammar is not None or bool(r.bad_word_ids) or r.params.shapes_logits


def _shape_logits(logits: torch.Tensor, rows: list[SamplingRow], index: list[int]) -> None:
    """Per-request logits processing, in vLLM's order: repetition penalty and logit bias change
    values; then allowed tokens, bad words, min_tokens and the grammar forbid tokens (-inf).
    `rows` are the shaped rows, at `index` in `logits`."""
    vocab = logits.shape[1]
    forbid = torch.zeros(len(rows), vocab, dtype=torch.bool)  # row k: logits row index[k]
    grammar_rows = [k for k, r in enumerate(rows) if r.grammar is not None]
    if grammar_rows:
        words = -(-vocab // 32)
        bits = np.zeros((len(grammar_rows), words), dtype=np.int32)
        for j, k in enumerate(grammar_rows):
            rows[k].grammar.fill_bitmask(bits[j].ctypes.data, words * 4)
        # token t is bit t % 32 of word t // 32: little-endian words, little bit order
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        forbid[grammar_rows] = torch.from_numpy(allowed) == 0
    for k, (i, r) in enumerate(zip(index, rows)):
        p, row = r.params, logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(list({*r.prompt_token_ids, *r.output_token_ids}), dtype=torch.long)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
            row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype)
        if p.allowed_token_ids:
            keep = torch.ones(vocab, dtype=torch.bool)
            keep[torch.tensor(p.allowed_token_ids, dtype=torch.long)] = False
            forbid[k] |= keep
        out = r.output_token_ids
        for word in r.bad_word_ids:
            # The word's last token is forbidden when the output ends with the rest of it.
            if len(word) == 1 or (len(out) >= len(word) - 1 and tuple(out[len(out) - len(word) + 1:]) == word[:-1]):
                forbid[k, word[-1]] = True
        if len(out) < p.min_tokens and r.stop_token_ids:
            forbid[k, list(r.stop_token_ids)] = True
    if len(index) == logits.shape[0]:  # every row: in place, no copy
        logits.masked_fill_(forbid, float("-inf"))
    else:
        at = torch.tensor(index, dtype=torch.long)
        logits[at] = logits[at].masked_fill(forbid, float("-inf"))


def _temperature_only(r: SamplingRow) -> bool:
    p = r.params
    return not p.greedy and not p.top_k and p.top_p >= 1.0 and p.min_p == 0


def _sample_random(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """One token per row of `logits` (float32 ones are changed in place), by inverting the CDF at
    a uniform number drawn from the row's own generator; rows with temperature alone take the
    native kernel, which reads bf16 as it is."""
    uniform = torch.cat([torch.rand(1, generator=r.generator) for r in rows])
    temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
    if kernels.native_available() and all(_temperature_only(r) for r in rows):
        return kernels.sample_rows(logits, temps, uniform)
    logits.div_(temps.unsqueeze(1))
    top_k = [r.params.top_k for r in rows]
    top_p = [r.params.top_p for r in rows]
    if any(top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    min_p = torch.tensor([r.params.min_p for r in rows], dtype=probs.dtype).unsqueeze(1)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return _invert_cdf(probs, uniform.unsqueeze(1))


CDF_BLOCK = 256  # vocabulary entries per block of the two-level CDF


def _invert_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds uniform x total.

    torch's cumsum is a sequential scan, so the CDF is taken in two levels: sums of blocks of
    CDF_BLOCK entries (vectorised), the CDF of those sums to pick a block, then the CDF inside that
    block alone. Each row is computed on its own, so a seeded request gets the same token in any
    batch. Comparisons are strict (the first entry whose CDF *exceeds* the target), so a
    zero-probability token is never picked."""
    rows, vocab = probs.shape
    pad = -vocab % CDF_BLOCK
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(rows, -1, CDF_BLOCK)
    block_mass = blocks.sum(dim=-1)
    block_cdf = block_mass.cumsum(dim=-1)
    target = uniform * block_cdf[:, -1:]  # u < 1, so under the total: the block found has mass
    last = block_cdf.shape[1] - 1
    block = torch.searchsorted(block_cdf, target, right=True).clamp(max=last)
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(target))
    inside = blocks[torch.arange(rows), block.squeeze(1)]  # [rows, CDF_BLOCK]
    inner_cdf = inside.cumsum(dim=-1) + before
    offset = torch.searchsorted(inner_cdf, target, right=True)
    # Rounding can leave the target at or past the block's end: take its last token that can occur.
    last_possible = (inside > 0).to(torch.int64).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    offset = torch.where(offset >= CDF_BLOCK, last_possible, offset)
    return (block * CDF_BLOCK + offset).squeeze(1).clamp(max=vocab - 1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([t if t > 0 else vocab for t in top_k]).clamp(max=vocab)
    ranks = torch.arange(vocab).unsqueeze(0)
    drop = ranks >= k.unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before > torch.tensor(top_p, dtype=logits.dtype).unsqueeze(1)
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _token_logprobs(row: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    top_values, top_ids = row.topk(n) if n else (row[:0], row[:0].long())
    return TokenLogprobs(float(row[token]), list(zip(top_ids.tolist(), top_values.tolist())))
