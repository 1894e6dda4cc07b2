"""The compiled kernel's native bf16 forward (AVX512_BF16 pair products) against the oracle.

It runs only where the kernel was built for a CPU with those instructions; elsewhere bf16
goes through the fp32 path, which the other op tests cover. Shapes are chosen to hit the
path's edges: odd head dims (an unpaired last dimension), key counts that are odd and not
a multiple of the 12-key kernel or the 256-key sub-tile, rows padded to 32, positions.
"""

import pytest
import torch

import swattn
from swattn.ops import cpu

from conftest import assert_matches_oracle

pytestmark = pytest.mark.skipif(not (cpu.available() and cpu.native_bf16()),
                                reason="kernel built without AVX512_BF16 here: bf16 runs the fp32 path")


def check(batch, heads, heads_kv, q_len, k_len, head_dim, window, softcap=None, q_pos=None, k_pos=None):
    shape = lambda h, n: (batch, h, n, head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h, n)).bfloat16() for h, n in ((heads, q_len), (heads_kv, k_len), (heads_kv, k_len)))
    kw = dict(window=window, softcap=softcap, q_pos=q_pos, k_pos=k_pos)
    got = swattn.sliding_window_attention(q, k, v, backend="cpu", **kw)
    ref = swattn.reference_attention(q.double(), k.double(), v.double(), **kw)
    low = swattn.reference_attention(q, k, v, compute_dtype=torch.bfloat16, **kw)
    assert_matches_oracle([got], [ref], [low])
    return q, k, v, kw, got


@pytest.mark.parametrize("head_dim", [16, 33, 64, 128, 256])
@pytest.mark.parametrize("window", [1, 7, 300, None])
def test_head_dims_and_windows(head_dim, window):
    check(1, 4, 2, 301, 301, head_dim, window, softcap=30.0)


@pytest.mark.parametrize("heads,heads_kv", [(3, 3), (6, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("q_len,k_len", [(9, 9), (37, 600), (600, 600)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_heads_lengths_softcap(heads, heads_kv, q_len, k_len, softcap):
    check(2, heads, heads_kv, q_len, k_len, 40, window=257, softcap=softcap)


def test_positions_with_empty_slots_and_padding(small_blocks):
    k_len = 45
    k_pos = torch.randperm(100)[:k_len].sort().values.view(1, -1).repeat(2, 1)
    k_pos[:, ::7] = -1  # empty slots
    q_pos = torch.arange(60, 100).view(1, -1).repeat(2, 1)
    q_pos[1, :5] = -1  # padding queries see nothing: zeros
    _, _, _, _, out = check(2, 4, 2, 40, k_len, 24, window=30, softcap=20.0, q_pos=q_pos, k_pos=k_pos)
    assert torch.equal(out[1, :, :5], torch.zeros_like(out[1, :, :5]))


def test_agrees_with_the_fp32_path():
    q, k, v = (torch.randn(1, 8 // r, 700, 128).bfloat16() for r in (1, 2, 2))
    native = swattn.sliding_window_attention(q, k, v, 256, softcap=50.0, backend="cpu")
    try:
        cpu.native_bf16(False)
        converted = swattn.sliding_window_attention(q, k, v, 256, softcap=50.0, backend="cpu")
    finally:
        cpu.native_bf16(True)
    assert (native.float() - converted.float()).abs().max().item() < 2e-2
    assert not torch.equal(native, converted)  # two paths really ran


def test_keys_that_are_a_prefix_of_a_larger_buffer():
    """A full cache hands over a prefix view of its buffer (batch and head strides larger than
    the keys); the native path must read it in place."""
    big_k, big_v = torch.randn(2, 2, 900, 64).bfloat16(), torch.randn(2, 2, 900, 64).bfloat16()
    k, v = big_k[:, :, :517], big_v[:, :, :517]
    assert not k.is_contiguous()
    q = torch.randn(2, 4, 100, 64).bfloat16()
    got = swattn.sliding_window_attention(q, k, v, 300, softcap=30.0, backend="cpu")
    want = swattn.sliding_window_attention(q, k.contiguous(), v.contiguous(), 300, softcap=30.0, backend="cpu")
    assert torch.equal(got, want)
    ref = swattn.reference_attention(q.double(), k.double(), v.double(), 300, softcap=30.0)
    low = swattn.reference_attention(q, k, v, 300, softcap=30.0, compute_dtype=torch.bfloat16)
    assert_matches_oracle([got], [ref], [low])
