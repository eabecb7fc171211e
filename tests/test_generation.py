"""Stopping, seeds and n on the real default model (float32)."""

import pytest

from batchpilot import SamplingParams

PROMPT = "Once upon a time, there was a robot who"


def greedy(llm, **kw):
    return llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw))[0].outputs[0]


def test_stop_string_is_cut_and_never_leaks(llm_fp32):
    full = greedy(llm_fp32)
    words = full.text.split(" ")
    stop = " " + words[4]
    expect = full.text[: full.text.index(stop)]
    out = greedy(llm_fp32, stop=[stop, "zzzz-never"])
    assert out.text == expect and out.finish_reason == "stop"
    assert stop not in out.text
    kept = greedy(llm_fp32, stop=stop, include_stop_str_in_output=True)
    assert kept.text == expect + stop


def test_stop_token_id_ends_generation(llm_fp32):
    full = greedy(llm_fp32)
    stop_id = full.token_ids[3]
    out = greedy(llm_fp32, stop_token_ids=[stop_id])
    first = full.token_ids.index(stop_id)
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_max_tokens_gives_length(llm_fp32):
    out = llm_fp32.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_eos_stops_unless_ignored(llm_fp32):
    chat = [{"role": "user", "content": "Say hello."}]
    out = llm_fp32.chat(chat, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2 and "<|im_end|>" not in out.text
    out = llm_fp32.chat(chat, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 64


def test_seeded_sampling_does_not_depend_on_the_batch(llm_fp32):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm_fp32.generate(PROMPT, params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=20)
    batch = llm_fp32.generate(["Hello there", PROMPT, "1 2 3"], [others, params, others])
    assert batch[1].outputs[0].token_ids == alone


def test_n_returns_distinct_samples(llm_fp32):
    out = llm_fp32.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1


def test_top_k_one_equals_greedy_on_the_model(llm_fp32):
    params = SamplingParams(temperature=0.9, top_k=1, max_tokens=24, seed=3, ignore_eos=True)
    assert llm_fp32.generate(PROMPT, params)[0].outputs[0].token_ids == greedy(llm_fp32).token_ids


def test_defaults_come_from_the_models_generation_config(llm_fp32):
    params = llm_fp32.default_sampling_params()  # SmolLM2-Instruct's recommended sampling
    assert (params.temperature, params.top_p) == (0.2, 0.9)
    assert llm_fp32.engine.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}


def test_prompts_in_vllms_dict_forms_give_the_same_text_and_bad_ones_name_the_field(llm_fp32):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ids = llm_fp32.tokenizer.encode(PROMPT)
    plain = llm_fp32.generate(PROMPT, params)[0].outputs[0].text
    outs = llm_fp32.generate([{"prompt": PROMPT}, {"prompt_token_ids": ids}], params)
    assert [o.outputs[0].text for o in outs] == [plain, plain]
    assert llm_fp32.generate({"prompt_token_ids": ids}, params)[0].outputs[0].text == plain
    for bad in ({"text": PROMPT}, [PROMPT, 3.5], [[1, "2"]]):
        with pytest.raises(ValueError, match="prompts"):
            llm_fp32.generate(bad, params)
