#!/usr/bin/env python
"""Sliding-window attention, side by side: swattn vs SDPA with a dense mask vs FlexAttention.

One table, one run, the same seeded inputs for every implementation: median time, achieved
GFLOP/s (window-aware count, also as a fraction of this machine's matmul rate measured in
the same run) and peak memory. Each cell runs in a fresh subprocess so that its peak
memory is its own, and a peer that fails (out of memory, no backward) is shown as such.

    python benchmarks/attention.py            # the full grid (hours on 2 cores)
    python benchmarks/attention.py --quick    # about a minute
    python benchmarks/attention.py --n 16384 --window 1024 --head-dim 128   # a slice
    swattn bench attention [same options]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import swattn
from swattn import dtypes
from swattn.profiling import attention_flops, cell_worker, describe_rates, fmt_bytes, matmul_rates, measure, run_cell_in_subprocess
from swattn.window import visible

IMPLS = ("swattn", "sdpa_dense", "flex")
DTYPES = dtypes.SHORT
BATCH, HEADS, HEADS_KV = 1, 8, 4


def _inputs(n: int, head_dim: int, dtype: torch.dtype, grad: bool):
    gen = torch.Generator().manual_seed(1234)  # same inputs for every implementation
    shapes = [(BATCH, HEADS, n, head_dim), (BATCH, HEADS_KV, n, head_dim), (BATCH, HEADS_KV, n, head_dim)]
    qkv = [torch.randn(s, generator=gen).to(dtype).requires_grad_(grad) for s in shapes]
    dout = torch.randn(shapes[0], generator=gen).to(dtype) if grad else None
    return qkv, dout


def _attention_fn(impl: str, q, k, v, window: int):
    """Gives a callable running one forward of ``impl``, and the bytes of what it prepared."""
    n = q.shape[2]
    if impl == "swattn":
        return (lambda: swattn.sliding_window_attention(q, k, v, window)), 0
    if impl == "sdpa_dense":
        pos = torch.arange(n)
        mask = visible(pos, pos, window)  # (n, n) bool: the n^2 cost this peer pays
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return (lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True)), mask.numel()
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def in_window(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < window)

        block_mask = create_block_mask(in_window, None, None, n, n, device="cpu")
        mask_bytes = sum(t.numel() * t.element_size() for t in block_mask.as_tuple() if isinstance(t, torch.Tensor))
        compiled = torch.compile(flex_attention, dynamic=False)
        return (lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)), mask_bytes
    raise ValueError(f"unknown implementation {impl!r}")


def run_cell(cell: dict) -> dict:
    """Measures one implementation on one configuration, in this process (a fresh one per cell).

    Peak memory = the bytes of the inputs (and the output gradient) and of what the
    implementation prepared (a dense mask, a block mask), plus the peak growth of resident
    memory while the timed runs execute (``measure``: its baseline, taken after a warm-up,
    keeps out what the first call loads once: libraries, the compiler's own state).
    """
    torch.set_num_threads(cell["threads"])
    grad = cell["mode"] == "fwd+bwd"
    (q, k, v), dout = _inputs(cell["n"], cell["head_dim"], DTYPES[cell["dtype"]], grad)
    forward, prepared_bytes = _attention_fn(cell["impl"], q, k, v, cell["window"])

    def step():
        if not grad:
            with torch.no_grad():
                return forward()
        forward().backward(dout)
        for t in (q, k, v):  # so that the gradients count in each run's peak, not the baseline
            t.grad = None

    seconds, growth = measure(step, repeat=cell["repeat"])
    tensor_bytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    inputs = [q, k, v] + ([dout] if grad else [])
    io = [q, k, v, q] + ([q, k, v, q] if grad else [])  # q, k, v, out (and their gradients)
    return {
        "seconds": seconds,
        "peak": tensor_bytes(inputs) + prepared_bytes + growth,
        "io_bytes": tensor_bytes(io),
    }


def _grid(args) -> list[dict]:
    cells = []
    for n in args.n:
        for window in args.window:
            for head_dim in args.head_dim:
                for dtype in args.dtype:
                    for mode in args.mode:
                        cells.append(dict(n=n, window=window, head_dim=head_dim, dtype=dtype, mode=mode))
    return cells


def _skip_reason(impl: str, cfg: dict, args, done: dict) -> str | None:
    """Why a peer is not run on a configuration (stated in the table), or None."""
    if impl == "flex" and args.quick and cfg["mode"] != "fwd":
        return "not in --quick"
    if impl == "sdpa_dense" and cfg["n"] > args.dense_max_n:
        # dense attention costs n^2: extrapolate from the largest size measured in this run
        smaller = [(k[0], r["seconds"]) for k, r in done.items()
                   if k[1:] == (impl, cfg["window"], cfg["head_dim"], cfg["dtype"], cfg["mode"]) and "seconds" in r]
        if smaller:
            n0, s0 = max(smaller)
            return f"not run: n^2, est. {s0 * (cfg['n'] / n0) ** 2 / 60:.0f} min"
        return f"not run: n^2 (n > --dense-max-n {args.dense_max_n})"
    return None


def _fmt_peer(result: dict, ours: dict | None) -> str:
    if "seconds" not in result:
        return f"{result.get('skip') or result.get('error'):>34}"
    speedup = result["seconds"] / ours["seconds"] if ours and "seconds" in ours else float("nan")
    return f"{result['seconds'] * 1e3:9.0f} ms {speedup:6.1f}x {fmt_bytes(result['peak']):>9}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench attention", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n=4096, w=1024, D=128, fp32, 2 runs: about a minute")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--window", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--mode", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per cell (median reported)")
    parser.add_argument("--dense-max-n", type=int, default=16384,
                        help="largest n for SDPA with a dense mask (its time grows as n^2)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a cell is abandoned")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cell_worker(run_cell, args.worker)
        return 0
    if args.quick:
        args.n, args.window, args.head_dim, args.dtype, args.repeat = [4096], [1024], [128], ["fp32"], 2

    threads = torch.get_num_threads()
    print(f"# sliding-window attention, batch {BATCH}, heads {HEADS}/{HEADS_KV} (q/kv), torch {torch.__version__}, "
          f"{threads} threads", flush=True)
    products = {name: matmul_rates(dt) for name, dt in DTYPES.items() if name in args.dtype}
    rates = {name: max(r.values()) for name, r in products.items()}
    print("# matmul 1024^3 measured now, GFLOP/s, best (each product; %mm is of the best): "
          + ", ".join(f"{k} {describe_rates(v)}" for k, v in products.items()), flush=True)
    print("# times are medians; 'x' = peer time / swattn time; peak = inputs + prepared masks + peak growth "
          "of resident memory while running", flush=True)
    peers = [i for i in args.impl if i != "swattn"]
    header = f"{'n':>6} {'w':>5} {'D':>4} {'dtype':>5} {'pass':>7} | {'swattn':>9}    {'GFLOP/s':>7} {'%mm':>4} {'peak':>9} {'/io':>5}"
    for peer in peers:
        header += f" | {peer:>34}"
    print(header)
    print("-" * len(header))

    done: dict[tuple, dict] = {}
    for cfg in _grid(args):
        row = {}
        for impl in args.impl:
            cell = dict(cfg, impl=impl, repeat=args.repeat, threads=threads)
            reason = _skip_reason(impl, cfg, args, done)
            result = {"skip": reason} if reason else run_cell_in_subprocess(os.path.abspath(__file__), cell, args.timeout)
            key = (cfg["n"], impl, cfg["window"], cfg["head_dim"], cfg["dtype"], cfg["mode"])
            done[key] = row[impl] = result
        ours = row.get("swattn")
        line = f"{cfg['n']:>6} {cfg['window']:>5} {cfg['head_dim']:>4} {cfg['dtype']:>5} {cfg['mode']:>7} | "
        if ours and "seconds" in ours:
            flops = attention_flops(cfg["n"], cfg["window"], HEADS, cfg["head_dim"], cfg["mode"] == "fwd+bwd")
            gflops = flops / ours["seconds"] / 1e9
            line += (f"{ours['seconds'] * 1e3:9.0f} ms {gflops:7.1f} {100 * gflops / rates[cfg['dtype']]:3.0f}% "
                     f"{fmt_bytes(ours['peak']):>9} {ours['peak'] / ours['io_bytes']:5.2f}")
        else:
            line += f"{(ours or {}).get('error', 'not run'):>42}"
        for peer in peers:
            line += " | " + _fmt_peer(row[peer], ours)
        print(line, flush=True)
    print("# /io = swattn's peak over the bytes of q, k, v, out (and, with the backward, their gradients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
