"""The public op: argument checking, backend dispatch (in this one place) and autograd."""

from __future__ import annotations

import os
from types import ModuleType

import torch

from swattn.ops import blocked, cpu
from swattn.ops.validate import Problem, check_problem

BACKENDS = ("auto", "cpu", "blocked")


def _select_backend(name: str | None, q: torch.Tensor) -> ModuleType:
    """Gives the backend module for a call; ``auto`` prefers the compiled CPU kernel."""
    name = name or os.environ.get("SWATTN_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "blocked":
        return blocked
    usable = q.device.type == "cpu" and q.dtype in cpu.DTYPES
    if name == "cpu":
        if not usable:
            raise ValueError(f"backend 'cpu' takes CPU tensors in {cpu.DTYPES}, got {q.dtype} on {q.device}")
        cpu.load()  # raises with the compiler's message if the kernel cannot be built
        return cpu
    return cpu if usable and cpu.available() else blocked


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Gives t, or a contiguous copy unless each (batch, head) slice is already contiguous."""
    seq, dim = t.shape[-2], t.shape[-1]
    if (dim == 1 or t.stride(-1) == 1) and (seq == 1 or t.stride(-2) == dim):
        return t
    return t.contiguous()


class _SlidingWindowAttention(torch.autograd.Function):
    """Autograd wrapper: saves only q, k, v, the output and the per-row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, problem: Problem, backend: ModuleType):  # noqa: D102
        out, lse = backend.forward(q, k, v, problem)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem = problem
        ctx.backend = backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: D102
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(q, k, v, out, lse, dout.contiguous(), ctx.problem)
        return dq, dk, dv, None, None


def sliding_window_attention(
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
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gives exact causal sliding-window attention, in O(n * window) time and memory.

    Query ``i`` sees key ``j`` iff ``pos(i) - window < pos(j) <= pos(i)``: ``window`` keys,
    itself included (the Gemma / Hugging Face / llama.cpp convention; flash-attn's
    ``window_size=(window - 1, 0)``). For ``window=3``::

        key ->   0 1 2 3 4 5
        q 0      x . . . . .
        q 1      x x . . . .
        q 2      x x x . . .
        q 3      . x x x . .
        q 4      . . x x x .
        q 5      . . . x x x

    Without positions the ``q_len`` queries are the last ``q_len`` of the ``k_len`` keys
    (as in flash-attn): what chunked prefill and decoding need. With ``q_pos``/``k_pos`` the
    mask is positional: keys may come in any order (an unrotated ring buffer), ``-1`` marks
    an empty slot, and rows of a batch may be left-padded. A query that sees no key gets
    zeros (and ``lse = -inf``), never NaN.

    Args:
        q: ``(batch, heads, q_len, head_dim)``, float32, bfloat16, float16 (or float64).
        k: ``(batch, heads_kv, k_len, head_dim)`` with ``heads % heads_kv == 0``
            (grouped-query attention; K/V are never repeated).
        v: same shape as k.
        window: keys seen per query, an int >= 1; None for full causal attention.
        softcap: None, or > 0: scores become ``softcap * tanh(score / softcap)`` after
            scaling, before masking (Gemma 2).
        scale: score scale; None means ``head_dim ** -0.5`` (Gemma passes
            ``query_pre_attn_scalar ** -0.5``).
        q_pos: optional int positions ``(batch, q_len)`` (or ``(q_len,)``), given with k_pos.
        k_pos: optional int positions ``(batch, k_len)`` (or ``(k_len,)``); negative = empty.
        return_lse: also return the per-row log-sum-exp (natural log) of the visible
            scores, ``(batch, heads, q_len)`` float32, to merge partial results.
        backend: ``"auto"`` (default; the compiled CPU kernel where it applies, else the
            portable blocked one), ``"cpu"`` or ``"blocked"``. The environment variable
            ``SWATTN_BACKEND`` sets the default.

    Returns:
        ``out`` of shape ``(batch, heads, q_len, head_dim)`` in q's dtype, or
        ``(out, lse)`` with ``return_lse``. Differentiable in q, k and v.

    Raises:
        TypeError, ValueError: bad input, naming the argument at fault.
    """
    problem = check_problem(q, k, v, window, softcap, scale, q_pos, k_pos)
    impl = _select_backend(backend, q)
    # K/V may be a prefix of a larger buffer (a cache): copy only if a head's rows are not contiguous
    q, k, v = q.contiguous(), _rows_contiguous(k), _rows_contiguous(v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _SlidingWindowAttention.apply(q, k, v, problem, impl)
    else:
        out, lse = impl.forward(q, k, v, problem)
    return (out, lse) if return_lse else out


def merge_partials(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attentions of the same queries over disjoint key sets.

    Args:
        o1, o2: outputs ``(batch, heads, q_len, head_dim)``; l1, l2: their log-sum-exps
            ``(batch, heads, q_len)`` (``return_lse=True``; -inf where a row sees no key).

    Returns:
        ``(out, lse)`` over the union of the key sets, out in float32 (zeros and -inf for rows
        that see no key in either).
    """
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows that see no key at all
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    total = w1 + w2
    lse = torch.where(total > 0, m + torch.log(total), torch.full_like(m, float("-inf")))
    denom = torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    out = (o1.float() * w1.unsqueeze(-1) + o2.float() * w2.unsqueeze(-1)) / denom
    return out, lse
