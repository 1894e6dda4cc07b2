"""The dense linear products' dispatch: oneDNN and PyTorch's default fp32 product, forward and autograd;
and bf16 weights prepacked in oneDNN's layout.

Both fp32 choices are forced in turn and judged against float64, so each is tested on every
machine whatever the per-process choice would be here.
"""

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_prepack

from swattn.models.layers import Linear, PrepackedLinear
from swattn.ops import linear

CHOICES = [c for c in linear.FP32_PRODUCTS if c != "onednn" or linear._onednn_available()]


@pytest.fixture(params=CHOICES)
def choice(request):
    before = linear._state["fp32"]
    linear.set_fp32_product(request.param)
    yield request.param
    linear._state["fp32"] = before


def _inputs(shape, n, seed):
    """fp32-representable float64 inputs, so that float64 products of them are the exact answer."""
    torch.manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape).double()
    w = (torch.randn(n, k) / math.sqrt(k)).double()
    return x, w


def _graph(fn, depth=3):
    """Names of the autograd nodes within ``depth`` steps of ``fn``."""
    if fn is None or depth == 0:
        return set()
    return {type(fn).__name__}.union(*(_graph(f, depth - 1) for f, _ in fn.next_functions))


def _close(got, want, inner):
    """Within fp32 summation error: eps * sqrt(terms) relative to the result's scale (measured ratio <= 1.3)."""
    bound = 4 * torch.finfo(torch.float32).eps * math.sqrt(inner) * max(1.0, want.abs().max().item())
    return got.shape == want.shape and (got.double() - want).abs().max().item() <= bound


# Odd sizes, a single row, many rows (through the product, not the few-row kernel), 1-D and 3-D.
SHAPES = [((64,), 33), ((1, 7), 5), ((3, 5, 100), 33), ((17, 257), 333), ((300, 96), 130), ((2, 40, 129), 65)]


@pytest.mark.parametrize("shape,n", SHAPES)
def test_forward_matches_float64(choice, shape, n):
    x, w = _inputs(shape, n, n)
    y = linear.dense(x.float(), w.float())
    want = x @ w.T
    assert y.dtype == torch.float32
    assert _close(y, want, shape[-1])


@pytest.mark.parametrize("shape,n", SHAPES)
def test_gradients_match_float64(choice, shape, n):
    x, w = _inputs(shape, n, n + 1)
    grad = torch.randn(*shape[:-1], n).double()
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    y = linear.dense(xf, wf)
    if choice == "onednn":  # the dispatch really took oneDNN's path, with its own backward
        assert "_OneDNNLinearBackward" in _graph(y.grad_fn)
    y.backward(grad.float())
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    (x64 @ w64.T).backward(grad)
    assert _close(xf.grad, x64.grad, n)
    assert _close(wf.grad, w64.grad, math.prod(shape[:-1]))


def test_only_the_weight_needs_a_gradient(choice):
    x, w = _inputs((9, 48), 20, 3)
    wf = w.float().requires_grad_()
    linear.dense(x.float(), wf).sum().backward()
    assert _close(wf.grad, x.sum(0).expand(20, 48), 9)


def test_strided_and_empty_inputs(choice):
    w = torch.randn(33, 64)
    x = torch.randn(64, 5).t()  # (5, 64), not contiguous
    assert torch.allclose(linear.dense(x, w), F.linear(x, w), atol=1e-5)
    chunk = torch.randn(1, 40, 64).split(20, dim=1)[1]  # a chunk of a longer sequence (rows as a view)
    x = torch.randn(3, 40, 64)[:, ::2]  # rows that are no view of a matrix
    for part in (chunk, x):
        assert torch.allclose(linear.dense(part, w), F.linear(part, w), atol=1e-5)
    for empty in (torch.randn(0, 64), torch.randn(2, 0, 64)):
        xe, we = empty.requires_grad_(), w.clone().requires_grad_()
        y = linear.dense(xe, we)
        assert y.shape == (*empty.shape[:-1], 33)
        y.sum().backward()
        assert torch.equal(we.grad, torch.zeros_like(w))


def test_training_a_linear_layer_matches_pytorch(choice):
    """A few SGD steps of swattn's Linear follow nn.Linear's to fp32 rounding."""
    torch.manual_seed(0)
    ours, theirs = Linear(40, 24), torch.nn.Linear(40, 24, bias=False)
    theirs.weight.data.copy_(ours.weight.data)
    x, target = torch.randn(64, 40), torch.randn(64, 24)
    for module in (ours, theirs):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            F.mse_loss(module(x), target).backward()
            opt.step()
    assert torch.allclose(ours.weight, theirs.weight, atol=1e-5)


def test_bf16_keeps_pytorchs_product():
    linear.set_fp32_product("torch")
    try:
        x = torch.randn(10, 32, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(8, 32, dtype=torch.bfloat16)
        assert "_OneDNNLinearBackward" not in _graph(linear.dense(x, w).grad_fn)
    finally:
        linear._state["fp32"] = None


def test_choice_is_made_once_and_can_be_forced(monkeypatch):
    monkeypatch.setitem(linear._state, "fp32", None)
    monkeypatch.setenv("SWATTN_FP32_PRODUCT", "torch")
    assert linear.fp32_product() == "torch"
    monkeypatch.setenv("SWATTN_FP32_PRODUCT", "onednn")
    assert linear.fp32_product() == "torch"  # kept for the process
    monkeypatch.setitem(linear._state, "fp32", None)
    monkeypatch.setenv("SWATTN_FP32_PRODUCT", "mkl")
    with pytest.raises(ValueError, match="SWATTN_FP32_PRODUCT"):
        linear.fp32_product()
    with pytest.raises(ValueError, match="choice"):
        linear.set_fp32_product("fast")


def test_auto_choice_is_one_of_the_products(monkeypatch):
    monkeypatch.setitem(linear._state, "fp32", None)
    monkeypatch.delenv("SWATTN_FP32_PRODUCT", raising=False)
    assert linear.fp32_product() in CHOICES


def _bf16_close(got, want, inner):
    """Each element within one rounding to bf16 (half an ulp is 2^-9 relative) of the fp32-accumulated sum."""
    fp32 = 4 * torch.finfo(torch.float32).eps * math.sqrt(inner) * max([1.0, *want.abs().flatten().tolist()])
    return got.shape == want.shape and bool(((got.double() - want).abs() <= want.abs() * 2**-8 + fp32).all())


@needs_prepack
@pytest.mark.parametrize("shape,n", SHAPES + [((0, 64), 33), ((2, 0, 48), 7), ((2, 2304), 48), ((16, 96), 2048)])
def test_prepacked_matches_float64(shape, n):
    x, w = _inputs(shape, n, n)
    xb, wb = x.bfloat16(), w.bfloat16()
    y = PrepackedLinear(wb)(xb)
    assert y.dtype == torch.bfloat16
    assert _bf16_close(y, xb.double() @ wb.double().T, shape[-1])
    strided = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.bfloat16)[..., ::2]
    assert torch.equal(PrepackedLinear(wb)(strided), PrepackedLinear(wb)(strided.contiguous()))


@needs_prepack
def test_prepacked_layers_keep_their_plain_weight_for_state_dicts_copies_and_pickles():
    w = torch.randn(40, 72, dtype=torch.bfloat16)
    layer = PrepackedLinear(w)
    x = torch.randn(5, 72, dtype=torch.bfloat16)
    assert list(layer.state_dict()) == ["weight"] and torch.equal(layer.state_dict()["weight"], w)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(twin(x), layer(x)) and torch.equal(twin.dense_weight(), w)
    other = torch.randn(40, 72, dtype=torch.bfloat16)
    layer.load_state_dict({"weight": other})
    assert torch.equal(layer(x), PrepackedLinear(other)(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict({"weight": torch.zeros(40, 71, dtype=torch.bfloat16)})
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({})
    assert layer.to(torch.bfloat16) is layer
    with pytest.raises(ValueError, match="unpack"):
        layer.float()


@needs_prepack
def test_prepacked_layers_refuse_what_they_cannot_do():
    layer = PrepackedLinear(torch.randn(8, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="prepack=False"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(ValueError, match="bf16"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match="cannot prepack"):
        PrepackedLinear(torch.randn(8, 16))
    with torch.no_grad():  # no gradient wanted: fine
        assert layer(torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)).shape == (2, 8)


@needs_prepack
@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (128, 2304)])
def test_panel_kernel_reads_prepacked_weights_at_every_row_count(n, k, simd):
    """The panel kernel multiplies by a prepacked weight's own memory (oneDNN's 64-feature panels),
    for 1..16 rows, on the SIMD path and the portable one, as float64 does within bf16 rounding."""
    _, w = _inputs((1, k), n, n + k)
    wb = w.bfloat16()
    layer = PrepackedLinear(wb)
    if layer.panel_view is None:
        pytest.skip("this oneDNN lays bf16 weights out otherwise (the layer keeps oneDNN's own product)")
    before = torch.ops.swattn.linear_simd(-1)
    torch.ops.swattn.linear_simd(int(simd))
    try:
        for rows in range(1, 17):
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            want = x.double() @ wb.double().T
            assert _bf16_close(torch.ops.swattn.panel_linear(x, layer.panel_view, n), want, k), rows
            assert _bf16_close(layer(x.view(1, rows, k)).view(rows, n), want, k), rows
    finally:
        torch.ops.swattn.linear_simd(int(before))


@needs_prepack
def test_prepacked_layers_take_the_panel_kernel_only_where_the_layout_is_checked():
    w = torch.randn(128, 96, dtype=torch.bfloat16)
    layer = PrepackedLinear(w)
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    assert layer.panel_view is not None
    assert layer.row_product(linear.PANEL_ROWS, x)[0] == linear.PANEL_KERNEL
    assert layer.row_product(linear.PANEL_ROWS + 1, x)[0] == linear.ONEDNN
    # another weight's panels, or shapes oneDNN pads, are not taken for this layout
    assert linear.panels(layer.packed, torch.randn(128, 96, dtype=torch.bfloat16)) is None
    for shape in ((100, 96), (128, 66)):
        other = PrepackedLinear(torch.randn(*shape, dtype=torch.bfloat16))
        assert other.panel_view is None and other.row_product(1, x[:, : shape[1]])[0] == linear.ONEDNN
    # the view follows the weight when it is replaced, copied or pickled
    other = torch.randn(128, 96, dtype=torch.bfloat16)
    layer.load_state_dict({"weight": other})
    for twin in (layer, copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert _bf16_close(twin(x), x.double() @ other.double().T, 96)
