"""batchpilot: an LLM inference server that sizes every batch itself.

`LLM` (and with it torch) loads on first use, so the engine core, the controllers and the
simulator import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchpilot.sampling_params import SamplingParams

if TYPE_CHECKING:
    from batchpilot.engine.output_processor import CompletionOutput, RequestOutput
    from batchpilot.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from batchpilot.llm import LLM

        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from batchpilot.engine import output_processor

        return getattr(output_processor, name)
    raise AttributeError(f"module 'batchpilot' has no attribute {name!r}")
