"""The portable backend: blocked sliding-window attention in plain PyTorch ops.

Runs on any device PyTorch runs on (it is the CUDA path, and the CPU fallback when the
compiled kernel cannot be built). Memory: one ``(heads, block_q, block_k)`` score block at
a time, never ``n x n`` nor ``n x w``. Backward recomputes the scores from the saved
output and log-sum-exp (flash-attention's approach).
"""

from __future__ import annotations

import torch

from swattn.ops.plan import plan_blocks
from swattn.ops.validate import Problem
from swattn.window import default_positions, visible

# Block sizes: module attributes, so tests can shrink them to exercise many blocks.
BLOCK_Q = 256
BLOCK_K = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positions(p: Problem, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if p.q_pos is None:
        return default_positions(p.batch, p.q_len, p.k_len, device)
    return p.q_pos, p.k_pos


def _masked_scores(
    qb: torch.Tensor, kc: torch.Tensor, mask: torch.Tensor, p: Problem
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled, soft-capped, masked scores of a block; also tanh's value for the backward.

    qb: (batch, heads_kv, groups * n, head_dim); kc: (batch, heads_kv, kn, head_dim);
    mask: (batch, n, kn). Returns scores (batch, heads_kv, groups * n, kn).
    """
    s = (qb @ kc.transpose(-1, -2)) * p.scale
    t = None
    if p.softcap is not None:
        t = torch.tanh(s / p.softcap)
        s = t * p.softcap
    b, hkv, rows, kn = s.shape
    n = mask.shape[1]
    s = s.view(b, hkv, rows // n, n, kn).masked_fill(~mask[:, None, None], float("-inf"))
    return s.view(b, hkv, rows, kn), t


def _key_tile(x: torch.Tensor, p: Problem, j0: int, j1: int, dtype: torch.dtype) -> torch.Tensor:
    """Keys or values j0:j1 in ``dtype``; empty slots (position -1) as zeros.

    Whatever an empty slot holds (NaN included) must not reach the output: its probability
    is 0, but 0 * NaN is NaN in P.V (and in dS.K).
    """
    tile = x[:, :, j0:j1].to(dtype)
    if p.k_pos is None:
        return tile
    return tile.masked_fill((p.k_pos[:, j0:j1] < 0)[:, None, :, None], 0.0)


def _rows(x: torch.Tensor, p: Problem, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Query-side rows start:stop of all heads of a group: (b, h, L, d) -> (b, hkv, g*n, d)."""
    xg = x.view(p.batch, p.heads_kv, p.groups, x.shape[2], x.shape[3])[:, :, :, start:stop]
    return xg.to(dtype).reshape(p.batch, p.heads_kv, p.groups * (stop - start), x.shape[3])


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives ``(out, lse)``: out like q, lse ``(batch, heads, q_len)`` float32."""
    cdt = _compute_dtype(q.dtype)
    qp, kp = _positions(p, q.device)
    out = torch.zeros_like(q)
    lse = torch.full((p.batch, p.heads, p.q_len), float("-inf"), device=q.device, dtype=torch.float32)
    out_g = out.view(p.batch, p.heads_kv, p.groups, p.q_len, p.head_dim)
    lse_g = lse.view(p.batch, p.heads_kv, p.groups, p.q_len)
    for blk in plan_blocks(p, BLOCK_Q, BLOCK_K):
        i0, i1 = blk.start, blk.stop
        if not blk.key_ranges:
            continue
        qb = _rows(q, p, i0, i1, cdt)
        m = torch.full(qb.shape[:-1], float("-inf"), device=q.device, dtype=cdt)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(qb)
        for j0, j1 in blk.key_ranges:
            mask = visible(qp[:, i0:i1], kp[:, j0:j1], p.window)
            s, _ = _masked_scores(qb, _key_tile(k, p, j0, j1, cdt), mask, p)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with no key yet
            probs = torch.exp(s - m_safe.unsqueeze(-1))
            corr = torch.exp(m - m_safe)
            l = l * corr + probs.sum(-1)
            acc = acc * corr.unsqueeze(-1) + probs @ _key_tile(v, p, j0, j1, cdt)
            m = m_new
        seen = l > 0
        o = torch.where(seen.unsqueeze(-1), acc / l.clamp_min(1e-30).unsqueeze(-1), torch.zeros_like(acc))
        n = i1 - i0
        out_g[:, :, :, i0:i1] = o.view(p.batch, p.heads_kv, p.groups, n, p.head_dim).to(q.dtype)
        blk_lse = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), torch.full_like(m, float("-inf")))
        lse_g[:, :, :, i0:i1] = blk_lse.view(p.batch, p.heads_kv, p.groups, n).float()
    return out, lse


def backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    dout: torch.Tensor, p: Problem,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gives ``(dq, dk, dv)`` by recomputing each score block from ``lse``."""
    cdt = _compute_dtype(q.dtype)
    qp, kp = _positions(p, q.device)
    dq = torch.zeros_like(q)
    dk = torch.zeros(k.shape, device=k.device, dtype=cdt)
    dv = torch.zeros(v.shape, device=v.device, dtype=cdt)
    dq_g = dq.view(p.batch, p.heads_kv, p.groups, p.q_len, p.head_dim)
    lse_g = lse.view(p.batch, p.heads_kv, p.groups, p.q_len)
    for blk in plan_blocks(p, BLOCK_Q, BLOCK_K):
        i0, i1 = blk.start, blk.stop
        if not blk.key_ranges:
            continue
        n = i1 - i0
        qb = _rows(q, p, i0, i1, cdt)
        dob = _rows(dout, p, i0, i1, cdt)
        delta = (dob * _rows(out, p, i0, i1, cdt)).sum(-1, keepdim=True)
        blk_lse = lse_g[:, :, :, i0:i1].reshape(p.batch, p.heads_kv, p.groups * n, 1).to(cdt)
        blk_lse = blk_lse.masked_fill(torch.isinf(blk_lse), 0.0)  # such rows are fully masked
        dqb = torch.zeros_like(qb)
        for j0, j1 in blk.key_ranges:
            kc, vc = _key_tile(k, p, j0, j1, cdt), _key_tile(v, p, j0, j1, cdt)
            mask = visible(qp[:, i0:i1], kp[:, j0:j1], p.window)
            s, t = _masked_scores(qb, kc, mask, p)
            probs = torch.exp(s - blk_lse)
            dv[:, :, j0:j1] += probs.transpose(-1, -2) @ dob
            ds = probs * (dob @ vc.transpose(-1, -2) - delta)
            if t is not None:
                ds = ds * (1 - t * t)  # d(cap * tanh(x / cap)) / dx
            dqb += (ds @ kc) * p.scale
            dk[:, :, j0:j1] += (ds.transpose(-1, -2) @ qb) * p.scale
        dq_g[:, :, :, i0:i1] = dqb.view(p.batch, p.heads_kv, p.groups, n, p.head_dim).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
