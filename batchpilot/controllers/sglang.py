"""SGLang's admission rule, as a batch limit: the field's strongest production policy, for comparison.

Every running request reserves the output it may still produce, scaled by a ratio that is
optimistic about early stops: min(max_new_tokens, clip) - generated, times `new_token_ratio`.
A waiting request is admitted (in queue order) while its prompt plus its whole clipped
max_new_tokens fits in the free tokens left after those reservations. The ratio starts at
`init_ratio`, falls linearly to init_ratio x min_ratio_factor over `decay_steps` steps, and
jumps back to `init_ratio` when a step had to preempt (SGLang's retract).
"""

from __future__ import annotations

from batchpilot.controllers.base import SchedulerView, StepStats


class SGLangController:
    name = "sglang"

    def __init__(self, init_ratio: float = 0.7, min_ratio_factor: float = 0.14, decay_steps: int = 600,
                 clip_max_new_tokens: int = 4096, min_num_seqs: int = 1, max_num_seqs: int = 256):
        self.init_ratio = init_ratio
        self.min_ratio = init_ratio * min_ratio_factor
        self.decay_per_step = (init_ratio - self.min_ratio) / decay_steps
        self.clip = clip_max_new_tokens
        self.b_min, self.b_max = min_num_seqs, max_num_seqs
        self.ratio = init_ratio
        self.b_mem = max_num_seqs

    @property
    def trace(self) -> dict[str, float]:
        return {"b_mem": self.b_mem, "new_token_ratio": round(self.ratio, 4)}

    def reserved_tokens(self, view: SchedulerView) -> float:
        """Tokens the running requests may still claim: sum of (clipped max_new - generated) x ratio."""
        return self.ratio * sum(max(0.0, min(s.max_output, self.clip) - s.num_output) for s in view.running())

    def limit(self, view: SchedulerView) -> int:
        room = view.num_free_blocks * view.block_size - self.reserved_tokens(view)
        admitted = 0
        if view.num_waiting:
            for s in view.waiting(self.b_max - view.num_running):
                cost = s.num_tokens + min(max(0.0, s.max_output - s.num_output), self.clip)
                if cost > room and (admitted or view.num_running):  # an idle server still admits one
                    break
                room -= cost
                admitted += 1
        self.b_mem = min(max(view.num_running + admitted, self.b_min), self.b_max)
        return self.b_mem

    def observe(self, stats: StepStats) -> None:
        if stats.num_preemptions:
            self.ratio = self.init_ratio
        else:
            self.ratio = max(self.min_ratio, self.ratio - self.decay_per_step)
