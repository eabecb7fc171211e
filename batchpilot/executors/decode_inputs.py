"""The int64 inputs of a decode-only step, in buffers made once and filled through numpy."""

from __future__ import annotations

import torch

from batchpilot.engine.outputs import ScheduledRequest


class DecodeInputs:
    """Token ids, positions, cache slots, context lengths and block tables of a step whose every row decodes one
    token. A torch.tensor built from a list per input cost ~15 us each from the caches the weights' stream
    left cold, five a step (docs/reproduction.md); numpy writes the same lists into the buffers in a few us.
    The tables are [rows, width], width the most blocks any sequence has needed (grown as needed): the native
    attention takes the width as the tables' stride and reads only a row's own blocks, so a row's entries past
    them may be left from another step. The tensors a fill returns are these buffers: valid until the next."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.rows = self.width = 0
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}

    def _grow(self, rows: int, width: int) -> None:
        """New buffers for at least `rows` rows of `width` blocks, geometrically, so growth is rare."""
        self.rows, self.width = max(rows, 2 * self.rows), max(width, 2 * self.width)
        with torch.inference_mode(False):  # usable in and out of inference mode
            self._columns = torch.zeros(4, self.rows, dtype=torch.long)  # tokens, positions, slots, lengths
            self._tables = torch.zeros(self.rows, self.width, dtype=torch.long)
        self._columns_np, self._tables_np = self._columns.numpy(), self._tables.numpy()
        self._views.clear()

    def fill(self, decodes: list[ScheduledRequest]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """token_ids [B], positions [B], slot_mapping [B], decode_tables [B, width], decode_lens [B] of the
        decodes in order (each computes the token at position s.start)."""
        n, bs = len(decodes), self.block_size
        positions = [s.start for s in decodes]
        blocks = [p // bs + 1 for p in positions]  # the blocks each context needs, its new token's included
        if n > self.rows or max(blocks) > self.width:
            self._grow(n, max(blocks))
        columns = self._columns_np
        columns[0, :n] = [s.request.token_ids(p, p + 1)[0] for s, p in zip(decodes, positions)]
        columns[1, :n] = positions
        columns[2, :n] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(decodes, positions)]
        columns[3, :n] = [p + 1 for p in positions]
        for row, s, k in zip(self._tables_np, decodes, blocks):
            row[:k] = s.block_table[:k]
        views = self._views.get(n)
        if views is None:
            c = self._columns
            views = self._views[n] = (c[0, :n], c[1, :n], c[2, :n], self._tables[:n], c[3, :n])
        return views
