"""Random shapes, windows, alignments and positions against the oracle."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import swattn

from conftest import BACKENDS, assert_matches_oracle, make_qkv, oracle_with_grads, run_with_grads


@st.composite
def problems(draw):
    heads_kv = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    k_len = draw(st.integers(1, 70))
    positional = draw(st.booleans())
    q_len = draw(st.integers(1, 70 if positional else k_len))
    return dict(
        batch=draw(st.integers(1, 2)), heads=heads_kv * groups, heads_kv=heads_kv, q_len=q_len, k_len=k_len,
        head_dim=draw(st.sampled_from([1, 3, 8, 17, 32])),
        window=draw(st.one_of(st.none(), st.integers(1, k_len + 3))),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 60))),
        positional=positional, backend=draw(st.sampled_from(BACKENDS)), grads=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_random_problems_match_the_oracle(pb):
    from swattn.ops import blocked, cpu

    torch.manual_seed(pb["seed"])
    # small blocks so that random lengths cross block edges (set by hand: hypothesis reuses the test body)
    saved = cpu.ROWS, cpu.ROWS_FULL, cpu.BLOCK_K, blocked.BLOCK_Q, blocked.BLOCK_K
    cpu.ROWS, cpu.ROWS_FULL, cpu.BLOCK_K, blocked.BLOCK_Q, blocked.BLOCK_K = 8, 8, 8, 4, 8
    try:
        q, k, v = make_qkv(pb["batch"], pb["heads"], pb["heads_kv"], pb["q_len"], pb["k_len"], pb["head_dim"])
        kw = dict(window=pb["window"], softcap=pb["softcap"])
        if pb["positional"]:
            kw["k_pos"] = torch.randint(-2, 60, (pb["batch"], pb["k_len"]))
            kw["q_pos"] = torch.randint(-1, 70, (pb["batch"], pb["q_len"]))
        dout = torch.randn_like(q)
        fast = lambda q, k, v: swattn.sliding_window_attention(q, k, v, backend=pb["backend"], **kw)  # noqa: E731
        ref = oracle_with_grads(q, k, v, dout, **kw)
        if pb["grads"]:
            assert_matches_oracle(run_with_grads(fast, q, k, v, dout), ref)
        else:
            assert_matches_oracle([fast(q, k, v)], ref[:1])
    finally:
        cpu.ROWS, cpu.ROWS_FULL, cpu.BLOCK_K, blocked.BLOCK_Q, blocked.BLOCK_K = saved
