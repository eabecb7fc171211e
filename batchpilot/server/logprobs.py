"""Logprobs in the shapes clients read: OpenAI's completions and chat forms, vLLM's prompt_logprobs."""

from __future__ import annotations

from typing import Any

from batchpilot.model.tokenizer import TextTokenizer
from batchpilot.sampling_params import TokenLogprobs


class LogprobFormat:
    """Formats TokenLogprobs with the model's token texts."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, lps: list[TokenLogprobs | None], token_ids: list[int]) -> dict[str, Any]:
        """OpenAI's completions logprobs; a None entry (an echoed prompt's first token) has none."""
        tokens = [self.token_text(t) for t in token_ids[: len(lps)]]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob if lp else None for lp in lps],
            "top_logprobs": [{self.token_text(t): v for t, v in lp.top} if lp else None for lp in lps],
            "text_offset": offsets,
        }

    def vllm_prompt(self, prompt: list[int], lps: list[TokenLogprobs | None] | None) -> list[Any] | None:
        """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} for the token itself and the top alternatives."""
        if lps is None:
            return None
        out: list[Any] = []
        for token, lp in zip(prompt, lps):
            if lp is None:
                out.append(None)
                continue
            entry = {str(token): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": self.token_text(token)}}
            for rank, (t, v) in enumerate(lp.top, 1):
                entry.setdefault(str(t), {"logprob": v, "rank": rank, "decoded_token": self.token_text(t)})
            out.append(entry)
        return out

    def chat(self, lps: list[TokenLogprobs], token_ids: list[int]) -> dict[str, Any]:
        def entry(t: int, v: float) -> dict[str, Any]:
            s = self.token_text(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {"content": [
            {**entry(t, lp.logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
            for t, lp in zip(token_ids, lps)
        ]}
