"""One dataset, one set of requests: the HTTP load generators (bench serve / capacity) and the offline
engine's (bench throughput) take the same flags and build the same requests from them."""

import json
from pathlib import Path

import pytest

from batchpilot.bench.workload import build_payloads, workload_requests
from batchpilot.cli import build_parser

TRACE = Path(__file__).parent / "data" / "azure_code_2023_head300.csv"


class FakeTokenizer:
    """Words as tokens: enough to count and render prompts without loading a model."""

    vocab_size = 1000
    num_added_tokens = 3

    def encode(self, text: str) -> list[int]:
        return [hash(w) % self.vocab_size for w in text.split()]

    def apply_chat_template(self, messages) -> str:
        return "".join(f"<{m['role']}> {m['content']} " for m in messages) + "<assistant>"


def parse(command: str, *flags: str):
    extra = ("--base-url", "http://localhost:1") if command == "serve" else ()
    return build_parser().parse_args(["bench", command, *extra, *flags])


@pytest.mark.parametrize("flags", [
    ("--input-dist", "uniform:8:40", "--output-len", "5"),
    ("--input-len", "20", "--output-len", "9", "--random-range-ratio", "0.5"),
    ("--dataset-name", "builtin", "--output-dist", "uniform:4:64"),
    ("--dataset-name", "trace", "--dataset", str(TRACE), "--trace-duration", "30"),
])
def test_serve_and_throughput_build_the_same_requests(flags):
    tok = FakeTokenizer()
    serve, offline = parse("serve", *flags), parse("throughput", *flags)
    a, eos_a = workload_requests(serve, tok, 12, seed=3)
    b, eos_b = workload_requests(offline, tok, 12, seed=3)
    assert a == b and eos_a == eos_b and len(a) >= 1
    assert all(r.prompt_len == len(r.prompt) for r in a if isinstance(r.prompt, list))


def test_random_lengths_widen_and_always_run_in_full():
    reqs, ignore_eos = workload_requests(parse("throughput", "--input-len", "20", "--output-len", "10",
                                               "--random-range-ratio", "0.5"), FakeTokenizer(), 50, seed=0)
    assert ignore_eos
    assert {r.prompt_len for r in reqs} <= set(range(10, 31)) and len({r.prompt_len for r in reqs}) > 1
    assert all(5 <= r.max_tokens <= 15 for r in reqs)
    assert all(min(r.prompt) >= FakeTokenizer.num_added_tokens for r in reqs)  # no special token ids
    with pytest.raises(ValueError, match="--random-range-ratio"):
        workload_requests(parse("serve", "--random-range-ratio", "1.5"), FakeTokenizer(), 2, seed=0)


def test_builtin_chats_go_as_messages_and_render_locally_for_the_engine():
    args = parse("serve", "--dataset-name", "builtin", "--output-dist", "uniform:4:64", "--ignore-eos")
    reqs, ignore_eos = workload_requests(args, FakeTokenizer(), 6, seed=1)
    assert ignore_eos and len({r.max_tokens for r in reqs}) > 1 and all(4 <= r.max_tokens <= 64 for r in reqs)
    assert all(r.prompt.startswith("<user> ") and r.messages[0]["role"] == "user" for r in reqs)
    payloads = build_payloads(args, FakeTokenizer(), "m", 6, seed=1)
    assert [p.path for p in payloads] == ["/v1/chat/completions"] * 6
    assert [p.body["messages"] for p in payloads] == [r.messages for r in reqs]
    assert all(p.body["ignore_eos"] and p.body["temperature"] == 0.0 for p in payloads)
    uncapped, _ = workload_requests(parse("throughput", "--dataset-name", "builtin"), FakeTokenizer(), 3, seed=1)
    assert {r.max_tokens for r in uncapped} == {512}


def test_trace_requests_keep_their_arrival_times_unless_told_not_to():
    flags = ("--dataset-name", "trace", "--dataset", str(TRACE), "--trace-duration", "30")
    reqs, ignore_eos = workload_requests(parse("serve", *flags), FakeTokenizer(), 100, seed=0)
    times = [r.arrival_s for r in reqs]
    assert ignore_eos and times == sorted(times) and times[0] == 0.0 and times[-1] <= 30
    payloads = build_payloads(parse("serve", *flags), FakeTokenizer(), "m", 100, seed=0)
    assert [p.arrival_s for p in payloads] == times and all(p.body["ignore_eos"] for p in payloads)
    untimed, _ = workload_requests(parse("throughput", *flags, "--ignore-trace-times"), FakeTokenizer(), 100, seed=0)
    assert [r.arrival_s for r in untimed] == [None] * len(reqs)


def test_a_dataset_path_alone_means_sharegpt(tmp_path):
    data = [{"conversations": [{"from": "human", "value": f"question {i} " * 5},
                               {"from": "gpt", "value": f"answer {i} " * 8}]} for i in range(4)]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs, ignore_eos = workload_requests(parse("throughput", "--dataset", str(path)), FakeTokenizer(), 4, seed=0)
    assert not ignore_eos and len(reqs) >= 1 and all(r.prompt.startswith("question") for r in reqs)
    with pytest.raises(ValueError, match="--dataset-path"):
        workload_requests(parse("serve", "--dataset-name", "sharegpt"), FakeTokenizer(), 2, seed=0)
