"""Structured output and the logits options on the real default model, offline (float32)."""

import json

import jsonschema
import pytest

from batchpilot import LLM, SamplingParams
from batchpilot.model.grammar import GrammarError
from batchpilot.sampling_params import SamplingParamsError, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
TOPICS = ["a pirate", "a cook", "a nurse", "a dragon", "a poet", "a child", "a judge", "a clown"]


def chats(llm):
    return [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Describe {t} as JSON."}])
            for t in TOPICS]


def test_json_outputs_validate_and_survive_preemption(llm_fp32, default_model_dir):
    """Greedy constrained outputs are the same on a pool so small that sequences are preempted and
    recomputed (the matcher keeps its state across a preemption), and every block comes back."""
    params = SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    ample = llm_fp32.generate(chats(llm_fp32), params)
    tight = LLM(str(default_model_dir), dtype="float32", kv_cache_gib=0.012)
    squeezed = tight.generate(chats(tight), params)
    assert tight.engine.scheduler.num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in squeezed] == [o.outputs[0].token_ids for o in ample]
    pool = tight.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    for o in ample:
        assert o.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


def test_n_sequences_each_follow_the_grammar(llm_fp32):
    params = SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=10,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta", "gamma"]))
    out = llm_fp32.generate("Pick a Greek letter:", params)[0]
    assert {o.text for o in out.outputs} <= {"alpha", "beta", "gamma"}


def test_allowed_token_ids_and_bad_words_on_the_model(llm_fp32):
    prompt = "Once upon a time, there was a robot who"
    ref = llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    allowed = sorted(set(ref.token_ids[:5]))
    out = llm_fp32.generate(prompt, SamplingParams(temperature=0.9, seed=1, max_tokens=12, ignore_eos=True,
                                                   allowed_token_ids=allowed))[0].outputs[0]
    assert set(out.token_ids) <= set(allowed)
    word = ref.text.split()[2]
    banned = llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                      bad_words=[word]))[0].outputs[0]
    assert f" {word}" not in banned.text and banned.text != ref.text


def test_a_spec_that_does_not_compile_fails_before_anything_runs(llm_fp32):
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(("))
    with pytest.raises(GrammarError):
        llm_fp32.generate(["fine", "also fine"], [SamplingParams(max_tokens=2), bad])
    assert not llm_fp32.engine.has_unfinished_requests()
    with pytest.raises(SamplingParamsError) as e:
        StructuredOutputsParams(regex="a", choice=["b"])
    assert e.value.param == "structured_outputs"
    with pytest.raises(SamplingParamsError) as e:
        llm_fp32.generate("x", SamplingParams(logit_bias={10**9: 1.0}))
    assert e.value.param == "logit_bias"


def test_prompt_logprobs_equal_the_logprobs_of_the_same_tokens_when_generated(llm_fp32):
    """A prompt of 700 tokens (two prefill chunks) then 12 generated ones: asked again as a prompt,
    the last 12 prompt logprobs are the logprobs they had when sampled; a cached prefix is not
    used for them (the whole prompt is computed)."""
    text = " ".join(f"word{i}" for i in range(300))
    prompt = llm_fp32.tokenizer.encode(text)[:700]
    gen = llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2))[0]
    sampled = gen.outputs[0]
    full = prompt + sampled.token_ids
    again = llm_fp32.generate(full, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0]
    lps = again.prompt_logprobs
    assert len(lps) == len(full) and lps[0] is None and again.num_cached_tokens == 0
    for mine, want in zip(lps[-12:], sampled.logprobs):
        assert mine.logprob == pytest.approx(want.logprob, abs=2e-3)
        assert [t for t, _ in mine.top[:2]] == [t for t, _ in want.top]
    assert all(len(lp.top) == 3 for lp in lps[1:])


def test_gbnf_and_lark_grammars_both_compile_and_hold(llm_fp32):
    gbnf = 'root ::= answer " " digit\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    lark = 'start: ANSWER " " DIGIT\nANSWER: "yes" | "no"\nDIGIT: /[0-9]/'
    for grammar in (gbnf, lark):
        out = llm_fp32.generate("Is it raining? Answer and rate:", SamplingParams(
            n=3, temperature=1.0, seed=4, max_tokens=10,
            structured_outputs=StructuredOutputsParams(grammar=grammar)))[0]
        for o in out.outputs:
            assert o.text.split(" ")[0] in ("yes", "no") and o.text[-1].isdigit() and o.finish_reason == "stop"
