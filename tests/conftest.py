"""Shared fixtures and the oracle comparison used by every op test."""

from __future__ import annotations

import pytest
import torch

import swattn
from swattn.ops import blocked, cpu, linear

BACKENDS = ["cpu", "blocked"]


# tests of prepacked (oneDNN blocked-layout) bf16 weights: run wherever oneDNN has bf16 arithmetic
needs_prepack = pytest.mark.skipif(not linear.can_prepack(torch.empty(1, 1, dtype=torch.bfloat16)),
                                   reason="this CPU's oneDNN has no bf16 arithmetic")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrinks every backend's blocks so small inputs span many query and key blocks."""
    monkeypatch.setattr(cpu, "ROWS", 16)
    monkeypatch.setattr(cpu, "ROWS_FULL", 16)
    monkeypatch.setattr(cpu, "BLOCK_K", 16)
    monkeypatch.setattr(blocked, "BLOCK_Q", 8)
    monkeypatch.setattr(blocked, "BLOCK_K", 16)


def make_qkv(batch, heads, heads_kv, q_len, k_len, head_dim, dtype=torch.float32, requires_grad=False):
    q = torch.randn(batch, heads, q_len, head_dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, k_len, head_dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, k_len, head_dim, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run_with_grads(fn, q, k, v, dout):
    """Gives (out, dq, dk, dv) of fn on fresh leaf copies of q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def tolerance(dtype: torch.dtype, low_precision_error: float, magnitude: float) -> float:
    """How far a fast path may be from the float64 oracle.

    float32: far below 1e-4 relative to the result's magnitude. bf16/fp16: at most twice the
    error the same oracle makes when run in that precision (flash-attention's criterion),
    plus one unit in the last place of the output.
    """
    if dtype == torch.float32:
        return 2e-5 * max(1.0, magnitude)
    ulp = torch.finfo(dtype).eps * max(1.0, magnitude)
    return 2 * low_precision_error + ulp


def assert_matches_oracle(got, ref64, ref_low=None):
    """Compares tensors (out or grads) of a fast path with the float64 oracle's."""
    for name, g, r, rl in zip(("out", "dq", "dk", "dv"), got, ref64, ref_low or [None] * 4):
        assert g.dtype == got[0].dtype
        assert not torch.isnan(g).any(), f"{name} has NaN"
        err = (g.double() - r.double()).abs().max().item()
        low_err = 0.0 if rl is None else (rl.double() - r.double()).abs().max().item()
        tol = tolerance(g.dtype, low_err, r.abs().max().item())
        assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g}"


def oracle_with_grads(q, k, v, dout, compute_dtype=torch.float64, **kw):
    fn = lambda q, k, v: swattn.reference_attention(q, k, v, compute_dtype=compute_dtype, **kw)  # noqa: E731
    if compute_dtype == torch.float64:
        q, k, v, dout = (t.double() for t in (q, k, v, dout))
    return run_with_grads(fn, q, k, v, dout)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A few of Python's own modules as training text (every machine has them)."""
    import json as json_module
    import shutil
    import textwrap
    from pathlib import Path

    d = tmp_path_factory.mktemp("corpus")
    for f in sorted(Path(json_module.__file__).parent.glob("*.py")) + [Path(textwrap.__file__)]:
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="session")
def tiny_trained(corpus_dir, tmp_path_factory):
    """A tiny Gemma 2 trained by swattn train for a few steps, saved in float32: (directory, result)."""
    from swattn.training.trainer import TrainArgs, train

    out = tmp_path_factory.mktemp("tiny_model")
    result = train(TrainArgs(data=[str(corpus_dir)], out=str(out), preset="tiny", steps=30, eval_every=10,
                             save_dtype="float32", precision="fp32"), log=lambda _: None, progress=False)
    return out, result
