import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _threads_restored():
    """Every test starts with TEST_THREADS torch threads: an engine built with `threads=` sets the process's
    count, and a later test whose kernels split work by it would otherwise run with that one."""
    yield
    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def default_model_dir():
    from batchpilot.model.loader import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def llm_fp32(default_model_dir):
    """The default model in float32 with an ample pool, shared by the model tests."""
    from batchpilot import LLM

    return LLM(str(default_model_dir), dtype="float32", kv_cache_gib=0.5)


MODEL_FIXTURES = {"default_model_dir", "llm_fp32"}


def pytest_collection_modifyitems(items):
    """A test that loads the default model is slow, marked or not: `-m "not slow"` stays fast."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
