"""Cross-entropy of the LM head without the (tokens x vocabulary) logits held at once.

Training a model whose vocabulary dwarfs its width spends most of a step's memory and much
of its time on the logits: tokens x vocab floats, written, soft-capped, soft-maxed and
differentiated as separate whole-tensor passes. Here the head's product, Gemma's final
soft-cap, the log-sum-exp and the gradient are done a chunk of tokens at a time, and the
gradients of the hidden states and of the head are computed in the forward, while each
chunk's logits exist (the fused linear-cross-entropy approach): nothing of vocabulary size
per token is kept, and the backward only scales them.
"""

from __future__ import annotations

import torch

from swattn.ops.linear import product

CHUNK = 1024  # tokens per chunk: 1024 x vocab floats at a time


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap, dtype):  # noqa: D102
        n = h.shape[0]
        w = weight.to(dtype)
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if grads else None
        dw = torch.zeros(weight.shape, dtype=torch.float32) if grads else None
        total = torch.zeros((), dtype=torch.float64)
        for s in range(0, n, CHUNK):
            hc = h[s : s + CHUNK].to(dtype)
            t_idx = targets[s : s + CHUNK]
            logits, t = _capped_logits(hc, w, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t_idx[:, None]).squeeze(1)).double().sum()
            if grads:  # the gradient now, while the chunk's logits exist: the backward only scales it
                p = logits.sub_(lse[:, None]).exp_()  # d loss / d capped logits = softmax - one_hot
                p[torch.arange(p.shape[0]), t_idx] -= 1.0
                p.mul_(1.0 / n)
                if t is not None:  # through the soft-cap: 1 - tanh^2
                    p.mul_(1.0 - t.square_())
                pd = p.to(dtype)
                dh[s : s + CHUNK] = product(pd, w.t()).to(h.dtype)  # pd @ w
                dw.add_(product(pd.t(), hc.t()).float())  # pd^T @ hc
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return (total / n).float()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), (dw * grad).to(ctx.weight_dtype), None, None, None


def _capped_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None):
    """float32 logits of a chunk, soft-capped; with a cap also the tanh (for the backward)."""
    logits = product(h, w).float()
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
