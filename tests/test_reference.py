"""The oracle against a per-query loop written straight from the definition."""

import math

import pytest
import torch

import swattn


def loop_attention(q, k, v, window, softcap, scale, q_pos, k_pos):
    """One query at a time, one key at a time: slow, obvious, independent of the oracle."""
    batch, heads, q_len, dim = q.shape
    groups = heads // k.shape[1]
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                p = int(q_pos[b, i])
                keys = [
                    j for j in range(k.shape[2])
                    if 0 <= int(k_pos[b, j]) <= p and (window is None or int(k_pos[b, j]) > p - window)
                ]
                if not keys:
                    continue
                scores = []
                for j in keys:
                    s = float(q[b, h, i].double() @ k[b, h // groups, j].double()) * scale
                    scores.append(softcap * math.tanh(s / softcap) if softcap else s)
                mx = max(scores)
                w = [math.exp(s - mx) for s in scores]
                for wj, j in zip(w, keys):
                    out[b, h, i] += wj / sum(w) * v[b, h // groups, j].double()
    return out


@pytest.mark.parametrize("window,softcap", [(3, None), (None, None), (4, 2.0), (1, None)])
def test_oracle_matches_the_definition(window, softcap):
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 9, 8)
    v = torch.randn(2, 2, 9, 8)
    k_pos = torch.tensor([[3, 7, -1, 0, 5, 2, 8, 1, 4], [-1, -1, 0, 1, 2, 3, 4, 5, 6]])
    q_pos = torch.tensor([[8, 6, 4, 2, 0], [-1, 6, 3, 4, 5]])
    got = swattn.reference_attention(q, k, v, window, softcap=softcap, q_pos=q_pos, k_pos=k_pos)
    want = loop_attention(q, k, v, window, softcap, 8**-0.5, q_pos, k_pos)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
