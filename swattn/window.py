"""The one definition of which keys a query sees.

``window=W`` (an int >= 1) means the query at absolute position ``i`` sees the key at
absolute position ``j`` iff ``i - W < j <= i``: W keys, itself included. This is the
convention of Hugging Face transformers (``sliding_window=W``), the Gemma reference code
and llama.cpp (``n_swa``); flash-attn's ``window_size=(W - 1, 0)`` is the same set.
``window=None`` means full causal attention (``j <= i``). A key at a negative position is
an empty slot (padding, or a cache slot not yet written) and is seen by no query.

Picture for ``window=3`` over 6 positions (``x`` = visible)::

    key j ->    0 1 2 3 4 5
    query 0     x . . . . .
    query 1     x x . . . .
    query 2     x x x . . .
    query 3     . x x x . .
    query 4     . . x x x .
    query 5     . . . x x x
"""

from __future__ import annotations

import torch


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Gives the boolean mask of keys each query sees.

    Args:
        q_pos: integer positions of the queries, ``(..., q_len)``.
        k_pos: integer positions of the keys, ``(..., k_len)``; negative marks an empty slot.
        window: keys seen per query (itself included), or None for full causal attention.

    Returns:
        ``(..., q_len, k_len)`` bool tensor, True where the key is visible to the query.
    """
    qp = q_pos.unsqueeze(-1)
    kp = k_pos.unsqueeze(-2)
    mask = (kp >= 0) & (kp <= qp)
    if window is not None:
        mask = mask & (kp > qp - window)
    return mask


def default_positions(
    batch: int, q_len: int, k_len: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives the positions implied when none are passed: queries are the last keys.

    The ``q_len`` queries sit at positions ``k_len - q_len .. k_len - 1`` and the keys at
    ``0 .. k_len - 1``, as in flash-attn; this is what chunked prefill and decoding need.

    Returns:
        ``(q_pos, k_pos)`` int64 tensors of shape ``(batch, q_len)`` and ``(batch, k_len)``.
    """
    k_pos = torch.arange(k_len, device=device, dtype=torch.int64)
    q_pos = k_pos[k_len - q_len :]
    return q_pos.expand(batch, q_len), k_pos.expand(batch, k_len)
