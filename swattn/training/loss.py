"""Cross-entropy of the LM head without the (tokens x vocabulary) logits held at once.

Training a model whose vocabulary dwarfs its width spends most of a step's memory and much
of its time on the logits: tokens x vocab floats, written, soft-capped, soft-maxed and
differentiated as separate whole-tensor passes. Here the head's product, Gemma's final
soft-cap, the log-sum-exp and the gradient are done a chunk of tokens at a time, and the
backward recomputes each chunk's logits rather than storing them (the fused
linear-cross-entropy approach): only ``(tokens,)`` log-sum-exps are kept between the passes.
"""

from __future__ import annotations

import torch

CHUNK = 1024  # tokens per chunk: 1024 x vocab floats at a time


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, dtype):  # noqa: D102
        n = h.shape[0]
        w = weight.to(dtype)
        lse = torch.empty(n, dtype=torch.float32)
        picked = torch.empty(n, dtype=torch.float32)
        for s in range(0, n, CHUNK):
            logits = _capped_logits(h[s : s + CHUNK].to(dtype), w, softcap)[0]
            lse[s : s + CHUNK] = torch.logsumexp(logits, dim=-1)
            picked[s : s + CHUNK] = logits.gather(1, targets[s : s + CHUNK, None]).squeeze(1)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.softcap, ctx.dtype = softcap, dtype
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        h, weight, targets, lse = ctx.saved_tensors
        n, dtype = h.shape[0], ctx.dtype
        w = weight.to(dtype)
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32)
        scale = grad.float() / n
        for s in range(0, n, CHUNK):
            hc = h[s : s + CHUNK].to(dtype)
            logits, t = _capped_logits(hc, w, ctx.softcap)
            # d loss / d capped logits = softmax - one_hot, then through the soft-cap: 1 - tanh^2
            p = logits.sub_(lse[s : s + CHUNK, None]).exp_()
            rows = torch.arange(p.shape[0])
            p[rows, targets[s : s + CHUNK]] -= 1.0
            p.mul_(scale)
            if t is not None:
                p.mul_(1.0 - t.square_())
            pd = p.to(dtype)
            dh[s : s + CHUNK] = (pd @ w).to(h.dtype)
            dw.add_((pd.T @ hc).float())
        return dh, dw.to(weight.dtype), None, None, None


def _capped_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None):
    """float32 logits of a chunk, soft-capped; with a cap also the tanh (for the backward)."""
    logits = (h @ w.T).float()
    if softcap is None:
        return logits, None
    t = logits.div_(softcap).tanh_()
    return t * softcap, t


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``softcap * tanh((h @ weight.T) / softcap)`` against ``targets``.

    Args:
        h: final hidden states ``(tokens, hidden)``.
        weight: the LM head (or tied embedding) ``(vocab, hidden)``.
        targets: ``(tokens,)`` int64 next-token ids.
        softcap: Gemma's final logit soft-cap, or None.
        dtype: of the head's matrix products (default ``h``'s; bfloat16 under autocast).

    Returns:
        A scalar float32 loss, differentiable in ``h`` and ``weight``.
    """
    if dtype is None:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
    with torch.autocast("cpu", enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets.long(), softcap, dtype)
