"""The dense oracle: plain attention with an explicit mask, computed in float64.

This is the truth every fast path is tested against. It materialises the full
``q_len x k_len`` score matrix and repeats K/V heads, so it is for tests and debugging
only; the fast paths never import it.
"""

from __future__ import annotations

import torch

from swattn.ops.validate import check_problem
from swattn.window import default_positions, visible


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    *,
    softcap: float | None = None,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gives exact sliding-window attention by the dense definition.

    Same arguments and result as :func:`swattn.sliding_window_attention`, plus:

    Args:
        compute_dtype: dtype of every intermediate. float64 (the default) is the truth;
            passing the inputs' own low precision gives the error a naive implementation
            makes there, the yardstick low-precision fast paths are judged by.

    Returns:
        ``out`` of shape ``(batch, heads, q_len, head_dim)`` in q's dtype; with
        ``return_lse`` also ``lse`` of shape ``(batch, heads, q_len)`` in float32
        (``-inf`` for a query that sees no key).
    """
    p = check_problem(q, k, v, window, softcap, scale, q_pos, k_pos)
    if p.q_pos is None:
        qp, kp = default_positions(p.batch, p.q_len, p.k_len, q.device)
    else:
        qp, kp = p.q_pos, p.k_pos
    mask = visible(qp, kp, p.window)[:, None]  # (batch, 1, q_len, k_len)

    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    # the oracle may repeat K/V heads: clarity over memory
    kc = kc.repeat_interleave(p.groups, dim=1)
    vc = vc.repeat_interleave(p.groups, dim=1)
    scores = (qc @ kc.transpose(-1, -2)) * p.scale  # (batch, heads, q_len, k_len)
    if p.softcap is not None:
        scores = torch.tanh(scores / p.softcap) * p.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees nothing
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    probs = probs.masked_fill(~mask, 0.0)  # rows with no key become 0, not NaN
    out = (probs @ vc).to(q.dtype)
    if return_lse:
        return out, lse.to(torch.float32)
    return out
