"""Explicit positions: unrotated ring buffers, empty slots, left padding, chunks at an offset."""

import pytest
import torch

import swattn

from conftest import BACKENDS, assert_matches_oracle, make_qkv, oracle_with_grads, run_with_grads


def check_positional(backend, q, k, v, q_pos, k_pos, window, softcap=None):
    dout = torch.randn_like(q)
    kw = dict(window=window, softcap=softcap, q_pos=q_pos, k_pos=k_pos)
    got = run_with_grads(lambda q, k, v: swattn.sliding_window_attention(q, k, v, backend=backend, **kw),
                         q, k, v, dout)
    assert_matches_oracle(got, oracle_with_grads(q, k, v, dout, **kw))
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 10.0])
def test_ring_buffer_in_slot_order_equals_the_contiguous_window(backend, softcap, small_blocks):
    window, total, new = 16, 53, 5
    q, k, v = make_qkv(2, 4, 2, new, total, 32)
    # a ring holding the last window + new - 1 keys (all the chunk's queries need), each
    # position p in slot p % size: keys out of time order, never rotated
    size = window + new - 1
    ring_pos = torch.arange(total - size, total)
    slots = ring_pos % size
    order = torch.empty_like(slots)
    order[slots] = ring_pos
    k_ring, v_ring = k[:, :, order], v[:, :, order]
    q_pos = torch.arange(total - new, total)
    got = check_positional(backend, q, k_ring, v_ring, q_pos, order, window, softcap)[0]
    contiguous = swattn.sliding_window_attention(q, k, v, window, softcap=softcap, backend=backend)
    torch.testing.assert_close(got, contiguous, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_keys_with_empty_slots(backend, small_blocks):
    q, k, v = make_qkv(2, 6, 3, 20, 47, 16)
    k_pos = torch.stack([torch.randperm(47) for _ in range(2)])
    k_pos[k_pos % 5 == 0] = -1  # slots never written
    q_pos = torch.stack([torch.randperm(47)[:20] for _ in range(2)])
    check_positional(backend, q, k, v, q_pos, k_pos, window=9, softcap=5.0)
    check_positional(backend, q, k, v, q_pos, k_pos, window=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_rows_match_each_row_alone(backend, small_blocks):
    length, pad, window = 30, 7, 6
    q, k, v = make_qkv(2, 4, 2, length, length, 16)
    pos = torch.arange(length).repeat(2, 1)
    pos[1] = torch.arange(length) - pad  # row 1: 7 padding slots, then positions 0..22
    pos[1, :pad] = -1
    out, dq, dk, dv = check_positional(backend, q, k, v, pos, pos, window)
    alone = swattn.sliding_window_attention(q[1:, :, pad:], k[1:, :, pad:], v[1:, :, pad:], window, backend=backend)
    torch.testing.assert_close(out[1:, :, pad:], alone, atol=1e-5, rtol=1e-5)
    assert (out[1, :, :pad] == 0).all()  # padding queries see nothing: zeros, not NaN
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
        assert (grad[1, :, :pad] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_starting_at_an_offset(backend, small_blocks):
    # a prefill chunk of 12 tokens at positions 1000.. over 8 cached keys plus its own
    q, k, v = make_qkv(1, 4, 1, 12, 20, 32)
    k_pos = torch.arange(992, 1012)
    q_pos = torch.arange(1000, 1012)
    got = check_positional(backend, q, k, v, q_pos, k_pos, window=8)[0]
    same = swattn.sliding_window_attention(q, k, v, 8, backend=backend)  # default alignment
    torch.testing.assert_close(got, same, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_queries_that_see_nothing_give_zeros_and_minus_inf_lse(backend, small_blocks):
    q, k, v = make_qkv(1, 2, 1, 3, 5, 8, requires_grad=True)
    q_pos = torch.tensor([2, 100, -1])  # row 1: every key out of window; row 2: padding
    k_pos = torch.tensor([0, 1, 2, -1, -1])
    out, lse = swattn.sliding_window_attention(q, k, v, 2, q_pos=q_pos, k_pos=k_pos, return_lse=True, backend=backend)
    assert (out[:, :, 1:] == 0).all() and torch.isfinite(out).all()
    assert torch.isinf(lse[:, :, 1:]).all() and (lse[:, :, 1:] < 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_matches_the_oracle_and_merges_partial_results(backend, small_blocks):
    q, k, v = make_qkv(2, 4, 2, 25, 40, 16)
    out, lse = swattn.sliding_window_attention(q, k, v, 11, softcap=7.0, return_lse=True, backend=backend)
    ref_out, ref_lse = swattn.reference_attention(q, k, v, 11, softcap=7.0, return_lse=True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 25)
    # attention over keys split in two halves, merged by log-sum-exp, equals the whole
    pos = torch.arange(40)
    halves = [
        swattn.sliding_window_attention(q, k[:, :, s], v[:, :, s], 11, softcap=7.0, q_pos=pos[15:],
                                        k_pos=pos[s], return_lse=True, backend=backend)
        for s in (slice(0, 20), slice(20, 40))
    ]
    total = torch.logaddexp(halves[0][1], halves[1][1])
    merged = sum(o * torch.exp(l - total).nan_to_num().unsqueeze(-1) for o, l in halves)
    torch.testing.assert_close(merged, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len,heads", [(1, 4), (1, 16), (3, 4), (20, 6)],
                         ids=["decode", "decode-many-heads", "few-rows", "prefill"])
def test_whatever_an_empty_slot_holds_never_reaches_the_output(backend, dtype, q_len, heads, small_blocks):
    # every row-count path: <= 8 rows per item (decode), more (tiles, the native bf16 forward)
    q, k, v = make_qkv(2, heads, 2, q_len, 40, 16, dtype=dtype)
    k_pos = torch.stack([torch.randperm(40) for _ in range(2)])
    k_pos[k_pos % 3 == 0] = -1  # empty slots of a cache
    q_pos = torch.full((2, q_len), 39) - torch.arange(q_len).flip(0)
    empty = (k_pos < 0)[:, None, :, None]
    dout = torch.randn_like(q)
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        kf, vf = k.masked_fill(empty, fill), v.masked_fill(empty, fill)
        got = run_with_grads(lambda q, k, v: swattn.sliding_window_attention(
            q, k, v, 9, softcap=5.0, q_pos=q_pos, k_pos=k_pos, backend=backend), q, kf, vf, dout)
        out, dq, dk, dv = got
        assert torch.isfinite(out).all() and torch.isfinite(dq).all()
        results.append((out, dq, dk.masked_fill(empty, 0), dv.masked_fill(empty, 0)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
