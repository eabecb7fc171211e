"""batchpilot: an LLM inference server that sizes every batch itself."""

from batchpilot.engine.output_processor import CompletionOutput, RequestOutput
from batchpilot.llm import LLM
from batchpilot.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
