"""Argument checking shared by every attention entry point (fast paths and the oracle).

Every error names the argument at fault, so a user knows what to fix without reading code.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from swattn import dtypes

FLOAT_DTYPES = dtypes.ATTENTION


@dataclass(frozen=True)
class Problem:
    """A checked attention call: shapes, and the normalised options."""

    batch: int
    heads: int
    heads_kv: int
    q_len: int
    k_len: int
    head_dim: int
    window: int | None
    softcap: float | None
    scale: float
    q_pos: torch.Tensor | None  # (batch, q_len) int64, or None for the default alignment
    k_pos: torch.Tensor | None  # (batch, k_len) int64

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.heads_kv


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions (batch, heads, seqlen, head_dim), got shape {tuple(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    return t


def _check_positions(name: str, pos: object, batch: int, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(pos).__name__}")
    if pos.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must have an integer dtype (int64 or int32), got {pos.dtype}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but q is on {device}")
    if pos.dim() == 1:
        pos = pos.unsqueeze(0).expand(batch, -1)
    if pos.dim() != 2 or pos.shape[0] != batch or pos.shape[1] != length:
        raise ValueError(f"{name} must have shape ({batch}, {length}) or ({length},), got {tuple(pos.shape)}")
    return pos.to(torch.int64).contiguous()


def check_window(window: object) -> int | None:
    """Returns ``window`` checked: an int >= 1, or None for full causal attention."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an int >= 1 or None, got {type(window).__name__} {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (the number of keys a query sees, itself included), got {window}")
    return int(window)


def check_softcap(softcap: object) -> float | None:
    """Returns ``softcap`` checked: None, or a finite number > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a number > 0 or None, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be finite and > 0, got {softcap}")
    return float(softcap)


def check_problem(
    q: object,
    k: object,
    v: object,
    window: object,
    softcap: object = None,
    scale: object = None,
    q_pos: object = None,
    k_pos: object = None,
) -> Problem:
    """Checks an attention call and gives its normalised description.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: inconsistent shapes, devices, head counts or option values.
    """
    q = _check_tensor("q", q)
    k = _check_tensor("k", k)
    v = _check_tensor("v", v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; pass q, k, v in one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    k_batch, heads_kv, k_len, k_dim = k.shape
    if k_batch != batch:
        raise ValueError(f"batch size of k/v ({k_batch}) differs from q's ({batch})")
    if k_dim != head_dim:
        raise ValueError(f"head_dim of k/v ({k_dim}) differs from q's ({head_dim})")
    if head_dim == 0:
        raise ValueError("head_dim must be >= 1")
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(
            f"q's heads ({heads}) must be a multiple of k/v's heads_kv ({heads_kv}) for grouped-query attention"
        )
    window = check_window(window)
    softcap = check_softcap(softcap)
    if scale is None:
        scale = head_dim**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos and k_pos must be given together (or neither)")
    if q_pos is None:
        if q_len > k_len:
            raise ValueError(
                f"q_len ({q_len}) > k_len ({k_len}): without positions the queries are the last "
                "q_len of the keys; pass q_pos and k_pos for any other alignment"
            )
    else:
        q_pos = _check_positions("q_pos", q_pos, batch, q_len, q.device)
        k_pos = _check_positions("k_pos", k_pos, batch, k_len, q.device)
    return Problem(batch, heads, heads_kv, q_len, k_len, head_dim, window, softcap, float(scale), q_pos, k_pos)
