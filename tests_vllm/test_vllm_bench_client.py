"""vLLM's own benchmark client (`vllm bench serve`, as shipped in the vLLM venv) against `batchpilot serve`.

It must run without `--model` (it reads the model and its tokenizer path from /v1/models), on the
random and ShareGPT datasets, and its numbers must agree with `batchpilot bench serve` on the
same workload against the same server.
"""

import json
import subprocess
import sys

import httpx
import pytest

from batchpilot.bench.compare import VLLM_BENCH_CLIENT
from batchpilot.bench.servers import server

NUM_PROMPTS = 12
OUTPUT_LEN = 16

SENTENCES = [
    "Explain why the sky is blue in two sentences.", "Write a haiku about autumn leaves falling.",
    "What is the difference between a list and a tuple in Python?", "Give three tips for a job interview.",
    "Describe the water cycle to a ten year old.", "Why do cats purr? Answer briefly.",
    "Summarise the plot of Romeo and Juliet.", "How does a bicycle stay upright when moving?",
    "List four uses of baking soda at home.", "What causes the seasons on Earth?",
    "Suggest a name for a friendly robot and say why.", "How do vaccines train the immune system?",
]


def sharegpt_file(path):
    """NUM_PROMPTS conversations that pass both clients' filters (4+ tokens each side), so both use all."""
    rows = [{"id": str(i), "conversations": [
        {"from": "human", "value": q},
        {"from": "gpt", "value": "Here is a short answer that runs for a little while, long enough to count. " * 2},
    ]} for i, q in enumerate(SENTENCES)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def batchpilot_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("bp") / "server.log"
    cmd = [sys.executable, "-m", "batchpilot.cli", "serve", "--max-model-len", "1024", "--threads", "2"]
    with server(cmd, log, timeout=600) as (url, _):
        yield url


def run(args, timeout=600):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def vllm_bench(url, tmp_path, name, *args):
    run([sys.executable, "-c", VLLM_BENCH_CLIENT, "--base-url", url, "--num-prompts", str(NUM_PROMPTS), "--ignore-eos",
         "--temperature", "0", "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
         "--result-filename", name, *args])
    return json.loads((tmp_path / name).read_text())


def batchpilot_bench(url, tmp_path, name, *args):
    run([sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", url, "--num-prompts",
         str(NUM_PROMPTS), "--ignore-eos", "--disable-tqdm", "--save-result", "--result-dir", str(tmp_path),
         "--result-filename", name, *args])
    return json.loads((tmp_path / name).read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def agree(ours, theirs):
    """The same requests counted the same way; timing within what two back-to-back runs differ by here."""
    assert ours["completed"] == theirs["completed"] == NUM_PROMPTS and ours["failed"] == theirs["failed"] == 0
    assert ours["total_output_tokens"] == theirs["total_output_tokens"]
    assert sorted(ours["output_lens"]) == sorted(theirs["output_lens"])
    for key in ("output_throughput", "mean_tpot_ms"):
        assert 0.6 < ours[key] / theirs[key] < 1.6, (key, ours[key], theirs[key])
    print(f"{'':>22}{'vllm bench':>14}{'batchpilot bench':>18}")
    for key in ("duration", "output_throughput", "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms"):
        print(f"{key:>22}{theirs[key]:>14.2f}{ours[key]:>18.2f}")


def test_vllm_bench_random_dataset_without_model(batchpilot_server, tmp_path):
    theirs = vllm_bench(batchpilot_server, tmp_path, "vllm.json", "--dataset-name", "random",
                        "--random-input-len", "64", "--random-output-len", str(OUTPUT_LEN))
    card = httpx.get(f"{batchpilot_server}/v1/models").json()["data"][0]
    assert theirs["model_id"] == card["root"]  # found on the server, not given with --model
    assert theirs["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    ours = batchpilot_bench(batchpilot_server, tmp_path, "ours.json", "--dataset-name", "random",
                            "--random-input-len", "64", "--random-output-len", str(OUTPUT_LEN))
    assert ours["total_input_tokens"] == theirs["total_input_tokens"] == NUM_PROMPTS * 64
    agree(ours, theirs)


def test_vllm_bench_sharegpt_dataset_without_model(batchpilot_server, tmp_path):
    data = sharegpt_file(tmp_path / "sharegpt.json")
    theirs = vllm_bench(batchpilot_server, tmp_path, "vllm.json", "--dataset-name", "sharegpt",
                        "--dataset-path", str(data))
    ours = batchpilot_bench(batchpilot_server, tmp_path, "ours.json", "--dataset-name", "sharegpt",
                            "--dataset-path", str(data))
    assert ours["total_input_tokens"] == theirs["total_input_tokens"]
    agree(ours, theirs)
