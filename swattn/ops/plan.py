"""Which key blocks each query block must visit: the O(n * w) part of every backend.

Without positions the keys a query block sees form one contiguous range, fixed by the
window. With positions (keys in any order, empty slots) a key block is visited when its
range of valid positions can meet the query block's window; the mask inside is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swattn.ops.validate import Problem

_BIG = 1 << 62


@dataclass(frozen=True)
class QueryBlock:
    """Queries ``start:stop`` and the key ranges ``[(k_start, k_stop), ...]`` they visit."""

    start: int
    stop: int
    key_ranges: list[tuple[int, int]]


def _valid_minmax(pos: torch.Tensor, block: int) -> tuple[list[int], list[int]]:
    """Per block of positions (over all batch rows): min and max of the valid (>= 0) ones."""
    batch, length = pos.shape
    nblocks = -(-length // block)
    pad = nblocks * block - length
    padded = torch.nn.functional.pad(pos, (0, pad), value=-1).view(batch, nblocks, block)
    valid = padded >= 0
    lo = torch.where(valid, padded, torch.full_like(padded, _BIG)).amin(dim=(0, 2))
    hi = torch.where(valid, padded, torch.full_like(padded, -_BIG)).amax(dim=(0, 2))
    return lo.tolist(), hi.tolist()  # one host sync per call, not per block


def plan_blocks(p: Problem, block_q: int, block_k: int) -> list[QueryBlock]:
    """Gives the query blocks of a problem and the key ranges each must visit."""
    blocks = []
    if p.q_pos is None:
        offset = p.k_len - p.q_len
        for start in range(0, p.q_len, block_q):
            stop = min(start + block_q, p.q_len)
            k_hi = offset + stop  # exclusive: the last query sees its own key
            k_lo = 0 if p.window is None else max(0, offset + start - p.window + 1)
            ranges = [(j, min(j + block_k, k_hi)) for j in range(k_lo, k_hi, block_k)]
            blocks.append(QueryBlock(start, stop, ranges))
        return blocks

    q_lo, q_hi = _valid_minmax(p.q_pos, block_q)
    k_lo, k_hi = _valid_minmax(p.k_pos, block_k)
    for qb, start in enumerate(range(0, p.q_len, block_q)):
        stop = min(start + block_q, p.q_len)
        ranges = []
        if q_lo[qb] != _BIG:  # some query in the block is real
            earliest = -_BIG if p.window is None else q_lo[qb] - p.window + 1
            for kb, j in enumerate(range(0, p.k_len, block_k)):
                if k_lo[kb] != _BIG and k_hi[kb] >= earliest and k_lo[kb] <= q_hi[qb]:
                    ranges.append((j, min(j + block_k, p.k_len)))
        blocks.append(QueryBlock(start, stop, ranges))
    return blocks
