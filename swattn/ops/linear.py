"""Linear-layer products ``y = x W^T`` for dense and block-quantized weights (dispatch in this one place).

Few rows (decoding, small batches: up to ``SMALL_ROWS``) go through the CPU extension's
kernels, which read each weight byte once for all rows; more rows (prefill, training) through
the fastest matrix product the machine has, quantized weights dequantized to the activations'
dtype one panel of output features at a time (so no dense copy of the whole weight is held;
:func:`expand_quantized` makes one on purpose, for a weight that meets many inputs in turn).

fp32 products: PyTorch's default (``F.linear``: MKL's sgemm on x86) runs on AMD CPUs at about
half of what oneDNN's does (measured 205 against 433 GFLOP/s on 2 Zen 5 cores), while on Intel
CPUs the two are close. :func:`fp32_product` picks one per process by timing both once, at
first use; ``SWATTN_FP32_PRODUCT=torch|onednn`` forces it. oneDNN's product has no autograd
formula of its own, so :class:`_OneDNNLinear` gives it one (its backward products run on oneDNN
too). bf16 products already go through oneDNN inside PyTorch.
``SWATTN_LINEAR=torch`` turns the few-row kernels off (for comparisons).

Prepacked bf16 weights: oneDNN reads a weight faster from its own blocked layout than from the
plain row-major one, at every row count (measured on 2 Zen 5 cores, 7 layers' weights in turn:
1 row 70 against 65 GB/s, 8 rows 46 against 22 GB/s; 2048 rows 944 against 873 GFLOP/s).
:func:`prepack` gives that layout (an opaque tensor, the same size: it replaces the plain weight,
see :class:`swattn.models.layers.PrepackedLinear`) and :func:`prepacked` multiplies by it. Up to
``PANEL_ROWS`` rows, the extension's panel kernel reads that layout itself where :func:`panels`
finds it (checked per weight), streaming it faster than oneDNN's own product does for few rows.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from swattn import quant
from swattn.ops import cpu

SMALL_ROWS = 16  # the quantized kernels' row limit
# Dense weights: up to how many rows the streaming kernel beats the product it would otherwise
# get. oneDNN's blocked product (bf16 always; fp32 where it is chosen) wins from 3 rows; MKL's
# fp32 product loses at every count up to 16.
DENSE_ROWS = {torch.float32: 16, torch.bfloat16: 2}
ONEDNN_DENSE_ROWS = 2
PANEL = 4096  # output features dequantized at a time for prefill
# How a few-row product runs, as the compiled decode step (csrc/swattn_block.cpp) is told: the
# streaming dense kernel, oneDNN's product (prepacked or plain weight), PyTorch's F.linear, or
# the quantized kernel (its bits: 8 or 4)
DENSE_KERNEL, ONEDNN, TORCH = 0, 1, 2
PANEL_KERNEL = 3  # the panel kernel on a prepacked weight's memory (see :func:`panels`)
PANEL_FEATURES = 64
# up to how many rows the panel kernel beats oneDNN's own product on the same prepacked weight
# (2 Zen 5 cores, 8 layer-shaped weights in turn; GB/s, slow memory state: 1 row 50 against 44,
# 2-4 rows 45-51 against 42-47, 8 rows 40 against 40; 12 and 16 rows 35/30 against 36/33)
PANEL_ROWS = 8
FP32_PRODUCTS = ("torch", "onednn")
_state: dict[str, bool | str | None] = {"kernels": None, "fp32": None}


def kernels() -> bool:
    """Whether the few-row kernels run (the extension builds here and ``SWATTN_LINEAR`` is not ``torch``)."""
    if _state["kernels"] is None:
        _state["kernels"] = os.environ.get("SWATTN_LINEAR", "auto") != "torch" and cpu.available()
    return bool(_state["kernels"])


def fp32_product() -> str:
    """Which product fp32 linear layers use on the CPU: ``"onednn"`` or ``"torch"`` (PyTorch's default).

    Chosen once per process: ``SWATTN_FP32_PRODUCT`` if set, else whichever of the two runs a
    prefill-sized product faster here (oneDNN only when clearly, by 10%, so that machines where
    they tie keep PyTorch's default and one process's choice does not flip with timing noise).
    """
    if _state["fp32"] is None:
        choice = os.environ.get("SWATTN_FP32_PRODUCT", "auto")
        if choice not in FP32_PRODUCTS + ("auto",):
            raise ValueError(f"SWATTN_FP32_PRODUCT must be one of torch, onednn, auto; got {choice!r}")
        if choice == "onednn" and not _onednn_available():
            raise ValueError("SWATTN_FP32_PRODUCT=onednn, but this PyTorch build has no oneDNN")
        if choice == "auto":
            choice = "onednn" if _onednn_available() and _onednn_faster() else "torch"
        _state["fp32"] = choice
    return str(_state["fp32"])


def set_fp32_product(choice: str | None) -> None:
    """Forces :func:`fp32_product`'s answer (``None``: choose again at next use); for tests and benchmarks."""
    if choice is not None and choice not in FP32_PRODUCTS:
        raise ValueError(f"choice must be one of {', '.join(FP32_PRODUCTS)} or None, got {choice!r}")
    if choice == "onednn" and not _onednn_available():
        raise ValueError("this PyTorch build has no oneDNN")
    _state["fp32"] = choice


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # Any strides: the backward hands over transposed views, which oneDNN reads in place.
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def can_prepack(weight: torch.Tensor) -> bool:
    """Whether ``weight`` ``(N, K)`` can be held prepacked here: bf16, on a CPU whose oneDNN has bf16 arithmetic."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2 or not _onednn_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported is not None and supported() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(N, K)`` in oneDNN's blocked layout (an opaque tensor; ``.to_dense()`` gives it back exactly)."""
    if not can_prepack(weight):
        raise ValueError(f"cannot prepack a {weight.dtype} {tuple(weight.shape)} weight on {weight.device} "
                         "(bf16 on a CPU with oneDNN's bf16 arithmetic only)")
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def panels(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The memory of ``packed`` (:func:`prepack` of ``weight`` ``(N, K)``) as a plain bf16 tensor of
    ``N * K`` values when it holds the layout the extension's panel kernel reads, else None.

    oneDNN lays bf16 weights out for its products in panels of 64 features, each ``(K / 2, 64, 2)``
    (a vector holds a pair of columns of 16 features: vdpbf16ps' operand). The layout is oneDNN's
    choice, per release, CPU and shape, so it is checked here against ``weight`` on three panels
    (first, middle, last) before the kernel is trusted with it; the returned tensor aliases
    ``packed`` and is valid only while ``packed`` lives.
    """
    n, k = weight.shape
    data_ptr, nbytes = getattr(torch.ops.mkldnn, "data_ptr", None), getattr(torch.ops.mkldnn, "_nbytes", None)
    if n % PANEL_FEATURES or k % 2 or data_ptr is None or nbytes is None or not kernels():
        return None
    try:
        if nbytes(packed) != n * k * 2:
            return None
        memory = (ctypes.c_uint8 * (n * k * 2)).from_address(data_ptr(packed))
    except (RuntimeError, ValueError):
        return None
    flat = torch.frombuffer(memory, dtype=torch.bfloat16)
    view = flat.view(n // PANEL_FEATURES, k // 2, PANEL_FEATURES, 2)
    plain = weight.detach().view(n // PANEL_FEATURES, PANEL_FEATURES, k // 2, 2)
    for p in sorted({0, (n // PANEL_FEATURES) // 2, n // PANEL_FEATURES - 1}):
        if not torch.equal(view[p].view(torch.int16), plain[p].transpose(0, 1).view(torch.int16)):
            return None
    return flat


def prepacked(x: torch.Tensor, packed: torch.Tensor, panel_view: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``(..., K)`` times a :func:`prepack`-ed weight ``(N, K)`` transposed: ``(..., N)`` (no autograd).

    ``panel_view``: :func:`panels` of ``packed``, if it has one: few rows then take the panel kernel.
    """
    if panel_kind(_rows(x), x, panel_view) == PANEL_KERNEL:
        return torch.ops.swattn.panel_linear(x.contiguous(), panel_view, panel_view.numel() // x.shape[-1])
    return _onednn(x, packed)


def panel_kind(rows: int, x: torch.Tensor, panel_view: torch.Tensor | None) -> int:
    """How :func:`prepacked` multiplies ``rows`` rows like ``x``: ``PANEL_KERNEL`` or ``ONEDNN``."""
    if panel_view is not None and rows > 0 and x.dtype == torch.bfloat16 and few_rows(rows, x, PANEL_ROWS):
        return PANEL_KERNEL
    return ONEDNN


def _onednn_faster() -> bool:
    """Times one (256 x 1024) x (1024 x 1024) product both ways (about 0.1 s in all)."""
    from swattn.profiling import best_time  # (profiling imports this module inside its functions)

    x, w = torch.randn(256, 1024), torch.randn(1024, 1024)
    try:
        return best_time(lambda: _onednn(x, w)) < 0.9 * best_time(lambda: F.linear(x, w))
    except RuntimeError:  # a build whose oneDNN cannot run this product
        return False


class _OneDNNLinear(torch.autograd.Function):
    """``x W^T`` through oneDNN, with the backward's two products through oneDNN as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn(grad, weight.t())  # (..., N) x (N, K)
        if ctx.needs_input_grad[1]:
            rows = grad.reshape(-1, grad.shape[-1])  # (M, N)
            grad_w = _onednn(rows.t(), x.reshape(-1, x.shape[-1]).t())  # (N, M) x (M, K)
        return grad_x, grad_w


def _small(x: torch.Tensor, limit: int = SMALL_ROWS) -> bool:
    return few_rows(_rows(x), x, limit)


def _rows(x: torch.Tensor) -> int:
    """Rows of ``x`` ``(..., K)``: its leading dimensions multiplied out."""
    return x.numel() // max(1, x.shape[-1])


def few_rows(rows: int, x: torch.Tensor, limit: int = SMALL_ROWS) -> bool:
    """Whether the few-row kernels take ``rows`` rows like ``x`` (its dtype and device)."""
    return x.device.type == "cpu" and rows <= limit and x.dtype in cpu.DTYPES and kernels()


def _uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.numel() > 0 and weight.numel() > 0 and fp32_product() == "onednn")


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., K)`` times ``weight`` ``(N, K)`` transposed on the fastest product for many rows (autograd-aware)."""
    if x.dim() > 2:
        # As rows: F.linear on a (1, L, K) view of a longer sequence (a chunk of the MLP's
        # input) goes through a batched product that copies the transposed weight every call
        # (measured: 145 against 102 ms for 2048 x 2304 x 9216 in bf16).
        return product(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    if _uses_onednn(x, weight):
        if _needs_grad(x, weight):
            return _OneDNNLinear.apply(x, weight)
        return _onednn(x, weight)
    return F.linear(x, weight)


def dense(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., K)`` times ``weight`` ``(N, K)`` transposed: ``(..., N)`` (no autograd through the kernel)."""
    if dense_kind(_rows(x), x, weight) == DENSE_KERNEL:
        return torch.ops.swattn.dense_linear(x.contiguous(), weight)
    return product(x, weight)


def dense_kind(rows: int, x: torch.Tensor, weight: torch.Tensor) -> int:
    """How :func:`dense` multiplies ``rows`` rows like ``x`` by ``weight``: ``DENSE_KERNEL`` (the
    streaming kernel), ``ONEDNN`` or ``TORCH`` (:func:`product`'s two ways, for inputs without gradients)."""
    limit = DENSE_ROWS.get(x.dtype, 0)
    onednn = _uses_onednn(x, weight)
    if x.dtype == torch.float32 and limit > ONEDNN_DENSE_ROWS and onednn:
        limit = ONEDNN_DENSE_ROWS
    if few_rows(rows, x, limit) and weight.dtype == x.dtype and weight.is_contiguous() and not _needs_grad(x, weight):
        return DENSE_KERNEL
    return ONEDNN if onednn else TORCH


def quantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, fmt: str, n: int) -> torch.Tensor:
    """``x`` ``(..., K)`` times a quantized weight of ``n`` features (see :mod:`swattn.quant`) transposed:
    ``(..., n)`` in x's dtype."""
    if _small(x):
        return torch.ops.swattn.quant_linear(x.contiguous(), qweight, scales, quant.BITS[fmt], n)
    return expanded_product(x, _dense_panels(qweight, scales, fmt, n, x), n)  # one panel dense at a time


def expand_quantized(qweight: torch.Tensor, scales: torch.Tensor, fmt: str, n: int,
                     like: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """A quantized weight of ``n`` features dequantized to ``like``'s dtype once, for many products
    (a long input in chunks): ``(first feature, panel)`` pairs of up to ``PANEL`` features, each
    prepacked where it can be. They hold the dense weight's bytes; :func:`expanded_product` takes them."""
    return list(_dense_panels(qweight, scales, fmt, n, like))


def expanded_product(x: torch.Tensor, panels, n: int) -> torch.Tensor:
    """``x`` ``(..., K)`` times the weight of ``n`` features that ``panels`` (from :func:`expand_quantized`) hold."""
    rows = x.reshape(-1, x.shape[-1])
    out = None
    for start, panel in panels:
        part = prepacked(rows, panel) if panel.is_mkldnn else product(rows, panel)
        if part.shape[1] == n:
            return part.view(*x.shape[:-1], n)
        if out is None:
            out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
        out[:, start : start + part.shape[1]] = part
    return out.view(*x.shape[:-1], n)


def _dense_panels(qweight: torch.Tensor, scales: torch.Tensor, fmt: str, n: int,
                  like: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`_dense_panel` over all ``n`` features, ``PANEL`` at a time, each made when asked for."""
    for start in range(0, n, PANEL):
        yield _dense_panel(qweight, scales, fmt, start, min(n, start + PANEL), like)


def _dense_panel(qweight: torch.Tensor, scales: torch.Tensor, fmt: str, start: int, stop: int,
                 like: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Features ``start .. stop`` of a quantized weight in ``like``'s dtype: ``(start, (stop - start, K))``,
    prepacked for oneDNN where it can be (4096 x 2304 x 4096 bf16: 84.5 against 88.2 ms, the reorder included)."""
    if kernels():
        panel = torch.ops.swattn.dequantize(qweight, scales, quant.BITS[fmt], start, stop, like)
    else:
        first, last = start // quant.LANES, -(-stop // quant.LANES)
        panel = quant.dequantize(qweight[first:last], scales[first:last], fmt, stop - start, like.dtype)
    if can_prepack(panel) and not _needs_grad(like):
        panel = prepack(panel)
    return start, panel


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
