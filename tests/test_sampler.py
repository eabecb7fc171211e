"""Each sampling option does what it says, on hand-made logits (no model)."""

import math

import pytest
import torch

from batchpilot.model.sampler import SamplingRow, sample
from batchpilot.sampling_params import SamplingParams, SamplingParamsError


def rows(n, seed=None, outputs=None, **kw):
    return [SamplingRow(SamplingParams(seed=seed, **kw), list(outputs or []),
                        torch.Generator().manual_seed(seed if seed is not None else i)) for i in range(n)]


def random_logits(n=8, vocab=100, seed=0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits()
    tokens, _ = sample(logits.clone(), rows(8, temperature=0))
    assert tokens == logits.argmax(dim=-1).tolist()


def test_bf16_logits_give_the_tokens_and_logprobs_of_their_float32_values(monkeypatch):
    """The model hands bf16 logits over: a plain greedy batch takes its argmax from them without a
    float32 copy; penalties and logprobs work on float32. Either way, as if given the float32 values."""
    logits = random_logits().to(torch.bfloat16)
    copies = []
    original = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda self: copies.append(self.dtype) or original(self))
    tokens, _ = sample(logits.clone(), rows(8, temperature=0))
    assert tokens == original(logits).argmax(dim=-1).tolist() and copies == []
    for kw in (dict(logprobs=2), dict(frequency_penalty=1.0, outputs=[int(t) for t in tokens])):
        got = sample(logits.clone(), rows(8, temperature=0, **kw))
        want = sample(original(logits), rows(8, temperature=0, **kw))
        assert got == want and copies and copies[0] == torch.bfloat16
        copies.clear()


def test_top_k_one_equals_greedy():
    logits = random_logits()
    tokens, _ = sample(logits.clone(), rows(8, temperature=1.5, top_k=1))
    assert tokens == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_and_full_min_p_keep_only_the_best():
    logits = random_logits()
    assert sample(logits.clone(), rows(8, top_p=1e-6))[0] == logits.argmax(dim=-1).tolist()
    assert sample(logits.clone(), rows(8, min_p=1.0))[0] == logits.argmax(dim=-1).tolist()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = random_logits(1).expand(4, -1).clone()
    draws = [sample(logits.clone(), rows(4, seed=s))[0] for s in (11, 11, 12)]
    assert draws[0] == draws[1]
    flat = torch.zeros(1, 100)
    many = [sample(flat.clone(), rows(1, seed=s))[0][0] for s in range(20)]
    assert len(set(many)) > 5  # different seeds draw different tokens


def test_temperature_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen_rows = rows(1, seed=3)
    counts = [0, 0, 0]
    for _ in range(3000):
        counts[sample(logits.clone(), gen_rows)[0][0]] += 1
    assert counts[0] / 3000 == pytest.approx(0.7, abs=0.03)
    assert counts[2] / 3000 == pytest.approx(0.1, abs=0.02)


def test_top_k_restricts_to_the_k_best():
    logits = random_logits(1, vocab=50)
    best3 = set(logits[0].topk(3).indices.tolist())
    seen = {sample(logits.clone(), rows(1, seed=s, temperature=5.0, top_k=3))[0][0] for s in range(200)}
    assert seen <= best3 and len(seen) == 3


def test_top_p_keeps_the_smallest_covering_set():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample(logits.clone(), rows(1, seed=s, top_p=0.75))[0][0] for s in range(300)}
    assert seen == {0, 1}  # 0.5 alone < 0.75, 0.5 + 0.3 covers it


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample(logits.clone(), rows(1, seed=s, min_p=0.25))[0][0] for s in range(300)}
    assert seen == {0, 1, 2}  # 0.05 < 0.25 * 0.5


def test_penalties_push_away_repeated_tokens():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    assert sample(logits.clone(), rows(1, temperature=0, outputs=[0]))[0] == [0]
    assert sample(logits.clone(), rows(1, temperature=0, outputs=[0], presence_penalty=1.0))[0] == [1]
    assert sample(logits.clone(), rows(1, temperature=0, outputs=[0], frequency_penalty=0.3))[0] == [0]
    assert sample(logits.clone(), rows(1, temperature=0, outputs=[0, 0], frequency_penalty=0.3))[0] == [1]


def test_logprobs_are_raw_and_sorted():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    _, lps = sample(logits.clone(), rows(1, temperature=0, logprobs=2, presence_penalty=1.0, outputs=[0]))
    lp = lps[0]
    assert lp.logprob == pytest.approx(math.log(0.3), abs=1e-5)  # token 1 won after the penalty
    assert [t for t, _ in lp.top] == [0, 1]
    assert lp.top[0][1] == pytest.approx(math.log(0.5), abs=1e-5)


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 0), ("top_k", -2), ("min_p", 2),
                                         ("max_tokens", 0), ("n", 0), ("presence_penalty", 3),
                                         ("logprobs", 21), ("stop", [""])])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and field in str(e.value)


class AllowOnly:
    """A stand-in grammar that allows a fixed set of tokens."""

    def __init__(self, allowed):
        self.allowed = allowed

    def fill_bitmask(self, pointer, num_bytes):
        words = torch.zeros(num_bytes // 4, dtype=torch.int32)
        for t in self.allowed:
            words[t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)
        torch.frombuffer((torch.ctypes.c_char * num_bytes).from_address(pointer), dtype=torch.int32).copy_(words)


def shaped(logits, **kw):
    extra = {k: kw.pop(k) for k in ("grammar", "bad_word_ids", "stop_token_ids", "prompt_token_ids", "outputs")
             if k in kw}
    row = SamplingRow(SamplingParams(**kw), list(extra.get("outputs", [])), torch.Generator().manual_seed(0),
                      extra.get("prompt_token_ids", ()), extra.get("grammar"), extra.get("bad_word_ids", ()),
                      frozenset(extra.get("stop_token_ids", ())))
    return sample(logits.clone(), [row])[0][0]


def test_logit_bias_forbids_and_forces():
    logits = random_logits(1)
    best = int(logits.argmax())
    assert shaped(logits, temperature=0, logit_bias={best: -100}) != best
    assert shaped(logits, temperature=0, logit_bias={7: 100}) == 7
    assert shaped(logits, temperature=1.0, seed=3, logit_bias={7: 100}) == 7


def test_allowed_token_ids_and_a_grammar_mask_restrict_the_choice():
    logits = random_logits(1, vocab=100)
    for seed in range(20):
        assert shaped(logits, temperature=1.5, seed=seed, allowed_token_ids=[3, 40, 77]) in {3, 40, 77}
        # bits in the second and fourth int32 words, and a vocabulary that is not a multiple of 32
        assert shaped(logits, temperature=1.5, seed=seed, grammar=AllowOnly([33, 99])) in {33, 99}
    allowed = [3, 40, 77]
    masked = logits[0, allowed]
    assert shaped(logits, temperature=0, allowed_token_ids=allowed) == allowed[int(masked.argmax())]


def test_bad_words_forbid_the_last_token_only_after_the_rest():
    logits = torch.zeros(1, 10)
    logits[0, 5] = 9.0
    logits[0, 6] = 8.0
    assert shaped(logits, temperature=0, bad_word_ids=((5,),)) == 6
    assert shaped(logits, temperature=0, bad_word_ids=((2, 5),), outputs=[1]) == 5  # "2" not generated last
    assert shaped(logits, temperature=0, bad_word_ids=((2, 5),), outputs=[1, 2]) == 6


def test_min_tokens_hold_back_stop_tokens_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 2] = 9.0  # the stop token is the best
    assert shaped(logits, temperature=0, min_tokens=3, stop_token_ids=[2], outputs=[7, 7]) != 2
    assert shaped(logits, temperature=0, min_tokens=3, stop_token_ids=[2], outputs=[7, 7, 7]) == 2


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    # token 0 seen: 2.0 / 2 = 1.0 < 1.9
    assert shaped(logits, temperature=0, repetition_penalty=2.0, prompt_token_ids=[0]) == 1
    # negative logits: -1.0 * 2 = -2.0 falls below -1.1
    only_negative = torch.tensor([[-1.0, -1.1]])
    assert shaped(only_negative, temperature=0, repetition_penalty=2.0, outputs=[0]) == 1
