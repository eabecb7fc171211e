"""The decode-only step's inputs, filled into buffers made once (executors/decode_inputs.py)."""

from batchpilot.engine.outputs import ScheduledRequest
from batchpilot.engine.request import Request
from batchpilot.executors.decode_inputs import DecodeInputs
from batchpilot.sampling_params import SamplingParams


def _decode(rid: str, prompt: list[int], outputs: list[int], table: list[int]) -> ScheduledRequest:
    """A request whose next step computes its last token (position len(prompt) + len(outputs) - 1)."""
    req = Request(rid, prompt, SamplingParams(max_tokens=100), 0.0)
    req.output_token_ids.extend(outputs)
    return ScheduledRequest(req, len(prompt) + len(outputs) - 1, 1, table, True)


def test_decode_inputs_hold_each_rows_token_position_slot_length_and_blocks():
    inputs = DecodeInputs(block_size=4)
    a = _decode("a", [11, 12, 13], [14, 15], [7, 2])  # position 4: block 1 (id 2), slot 2 * 4 + 0
    b = _decode("b", [21, 22], [], [5])  # a prompt's last token again (a recompute ended): position 1
    tokens, positions, slots, tables, lens = inputs.fill([a, b])
    assert tokens.tolist() == [15, 22] and positions.tolist() == [4, 1]
    assert slots.tolist() == [8, 21] and lens.tolist() == [5, 2]
    assert tables.shape[0] == 2 and tables[0, :2].tolist() == [7, 2] and tables[1, 0].item() == 5


def test_decode_inputs_grow_for_more_rows_and_longer_tables_and_reuse_their_memory():
    inputs = DecodeInputs(block_size=2)
    first = inputs.fill([_decode("a", [1, 2], [3], [4, 9])])
    again = inputs.fill([_decode("b", [5], [6], [8])])
    assert [t.data_ptr() for t in first] == [t.data_ptr() for t in again]  # the same memory step after step
    assert again[0].tolist() == [6] and again[2].tolist() == [8 * 2 + 1] and again[3][0, 0].item() == 8
    long = _decode("c", list(range(9)), [99], [30, 31, 32, 33, 34, 35])  # position 9: block 4 of 5 needed
    rows = [long] + [_decode(f"r{i}", [i], [i + 100], [40 + i]) for i in range(4)]
    tokens, positions, slots, tables, lens = inputs.fill(rows)
    assert inputs.rows >= 5 and inputs.width >= 5 and tables.shape == (5, inputs.width)
    assert tokens.tolist() == [99, 100, 101, 102, 103] and positions.tolist() == [9, 1, 1, 1, 1]
    assert tables[0, :5].tolist() == [30, 31, 32, 33, 34] and [t[0].item() for t in tables[1:]] == [40, 41, 42, 43]
    assert slots.tolist() == [34 * 2 + 1] + [(40 + i) * 2 + 1 for i in range(4)] and lens.tolist() == [10, 2, 2, 2, 2]
