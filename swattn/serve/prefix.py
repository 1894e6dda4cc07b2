"""Saved cache states at prefix boundaries, for reuse across requests, within a memory budget.

A local layer's ring holds only its last ``window`` tokens, so a prefix that has slid out of
it cannot be reused from a live cache: a later request that shares the prefix needs the
caches as they were right after it. :class:`PrefixStore` keeps such snapshots (llama.cpp's
"SWA checkpoints"), keyed by the exact token prefix, evicting the least recently used ones
beyond its budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from swattn.cache import CacheState


def state_bytes(state: Sequence[CacheState]) -> int:
    """Bytes held by a saved model cache state."""
    return sum(t.numel() * t.element_size() for layer in state for t in layer.tensors)


@dataclass
class Snapshot:
    """The caches of one sequence right after its first ``length`` tokens."""

    length: int
    state: tuple[CacheState, ...]
    nbytes: int


class PrefixStore:
    """Snapshots by token prefix, least recently used evicted beyond ``budget_bytes``.

    Args:
        budget_bytes: memory for all snapshots together (0 turns reuse off).
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._items: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self.nbytes = 0
        self.lengths: dict[int, int] = {}  # prefix length -> how many snapshots have it

    def __len__(self) -> int:
        return len(self._items)

    def put(self, tokens: Sequence[int], state: tuple[CacheState, ...]) -> bool:
        """Keeps the state after ``tokens``; False when it alone exceeds the budget (or is already kept)."""
        key = tuple(tokens)
        size = state_bytes(state)
        if key in self._items:
            self._items.move_to_end(key)
            return False
        if size > self.budget:
            return False
        while self.nbytes + size > self.budget and self._items:
            self._evict()
        self._items[key] = Snapshot(len(key), state, size)
        self.nbytes += size
        self.lengths[len(key)] = self.lengths.get(len(key), 0) + 1
        return True

    def has(self, tokens: Sequence[int]) -> bool:
        return tuple(tokens) in self._items

    def longest(self, tokens: Sequence[int], below: int) -> Snapshot | None:
        """The snapshot of the longest stored prefix of ``tokens`` shorter than ``below`` tokens."""
        for length in sorted(self.lengths, reverse=True):
            if length < below and length <= len(tokens):
                key = tuple(tokens[:length])
                found = self._items.get(key)
                if found is not None:
                    self._items.move_to_end(key)
                    return found
        return None

    def _evict(self) -> None:
        key, old = self._items.popitem(last=False)
        self.nbytes -= old.nbytes
        self.lengths[len(key)] -= 1
        if not self.lengths[len(key)]:
            del self.lengths[len(key)]
