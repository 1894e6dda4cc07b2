"""The compiled decode step (store + attend in one call, flash-decoding splits) and the row-wise ops, against the oracle."""

from __future__ import annotations

import pytest
import torch

from swattn.cache import FullCache, RingCache
from swattn.ops import cpu
from swattn.ops.reference import reference_attention

pytestmark = pytest.mark.skipif(not cpu.available(), reason="needs the compiled CPU kernel")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _decode_run(cache, steps, heads, heads_kv, dim, dtype, softcap, pad_row=False, seed=0):
    """Feeds ``steps`` tokens one at a time; gives every step's output and the inputs, (batch, heads, steps, dim)."""
    g = torch.Generator().manual_seed(seed)
    batch = cache.k.shape[0]
    q = torch.randn(batch, heads, steps, dim, generator=g).to(dtype)
    k = torch.randn(batch, heads_kv, steps, dim, generator=g).to(dtype)
    v = torch.randn(batch, heads_kv, steps, dim, generator=g).to(dtype)
    pos = torch.arange(steps).repeat(batch, 1)
    if pad_row:  # the last row starts 3 steps late (left padding)
        pos[-1] -= 3
        pos[-1, :3] = -1
    outs = [cache.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], pos[:, t : t + 1], softcap=softcap)
            for t in range(steps)]
    return torch.cat(outs, dim=2), q, k, v, pos


@pytest.fixture
def native_decode():
    """Sets whether caches take the AVX-512 path (bf16 ones its bf16 dot products; head_dim a multiple of 32); restores it after."""
    before = torch.ops.swattn.native_decode(-1)
    yield lambda on: torch.ops.swattn.native_decode(int(on))
    torch.ops.swattn.native_decode(int(before))


@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 2), (6, 2), (8, 1)], ids=["MHA", "GQA", "GQA3", "MQA"])
@pytest.mark.parametrize("kind,window", [("ring", 1), ("ring", 5), ("ring", 64), ("full", None), ("full", 5)])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("dtype,dim,bf16_dot", [(torch.float32, 40, False), (torch.float32, 96, True),
                                                (torch.bfloat16, 40, False),
                                                (torch.bfloat16, 64, False), (torch.bfloat16, 64, True),
                                                (torch.bfloat16, 96, True)],  # value lanes in groups and one left
                         ids=["fp32", "fp32-d96-avx512", "bf16-d40", "bf16-d64-fp32dot", "bf16-d64-bf16dot",
                              "bf16-d96-bf16dot"])
def test_decode_step_matches_the_oracle(heads, heads_kv, kind, window, softcap, dtype, dim, bf16_dot, native_decode):
    native_decode(bf16_dot)
    steps, batch = 23, 3
    cache = RingCache(batch, heads_kv, dim, window, dtype=dtype) if kind == "ring" else \
        FullCache(batch, heads_kv, dim, window=window, dtype=dtype)
    got, q, k, v, pos = _decode_run(cache, steps, heads, heads_kv, dim, dtype, softcap, pad_row=True)
    want = reference_attention(q, k, v, window, softcap=softcap, q_pos=pos, k_pos=pos, compute_dtype=torch.float64)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert (got[-1, :, :3] == 0).all()  # the padding row's steps


@pytest.mark.parametrize("kv", [None, torch.bfloat16], ids=["fp32-kv", "bf16-kv"])
@pytest.mark.parametrize("kind", ["ring", "full"])
def test_flash_decoding_splits_a_long_cache_across_threads(kind, kv):
    """One row and one kv head: the slots are split across threads and merged by log-sum-exp
    (many tiles of keys per split, so the running maximum's corrections are exercised too)."""
    torch.set_num_threads(max(2, torch.get_num_threads()))
    window = 1500  # a split holds about 550 slots: three tiles of keys (256 each)
    cache = RingCache(1, 1, 32, window, kv_dtype=kv) if kind == "ring" else FullCache(1, 1, 32, capacity=2400, kv_dtype=kv)
    g = torch.Generator().manual_seed(1)
    n = 2200
    q = torch.randn(1, 4, n, 32, generator=g)
    k, v = torch.randn(1, 1, n, 32, generator=g), torch.randn(1, 1, n, 32, generator=g)
    pos = torch.arange(n).view(1, -1)
    cache.attend(q[:, :, : n - 1], k[:, :, : n - 1], v[:, :, : n - 1], pos[:, : n - 1])  # prefill
    got = cache.attend(q[:, :, n - 1 :], k[:, :, n - 1 :], v[:, :, n - 1 :], pos[:, n - 1 :], softcap=7.0)
    w = window if kind == "ring" else None
    want = reference_attention(q, k, v, w, softcap=7.0, q_pos=pos, k_pos=pos)[:, :, n - 1 :]
    tol = 2e-5 if kv is None else 1e-2
    torch.testing.assert_close(got, want.float(), atol=tol, rtol=tol)


def test_decode_step_refuses_positions_that_do_not_increase_without_writing():
    cache = RingCache(2, 1, 16, 4)
    x = torch.randn(2, 1, 1, 16)
    cache.attend(x, x, x, torch.tensor([[3], [3]]))
    before = (cache.k.clone(), cache.slot_pos.clone(), cache.last_pos.clone())
    with pytest.raises(ValueError, match="positions must increase"):
        cache.attend(x, x, x, torch.tensor([[4], [2]]))
    assert all(torch.equal(a, b) for a, b in zip(before, (cache.k, cache.slot_pos, cache.last_pos)))


@pytest.mark.parametrize("plus_one", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_ops_match_the_formulas(plus_one, dtype):
    from swattn.models.transformer import RMSNorm, apply_rotary, rotary
    from swattn.models.config import Rope

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-6, plus_one)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(dtype)
    x = torch.randn(3, 1, 96).to(dtype)
    got = torch.ops.swattn.rms_norm(x, norm.weight, 1e-6, plus_one)
    with torch.enable_grad():  # the PyTorch formula (the op is taken only without autograd)
        want = norm(x.requires_grad_()).detach()
    torch.testing.assert_close(got, want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    pos = torch.tensor([[5], [9], [0]])
    cos, sin = rotary(pos, 64, Rope(theta=10000.0))
    qv = torch.randn(3, 1, 4, 64).to(dtype).transpose(1, 2)  # a strided view, as the projections give
    got = torch.ops.swattn.rotary(qv, cos.contiguous(), sin.contiguous())
    with torch.enable_grad():
        want = apply_rotary(qv.requires_grad_(), cos, sin).detach()
    torch.testing.assert_close(got, want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_gelu_matches_the_formula(dtype):
    """Gemma's fused gelu_tanh(gate) * up (taken at inference for any number of rows) against
    PyTorch's activation in float64, over large, small and negative inputs and odd sizes."""
    torch.manual_seed(1)
    gate = (torch.randn(3, 1001) * 4).to(dtype)
    gate[0, :5] = torch.tensor([0.0, -30.0, 30.0, 1e-4, -1e-4]).to(dtype)
    up = torch.randn(3, 1001).to(dtype)
    want = torch.nn.functional.gelu(gate.double(), approximate="tanh") * up.double()
    got = torch.ops.swattn.gelu_tanh_mul_(gate.clone(), up)
    # fp32: a few ulps of the fast tanh; bf16: one rounding of the result
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol)
    g = gate.clone()
    assert torch.ops.swattn.gelu_tanh_mul_(g, up).data_ptr() == g.data_ptr()  # in place


@pytest.mark.parametrize("batch,rows", [(1, 1), (2, 3), (1, 41)])
def test_gated_gelu_on_the_halves_of_a_fused_product(batch, rows):
    """Gate and up as the two halves of one (rows, 2 x features) product: strided rows, written
    in place in the gate's half only; a 3-D batch, and 41 rows, which the threads split mid-row."""
    torch.manual_seed(2)
    fused = torch.randn(batch, rows, 2 * 1001)
    fused[..., :1001] *= 4  # the gate's half, as the contiguous test's
    before = fused.clone()
    gate, up = fused.chunk(2, dim=-1)
    want = torch.nn.functional.gelu(gate.double(), approximate="tanh") * up.double()
    got = torch.ops.swattn.gelu_tanh_mul_(gate, up)
    assert got.data_ptr() == fused.data_ptr()
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(fused[..., 1001:], before[..., 1001:])  # up untouched
    with pytest.raises(RuntimeError, match="last dimension contiguous"):
        torch.ops.swattn.gelu_tanh_mul_(gate.transpose(-1, -2), up.transpose(-1, -2))


KV_TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.int8: 3e-2}


@pytest.mark.parametrize("simd", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("kv_dtype", list(KV_TOL), ids=str)
@pytest.mark.parametrize("kind", ["ring", "full"])
def test_caches_in_every_kv_dtype_against_the_fp32_oracle(kv_dtype, kind, simd, native_decode):
    """Chunked prefill then decode steps, keys and values stored as kv_dtype; outputs in fp32."""
    native_decode(simd)
    window, dim = 6, 32
    make = lambda: RingCache(2, 2, dim, window, kv_dtype=kv_dtype) if kind == "ring" else \
        FullCache(2, 2, dim, kv_dtype=kv_dtype)  # noqa: E731
    cache = make()
    g = torch.Generator().manual_seed(5)
    n = 25
    q, k, v = torch.randn(2, 4, n, dim, generator=g), torch.randn(2, 2, n, dim, generator=g), torch.randn(2, 2, n, dim, generator=g)
    pos = torch.arange(n).expand(2, -1)
    outs, start = [], 0
    for size in (4, 9, 1, 1, 5, 1, 1, 1, 1, 1):  # prefill chunks and decode steps
        s = slice(start, start + size)
        outs.append(cache.attend(q[:, :, s], k[:, :, s], v[:, :, s], pos[:, s], softcap=10.0))
        start += size
    got = torch.cat(outs, dim=2)
    want = reference_attention(q, k, v, window if kind == "ring" else None, softcap=10.0, q_pos=pos, k_pos=pos)
    torch.testing.assert_close(got, want.float(), atol=KV_TOL[kv_dtype], rtol=KV_TOL[kv_dtype])
    assert cache.k.dtype == kv_dtype and got.dtype == torch.float32
    if kv_dtype == torch.int8:  # half of bf16's bytes per stored value (plus a scale per token and head)
        assert cache.k.element_size() == 1 and cache.k_scale.shape == cache.k.shape[:3]
    # save / restore carries every buffer (the int8 scales included): both continue alike
    fresh = make()
    fresh.restore(cache.save())
    x = torch.randn(2, 4, 1, dim, generator=g)
    step = torch.full((2, 1), n)
    kx, vx = x[:, :2], x[:, 2:]
    assert torch.equal(fresh.attend(x, kx, vx, step), cache.attend(x, kx, vx, step))
