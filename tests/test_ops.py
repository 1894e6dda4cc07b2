"""Every backend against the float64 oracle, forward and dq/dk/dv, over what breaks kernels."""

import pytest
import torch

import swattn
from swattn.ops import cpu

from conftest import BACKENDS, assert_matches_oracle, make_qkv, oracle_with_grads, run_with_grads

# The compiled kernel runs its own AVX-512 products where it can ("native"); "cpu-sgemm" forces
# the BLAS path that every other machine gets, so both stay tested here.
OP_BACKENDS = BACKENDS + ["cpu-sgemm"]


def check(backend, batch, heads, heads_kv, q_len, k_len, head_dim, window, softcap=None,
          dtype=torch.float32, scale=None):
    q, k, v = make_qkv(batch, heads, heads_kv, q_len, k_len, head_dim, dtype)
    dout = torch.randn(batch, heads, q_len, head_dim, dtype=dtype)
    kw = dict(window=window, softcap=softcap, scale=scale)
    native = backend != "cpu-sgemm"
    backend = "cpu" if backend == "cpu-sgemm" else backend
    switches = (cpu.native_fp32, cpu.native_bf16) if cpu.available() else ()
    try:
        for switch in switches:
            switch(native)
        got = run_with_grads(lambda q, k, v: swattn.sliding_window_attention(q, k, v, backend=backend, **kw),
                             q, k, v, dout)
    finally:
        for switch in switches:
            switch(True)
    ref = oracle_with_grads(q, k, v, dout, **kw)
    low = None if dtype == torch.float32 else oracle_with_grads(q, k, v, dout, compute_dtype=dtype, **kw)
    assert_matches_oracle(got, ref, low)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("head_dim", [16, 33, 64, 128, 256])
def test_head_dims(backend, head_dim, small_blocks):
    check(backend, 1, 4, 2, 45, 45, head_dim, window=10, softcap=20.0)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("window", [1, 2, 7, 37, 50, 80, None])  # 50 = the length
@pytest.mark.parametrize("heads,heads_kv", [(3, 3), (6, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_windows_heads_softcap(backend, window, heads, heads_kv, softcap, small_blocks):
    check(backend, 2, heads, heads_kv, 50, 50, 24, window=window, softcap=softcap)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("q_len,k_len", [(1, 41), (5, 41), (17, 41), (41, 41)])
@pytest.mark.parametrize("window", [6, None])
def test_fewer_queries_than_keys(backend, q_len, k_len, window, small_blocks):
    check(backend, 2, 4, 2, q_len, k_len, 32, window=window, softcap=30.0)


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_low_precision(backend, dtype, softcap, small_blocks):
    check(backend, 1, 4, 2, 61, 61, 64, window=13, softcap=softcap, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocks_longer_than_a_key_tile(backend):
    # 700 keys > both backends' default key tile: exercises the running max across tiles
    check(backend, 1, 2, 1, 700, 700, 64, window=None, softcap=None)
    check(backend, 1, 8, 4, 333, 700, 128, window=600, softcap=50.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma_scale(backend, small_blocks):
    # Gemma 2 passes query_pre_attn_scalar ** -0.5, not head_dim ** -0.5
    check(backend, 1, 4, 2, 30, 30, 32, window=8, softcap=50.0, scale=256**-0.5)


def test_large_scores_stay_finite():
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16)
    out = swattn.sliding_window_attention(q * 300, k * 300, v, 9)
    ref = swattn.reference_attention(q.double() * 300, k.double() * 300, v.double(), 9)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_auto_picks_the_compiled_kernel_on_cpu(monkeypatch):
    from swattn.ops import api, blocked, cpu

    q = torch.randn(1, 1, 4, 8)
    assert api._select_backend(None, q) is cpu
    assert api._select_backend(None, q.double()) is blocked
    monkeypatch.setenv("SWATTN_BACKEND", "blocked")
    assert api._select_backend(None, q) is blocked


def test_float64_runs_on_the_portable_path_and_passes_gradcheck(small_blocks):
    q, k, v = (t.double().requires_grad_() for t in make_qkv(1, 2, 1, 9, 9, 4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: swattn.sliding_window_attention(q, k, v, 3, softcap=2.0), (q, k, v)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_run_unchanged():
    q, k, v = (t.cuda() for t in make_qkv(1, 4, 2, 300, 300, 64))
    out = swattn.sliding_window_attention(q, k, v, 37, softcap=30.0)
    ref = swattn.reference_attention(q, k, v, 37, softcap=30.0)
    assert out.device == q.device
    torch.testing.assert_close(out.double(), ref.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keys_that_are_a_prefix_of_a_larger_buffer(backend, small_blocks):
    # a cache hands over k[:, :, :used] of a preallocated buffer: strided across heads
    q, k_buf, v_buf = make_qkv(2, 4, 2, 9, 64, 16)
    k, v = k_buf[:, :, :40], v_buf[:, :, :40]
    assert not k.is_contiguous()
    dout = torch.randn_like(q)
    got = run_with_grads(lambda q, k, v: swattn.sliding_window_attention(q, k, v, 11, backend=backend), q, k, v, dout)
    assert_matches_oracle(got, oracle_with_grads(q, k, v, dout, window=11))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [3, 9, 20])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_query_blocks_much_taller_than_key_tiles(monkeypatch, dtype, window, softcap):
    # block_q >= block_k + 2: a row's window can start past the end of a tile its block visits,
    # so the per-row key range must be clamped to the tile (forward and backward)
    from swattn.ops import cpu

    monkeypatch.setattr(cpu, "ROWS", 64)
    monkeypatch.setattr(cpu, "ROWS_FULL", 64)
    monkeypatch.setattr(cpu, "BLOCK_K", 4)
    check("cpu", 1, 2, 2, 150, 150, 16, window=window, softcap=softcap, dtype=dtype)
    check("cpu", 2, 4, 2, 70, 150, 16, window=window, softcap=softcap, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("heads,heads_kv", [(4, 2), (8, 1)], ids=["gqa", "mqa-8-rows"])
@pytest.mark.parametrize("window", [5, None])
def test_low_precision_decode_rows(backend, dtype, q_len, heads, heads_kv, window):
    # one query (or a few) per row: the <= 8-row path of the CPU kernel, in bf16/fp16
    check(backend, 2, heads, heads_kv, q_len, 37, 64, window=window, softcap=30.0, dtype=dtype)
