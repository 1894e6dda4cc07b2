"""``swattn demo``: sliding-window attention on a long sequence, next to dense attention.

Runs the op on built-in defaults, checks a slice of its output against the float64 oracle,
and prints time and memory side by side with PyTorch's SDPA given the same window as a
dense n x n mask (what one does without swattn).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from swattn.ops.api import sliding_window_attention
from swattn.ops.reference import reference_attention
from swattn.profiling import attention_flops, fmt_bytes, measure
from swattn.window import visible


@dataclass
class DemoConfig:
    """What the demo runs: one long sequence, Gemma 2 2b's attention shape by default."""

    n: int = 16384
    window: int = 4096
    heads: int = 8
    heads_kv: int = 4
    head_dim: int = 128
    softcap: float | None = 50.0
    check_queries: int = 256
    dense: bool = True


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Runs the demo, printing as it goes; gives the measured figures."""
    _say(
        f"swattn demo: {cfg.n:,} tokens, window {cfg.window:,}, {cfg.heads} query / {cfg.heads_kv} kv heads, "
        f"head_dim {cfg.head_dim}, soft-cap {cfg.softcap}, float32, {torch.get_num_threads()} threads"
    )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.heads, cfg.n, cfg.head_dim, generator=gen)
    k = torch.randn(1, cfg.heads_kv, cfg.n, cfg.head_dim, generator=gen)
    v = torch.randn(1, cfg.heads_kv, cfg.n, cfg.head_dim, generator=gen)
    io_bytes = 2 * (q.numel() + k.numel() + v.numel()) * 4  # q, k, v and out

    _say("[1/3] swattn (the first run builds the CPU kernel for this machine once)...")
    start = time.perf_counter()
    out = sliding_window_attention(q, k, v, cfg.window, softcap=cfg.softcap)
    first = time.perf_counter() - start
    # the first call was the warm-up; one timed run keeps the demo near a minute
    ours_s, ours_growth = measure(lambda: sliding_window_attention(q, k, v, cfg.window, softcap=cfg.softcap),
                                  repeat=1, warmup=False)
    gflops = attention_flops(cfg.n, cfg.window, cfg.heads, cfg.head_dim) / ours_s / 1e9
    _say(f"      {ours_s:.2f} s ({gflops:.0f} GFLOP/s, window-aware count; first call {first:.1f} s), "
         f"memory beyond q/k/v: {fmt_bytes(ours_growth)}")

    _say(f"[2/3] checking the last {cfg.check_queries} queries against the float64 oracle...")
    m = min(cfg.check_queries, cfg.n)
    lo = max(0, cfg.n - m - cfg.window + 1)  # the only keys those queries can see
    pos = torch.arange(cfg.n)
    ref = reference_attention(q[:, :, -m:], k[:, :, lo:], v[:, :, lo:], cfg.window, softcap=cfg.softcap,
                              q_pos=pos[-m:], k_pos=pos[lo:])
    err = (out[:, :, -m:].double() - ref.double()).abs().max().item()
    ok = err < 1e-4
    _say(f"      max abs error {err:.1e} {'(ok)' if ok else '(TOO LARGE)'}")

    result = {"seconds": ours_s, "growth": ours_growth, "gflops": gflops, "error": err, "ok": ok}
    if cfg.dense:
        _say("[3/3] dense attention: SDPA with the same window as an n x n boolean mask...")
        mask = visible(pos, pos, cfg.window)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        # SDPA cannot soft-cap: it is timed without it, which only flatters it
        dense_s, dense_growth = measure(lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True), repeat=1,
                                        warmup=False)
        dense_mem = dense_growth + mask.numel()
        result.update(dense_seconds=dense_s, dense_memory=dense_mem)
        eager_scores = cfg.heads * cfg.n * cfg.n * 4
        _say("")
        _say(f"{'':24}{'time':>10}{'memory beyond q/k/v':>22}")
        _say(f"{'swattn':24}{ours_s:>9.2f}s{fmt_bytes(ours_growth):>22}")
        _say(f"{'SDPA + dense mask':24}{dense_s:>9.2f}s{fmt_bytes(dense_mem):>22}   "
             f"({dense_s / ours_s:.1f}x slower)")
        _say(f"{'eager (scores held)':24}{'not run':>10}{fmt_bytes(eager_scores):>22}   "
             f"(one n x n fp32 score matrix per head, as transformers' eager path builds)")
    _say(f"\nq/k/v/out themselves: {fmt_bytes(io_bytes)}. swattn's time and memory grow as n x window, "
         "dense attention's as n^2.")
    return result
