"""Packing: rollouts of different lengths in fixed-length rows, one segment per rollout.

A rollout row `[P + N]` (docs/architecture.md, "Sequences") holds its real tokens in columns
`[P - prompt_length, P + response_length)`; the rest is padding that scoring and the train step compute anyway.
Packing copies each rollout's real tokens, in order, into rows of `row_length` columns (first-fit decreasing: the
longest rollouts first, each into the first row with room), and marks them with a segment id (1, 2, ... within a
row; 0 on padding) and RoPE positions that restart at 0 in every segment. The decoder's attention keeps every
segment to itself (`Decoder.__call__(..., segment_ids=...)`), so each token's output is the one it has unpacked.

The shift carries over: in a packed row, column c predicts column c + 1, and a response token's predecessor is
always in its own segment (a rollout starts with at least one prompt token); the last column of a segment predicts
the next segment's first (prompt) token, which carries no loss. So the losses run on packed rows as on rollouts
with a prompt length of 1, and sum to the same token-mean.

Everything here is host-side NumPy: the plan depends on the lengths, which are known after the rollouts.
"""

import math
from typing import NamedTuple

import numpy as np


class Plan(NamedTuple):
    """Where each rollout goes: rollout r's real tokens fill `row[r]`, columns `[start[r], start[r] + length[r])`.

    row, start, length, first: [R] int; first[r] is the column of rollout r's first real token in its own `[P + N]`
    row. num_rows and row_length: the packed shape.
    """

    row: np.ndarray
    start: np.ndarray
    length: np.ndarray
    first: np.ndarray
    num_rows: int
    row_length: int


def plan(input_mask: np.ndarray, row_length: int, *, multiple_of: int = 1) -> Plan:
    """First-fit decreasing packing of the rows of `input_mask` [R, S] (1 on real tokens, one contiguous block per row).

    `row_length` is the packed row's columns (at least the longest rollout); the number of rows is rounded up to a
    multiple of `multiple_of` (e.g. the batch shards, or the micro-batch size) with empty rows.
    """
    input_mask = np.asarray(input_mask).astype(bool)
    lengths = input_mask.sum(axis=1).astype(np.int64)
    first = np.where(lengths > 0, input_mask.argmax(axis=1), 0)
    if lengths.max(initial=0) > row_length:
        raise ValueError(f'row_length={row_length} is shorter than the longest rollout ({lengths.max()} tokens).')
    row = np.zeros(len(lengths), np.int64)
    start = np.zeros(len(lengths), np.int64)
    used: list[int] = []
    for r in np.argsort(-lengths, kind='stable'):
        i = next((j for j, filled in enumerate(used) if filled + lengths[r] <= row_length), len(used))  # first fit
        if i == len(used):
            used.append(0)
        row[r], start[r] = i, used[i]
        used[i] += lengths[r]
    num_rows = max(1, -(-len(used) // multiple_of) * multiple_of)
    return Plan(row=row, start=start, length=lengths, first=first, num_rows=num_rows, row_length=row_length)


def bucket_rows(num_rows: int, multiple_of: int, per_doubling: int, maximum: int) -> int:
    """The packed row count to compile for: `num_rows` rounded up to `multiple_of * u`, u the smallest of
    `ceil(2 ** (i / per_doubling))` (i = 0, 1, ...) that is large enough, and at most `maximum` (a multiple of
    `multiple_of`). So a run compiles at most about `per_doubling * log2(maximum / multiple_of) + 2` shapes, each at
    most `2 ** (1 / per_doubling)` times the rows needed (19% for 4). `per_doubling=0`: every multiple of
    `multiple_of` is a bucket."""
    units = max(1, -(-num_rows // multiple_of))
    if per_doubling > 0:
        i = 0
        while math.ceil(2.0 ** (i / per_doubling)) < units:
            i += 1
        units = math.ceil(2.0 ** (i / per_doubling))
    return min(units * multiple_of, maximum)


def pack(arrays: dict[str, np.ndarray], p: Plan, fill: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Packs `[R, S]` arrays by the plan into `[num_rows, row_length]` ones (padding: 0, or `fill[name]`), adding
    `segment_ids` (1-based within a row, 0 on padding) and `positions` (0-based within each segment)."""
    fill = fill or {}
    out = {}
    for name, x in arrays.items():
        x = np.asarray(x)
        packed = np.full((p.num_rows, p.row_length), fill.get(name, 0), x.dtype)
        for r in range(len(p.row)):
            packed[p.row[r], p.start[r] : p.start[r] + p.length[r]] = x[r, p.first[r] : p.first[r] + p.length[r]]
        out[name] = packed
    segment_ids = np.zeros((p.num_rows, p.row_length), np.int32)
    positions = np.zeros((p.num_rows, p.row_length), np.int32)
    order = np.lexsort((p.start, p.row))
    segment = np.zeros(len(p.row), np.int32)
    for i, r in enumerate(order):
        segment[r] = 1 if i == 0 or p.row[order[i - 1]] != p.row[r] else segment[order[i - 1]] + 1
    for r in range(len(p.row)):
        columns = slice(p.start[r], p.start[r] + p.length[r])
        segment_ids[p.row[r], columns] = segment[r]
        positions[p.row[r], columns] = np.arange(p.length[r])
    out['segment_ids'] = segment_ids
    out['positions'] = positions
    return out
