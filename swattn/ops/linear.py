"""Linear-layer products ``y = x W^T`` for dense and block-quantized weights (dispatch in this one place).

Few rows (decoding, small batches: up to ``SMALL_ROWS``) go through the CPU extension's
kernels, which read each weight byte once for all rows; more rows (prefill) through PyTorch's
matrix product, quantized weights dequantized to the activations' dtype one panel of output
features at a time (so no dense copy of the whole weight is ever held).
``SWATTN_LINEAR=torch`` turns the kernels off (for comparisons).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from swattn import quant
from swattn.ops import cpu

SMALL_ROWS = 16  # the quantized kernels' row limit
# Dense weights: up to how many rows the streaming kernel beats PyTorch's product (bf16 goes
# to oneDNN, whose blocked product wins from 3 rows; fp32 to MKL, which loses at every size).
DENSE_ROWS = {torch.float32: 16, torch.bfloat16: 2}
PANEL = 4096  # output features dequantized at a time for prefill
_state: dict[str, bool | None] = {"kernels": None}


def kernels() -> bool:
    """Whether the few-row kernels run (the extension builds here and ``SWATTN_LINEAR`` is not ``torch``)."""
    if _state["kernels"] is None:
        _state["kernels"] = os.environ.get("SWATTN_LINEAR", "auto") != "torch" and cpu.available()
    return bool(_state["kernels"])


def _small(x: torch.Tensor, limit: int = SMALL_ROWS) -> bool:
    return x.device.type == "cpu" and x.numel() <= limit * x.shape[-1] and x.dtype in cpu.DTYPES and kernels()


def dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., K)`` times ``weight`` ``(N, K)`` transposed: ``(..., N)`` (no autograd through the kernel)."""
    if _small(x, DENSE_ROWS.get(x.dtype, 0)) and weight.dtype == x.dtype and weight.is_contiguous() and not _needs_grad(x, weight):
        return torch.ops.swattn.dense_linear(x.contiguous(), weight)
    return F.linear(x, weight)


def quantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str, n: int) -> torch.Tensor:
    """``x`` ``(..., K)`` times a quantized weight of ``n`` features (see :mod:`swattn.quant`) transposed:
    ``(..., n)`` in x's dtype."""
    bits = quant.BITS[fmt]
    if _small(x):
        return torch.ops.swattn.quant_linear(x.contiguous(), qweight, scales, bits, n)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, PANEL):
        stop = min(n, start + PANEL)
        if kernels():
            panel = torch.ops.swattn.dequantize(qweight, scales, bits, start, stop, x)
        else:
            first, last = start // quant.LANES, -(-stop // quant.LANES)
            panel = quant.dequantize(qweight[first:last], scales[first:last], fmt, stop - start, x.dtype)
        if stop - start == n:
            return (rows @ panel.T).view(*x.shape[:-1], n)
        out[:, start:stop] = rows @ panel.T
    return out.view(*x.shape[:-1], n)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
