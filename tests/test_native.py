"""The compiled kernel's native forwards and backwards against the oracle: fp32 on its own
AVX-512 FMA kernels, bf16 on AVX512_BF16 pair products.

Each runs only where the kernel was built for a CPU with those instructions; elsewhere the
forward goes through the sgemm path, which the other op tests cover (and which each test
here is also compared with). Shapes are chosen to hit the path's edges: odd head dims (an
unpaired last dimension; fp32: V not readable in place), key counts that are odd and not a
multiple of the 12-key kernel or the 256-key sub-tile, rows padded to 32, positions and empty
slots (whose K/V may hold NaN).
"""

import pytest
import torch

import swattn
from swattn.ops import cpu

from conftest import assert_matches_oracle, oracle_with_grads, run_with_grads

SWITCHES = {torch.float32: cpu.native_fp32, torch.bfloat16: cpu.native_bf16}


def _built(dtype):
    return cpu.available() and SWITCHES[dtype]()


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    if not _built(request.param):
        pytest.skip("kernel built without the instructions here: this dtype runs the sgemm path")
    return request.param


def _qkv(dtype, batch, heads, heads_kv, q_len, k_len, head_dim, k_pos=None, nan_slots=False):
    """Random q, k, v; with ``nan_slots`` NaN in the K/V rows of empty slots (``k_pos < 0``): what
    an empty cache slot may hold, which the kernel must never let through."""
    shape = lambda h, n: (batch, h, n, head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h, n)).to(dtype) for h, n in ((heads, q_len), (heads_kv, k_len), (heads_kv, k_len)))
    if nan_slots:
        empty = (k_pos < 0).view(batch, 1, k_len, 1).expand_as(k)
        k, v = k.masked_fill(empty, float("nan")), v.masked_fill(empty, float("nan"))
    return q, k, v


def check(dtype, batch, heads, heads_kv, q_len, k_len, head_dim, window, softcap=None, q_pos=None, k_pos=None,
          nan_slots=False):
    q, k, v = _qkv(dtype, batch, heads, heads_kv, q_len, k_len, head_dim, k_pos, nan_slots)
    kw = dict(window=window, softcap=softcap, q_pos=q_pos, k_pos=k_pos)
    got = swattn.sliding_window_attention(q, k, v, backend="cpu", **kw)
    clean = (lambda t: t.nan_to_num(0.0)) if nan_slots else (lambda t: t)
    ref = swattn.reference_attention(q.double(), clean(k).double(), clean(v).double(), **kw)
    low = swattn.reference_attention(q, clean(k), clean(v), compute_dtype=dtype, **kw)
    assert_matches_oracle([got], [ref], [low])
    return q, k, v, kw, got


@pytest.mark.parametrize("head_dim", [16, 33, 64, 128, 256])
@pytest.mark.parametrize("window", [1, 7, 300, None])
def test_head_dims_and_windows(dtype, head_dim, window):
    check(dtype, 1, 4, 2, 301, 301, head_dim, window, softcap=30.0)


@pytest.mark.parametrize("heads,heads_kv", [(3, 3), (6, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("q_len,k_len", [(9, 9), (37, 600), (600, 600)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_heads_lengths_softcap(dtype, heads, heads_kv, q_len, k_len, softcap):
    check(dtype, 2, heads, heads_kv, q_len, k_len, 40, window=257, softcap=softcap)


@pytest.mark.parametrize("head_dim", [24, 64])
def test_positions_with_empty_slots_and_padding(dtype, head_dim, small_blocks):
    k_len = 45
    k_pos = torch.randperm(100)[:k_len].sort().values.view(1, -1).repeat(2, 1)
    k_pos[:, ::7] = -1  # empty slots
    q_pos = torch.arange(60, 100).view(1, -1).repeat(2, 1)
    q_pos[1, :5] = -1  # padding queries see nothing: zeros
    _, _, _, _, out = check(dtype, 2, 4, 2, 40, k_len, head_dim, window=30, softcap=20.0, q_pos=q_pos, k_pos=k_pos,
                            nan_slots=True)
    assert torch.equal(out[1, :, :5], torch.zeros_like(out[1, :, :5]))


def test_agrees_with_the_sgemm_path(dtype):
    q, k, v = (torch.randn(1, 8 // r, 700, 128).to(dtype) for r in (1, 2, 2))
    native = swattn.sliding_window_attention(q, k, v, 256, softcap=50.0, backend="cpu")
    try:
        SWITCHES[dtype](False)
        other = swattn.sliding_window_attention(q, k, v, 256, softcap=50.0, backend="cpu")
    finally:
        SWITCHES[dtype](True)
    assert (native.float() - other.float()).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert not torch.equal(native, other)  # two paths really ran


def test_keys_that_are_a_prefix_of_a_larger_buffer(dtype):
    """A full cache hands over a prefix view of its buffer (batch and head strides larger than
    the keys); the native path must read it in place."""
    big_k, big_v = torch.randn(2, 2, 900, 64).to(dtype), torch.randn(2, 2, 900, 64).to(dtype)
    k, v = big_k[:, :, :517], big_v[:, :, :517]
    assert not k.is_contiguous()
    q = torch.randn(2, 4, 100, 64).to(dtype)
    got = swattn.sliding_window_attention(q, k, v, 300, softcap=30.0, backend="cpu")
    want = swattn.sliding_window_attention(q, k.contiguous(), v.contiguous(), 300, softcap=30.0, backend="cpu")
    assert torch.equal(got, want)
    ref = swattn.reference_attention(q.double(), k.double(), v.double(), 300, softcap=30.0)
    low = swattn.reference_attention(q, k, v, 300, softcap=30.0, compute_dtype=dtype)
    assert_matches_oracle([got], [ref], [low])


# The native backwards (fp32 on FMA, bf16 on vdpbf16ps with P and dS rounded to bf16), against the oracle.
def check_grads(dtype, batch, heads, heads_kv, q_len, k_len, head_dim, window, softcap=None, q_pos=None,
                k_pos=None, nan_slots=False):
    q, k, v = _qkv(dtype, batch, heads, heads_kv, q_len, k_len, head_dim, k_pos, nan_slots)
    dout = torch.randn(batch, heads, q_len, head_dim).to(dtype)
    kw = dict(window=window, softcap=softcap, q_pos=q_pos, k_pos=k_pos)
    got = run_with_grads(lambda q, k, v: swattn.sliding_window_attention(q, k, v, backend="cpu", **kw), q, k, v, dout)
    if nan_slots:  # an empty slot gets no gradient; the oracle sees zeros there instead of NaN
        k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
        assert not any(torch.isnan(g).any() for g in got)
    ref = oracle_with_grads(q, k, v, dout, **kw)
    low = None if dtype == torch.float32 else oracle_with_grads(q, k, v, dout, compute_dtype=dtype, **kw)
    assert_matches_oracle(got, ref, low)
    return got


@pytest.mark.parametrize("head_dim", [16, 33, 128])
@pytest.mark.parametrize("window", [1, 7, 300, None])
def test_backward_head_dims_and_windows(dtype, head_dim, window):
    check_grads(dtype, 1, 4, 2, 301, 301, head_dim, window, softcap=30.0)


@pytest.mark.parametrize("heads,heads_kv", [(3, 3), (8, 1)], ids=["mha", "mqa"])
@pytest.mark.parametrize("q_len,k_len", [(9, 9), (37, 600)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_backward_heads_lengths_softcap(dtype, heads, heads_kv, q_len, k_len, softcap):
    check_grads(dtype, 2, heads, heads_kv, q_len, k_len, 40, window=257, softcap=softcap)


def test_backward_positions_with_empty_slots(dtype, small_blocks):
    k_len = 45
    k_pos = torch.randperm(100)[:k_len].sort().values.view(1, -1).repeat(2, 1)
    k_pos[:, ::7] = -1
    q_pos = torch.arange(60, 100).view(1, -1).repeat(2, 1)
    q_pos[1, :5] = -1
    check_grads(dtype, 2, 4, 2, 40, k_len, 24, window=30, softcap=20.0, q_pos=q_pos, k_pos=k_pos, nan_slots=True)


def test_backward_agrees_with_the_sgemm_path(dtype):
    q, k, v, dout = (torch.randn(1, 8 // r, 700, 128).to(dtype) for r in (1, 2, 2, 1))
    fn = lambda q, k, v: swattn.sliding_window_attention(q, k, v, 256, softcap=50.0, backend="cpu")  # noqa: E731
    native = run_with_grads(fn, q, k, v, dout)
    try:
        SWITCHES[dtype](False)
        other = run_with_grads(fn, q, k, v, dout)
    finally:
        SWITCHES[dtype](True)
    for a, b in zip(native[1:], other[1:]):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 1e-5) * scale
        assert not torch.equal(a, b)  # two paths really ran
