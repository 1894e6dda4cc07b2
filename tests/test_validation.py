"""Bad input gives a clear TypeError/ValueError that names the argument at fault."""

import pytest
import torch

import swattn

ENTRY_POINTS = [swattn.sliding_window_attention, swattn.reference_attention]


def qkv(q_shape=(1, 4, 8, 16), k_shape=(1, 2, 8, 16), dtype=torch.float32):
    return torch.randn(*q_shape, dtype=dtype), torch.randn(*k_shape, dtype=dtype), torch.randn(*k_shape, dtype=dtype)


@pytest.fixture(params=ENTRY_POINTS, ids=["op", "oracle"])
def attn(request):
    return request.param


def raises(attn, exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        attn(*args, **kwargs)


def test_wrong_rank(attn):
    q, k, v = qkv()
    raises(attn, ValueError, "q must have 4 dimensions", q[0], k, v, 4)
    raises(attn, ValueError, "k must have 4 dimensions", q, k[0], v, 4)


def test_not_a_tensor(attn):
    q, k, v = qkv()
    raises(attn, TypeError, "v must be a torch.Tensor", q, k, v.tolist(), 4)


def test_batch_and_head_dim_mismatch(attn):
    q, k, v = qkv()
    raises(attn, ValueError, "batch size of k/v", q, *qkv(k_shape=(2, 2, 8, 16))[1:], 4)
    raises(attn, ValueError, "head_dim of k/v", q, *qkv(k_shape=(1, 2, 8, 8))[1:], 4)
    raises(attn, ValueError, "k and v must have the same shape", q, k, v[:, :, :4], 4)


def test_heads_not_a_multiple_of_heads_kv(attn):
    q, k, v = qkv(k_shape=(1, 3, 8, 16))
    raises(attn, ValueError, r"heads \(4\) must be a multiple of k/v's heads_kv \(3\)", q, k, v, 4)


@pytest.mark.parametrize("window,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("8", TypeError)])
def test_bad_window(attn, window, exc):
    raises(attn, exc, "window", *qkv(), window)


@pytest.mark.parametrize("softcap,exc", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError)])
def test_bad_softcap(attn, softcap, exc):
    raises(attn, exc, "softcap", *qkv(), 4, softcap=softcap)


def test_bad_scale(attn):
    raises(attn, TypeError, "scale", *qkv(), 4, scale=float("nan"))


def test_dtype_and_device_mismatch(attn):
    q, k, v = qkv()
    raises(attn, TypeError, "k has dtype torch.float16 but q has torch.float32", q, k.half(), v, 4)
    raises(attn, TypeError, "q must be float32, bfloat16, float16 or float64", q.int(), k, v, 4)
    raises(attn, ValueError, "v is on meta but q is on cpu", q, k, v.to("meta"), 4)


def test_more_queries_than_keys_without_positions(attn):
    q, k, v = qkv(k_shape=(1, 2, 5, 16))
    raises(attn, ValueError, r"q_len \(8\) > k_len \(5\)", q, k, v, 4)


def test_bad_positions(attn):
    q, k, v = qkv()
    pos = torch.arange(8)
    raises(attn, ValueError, "q_pos and k_pos must be given together", q, k, v, 4, q_pos=pos)
    raises(attn, TypeError, "k_pos must have an integer dtype", q, k, v, 4, q_pos=pos, k_pos=pos.float())
    raises(attn, ValueError, r"q_pos must have shape \(1, 8\)", q, k, v, 4, q_pos=pos[:5], k_pos=pos)
    raises(attn, ValueError, r"k_pos must have shape \(1, 8\)", q, k, v, 4, q_pos=pos, k_pos=pos.repeat(3, 1))
    raises(attn, TypeError, "q_pos must be an integer torch.Tensor", q, k, v, 4, q_pos=list(range(8)), k_pos=pos)
    raises(attn, ValueError, "k_pos is on meta", q, k, v, 4, q_pos=pos, k_pos=pos.to("meta"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        swattn.sliding_window_attention(*qkv(), 4, backend="flash")
    with pytest.raises(ValueError, match="backend 'cpu' takes CPU tensors"):
        swattn.sliding_window_attention(*qkv(dtype=torch.float64), 4, backend="cpu")
