#!/usr/bin/env python
"""KV caches for sliding-window decoding: per-token time and memory as the context grows.

One local layer (a ring of `window` slots) and one global layer (a full cache) of Gemma 2
2b's attention shape, decoding one token at a time after contexts of 1k to 128k tokens:
median time per decoded token (cache write + attention) and the cache's memory; next to
transformers' sliding-window cache layer where transformers is installed. For the global
layer also the rate at which the step reads its cache (keys and values as stored), beside
the machine's read rate measured first (a cache not much larger than the last-level cache is
read partly from there, and can beat it). Then the ring's memory after a million decoded tokens.

    python benchmarks/cache.py            # contexts 1k..128k, then 1,000,000 decode steps
    python benchmarks/cache.py --quick    # contexts up to 16k, 20,000 decode steps
    python benchmarks/cache.py --contexts 16384 --kv-dtype bf16 --million 0   # a bf16 cache's read rate
    swattn bench cache [same options]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from swattn import dtypes
from swattn.cache import FullCache, RingCache
from swattn.profiling import fmt_bytes, read_bandwidth

HEADS, HEADS_KV, HEAD_DIM, SOFTCAP = 8, 4, 256, 50.0
SCALE = 256**-0.5
FILL_CHUNK = 4096


def _fill(cache, context: int, gen: torch.Generator) -> None:
    """Stores `context` tokens (no attention needed to fill a cache)."""
    for start in range(0, context, FILL_CHUNK):
        n = min(FILL_CHUNK, context - start)
        if isinstance(cache, RingCache) and start + n <= context - cache.window:
            continue  # these tokens would be overwritten: the ring keeps the last `window`
        kv = torch.randn(1, HEADS_KV, n, HEAD_DIM, generator=gen)
        cache.update(kv, kv, torch.arange(start, start + n))


def _decode_ms(step, steps: int) -> float:
    step(0)  # warm-up
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _swattn_step(cache, context: int, steps: int, gen: torch.Generator):
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen)
    kv = torch.randn(1, HEADS_KV, 1, HEAD_DIM, generator=gen)
    positions = [torch.tensor([context + i]) for i in range(steps + 1)]  # made before timing

    def step(i: int):
        return cache.attend(q, kv, kv, positions[i], softcap=SOFTCAP, scale=SCALE)

    return step


def _transformers_row(window: int, context: int, steps: int, gen: torch.Generator) -> tuple[str, str]:
    """transformers' static sliding-window cache layer + its eager attention, if installed."""
    try:
        from transformers.cache_utils import StaticSlidingWindowLayer
    except ImportError:  # transformers is optional
        return "not installed", ""
    layer = StaticSlidingWindowLayer(max_cache_len=window, sliding_window=window)
    kv = torch.randn(1, HEADS_KV, min(context, window), HEAD_DIM, generator=gen)
    layer.update(kv, kv)  # it keeps the last `window` tokens, so these stand for the context
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen)
    one = torch.randn(1, HEADS_KV, 1, HEAD_DIM, generator=gen)

    def step(i: int):
        keys, values = layer.update(one, one)  # once full: rolls the whole buffer by one
        keys = keys.repeat_interleave(HEADS // HEADS_KV, dim=1)  # eager attention repeats K/V
        values = values.repeat_interleave(HEADS // HEADS_KV, dim=1)
        scores = SOFTCAP * torch.tanh((q @ keys.transpose(-1, -2)) * SCALE / SOFTCAP)
        return torch.softmax(scores, dim=-1) @ values

    ms = _decode_ms(step, steps)
    return f"{ms:8.2f} ms", fmt_bytes(layer.keys.numel() * layer.keys.element_size() * 2)


def million(window: int, tokens: int) -> None:
    """Decodes `tokens` single tokens through a ring (writes only) and checks its memory."""
    ring = RingCache(1, HEADS_KV, HEAD_DIM, window)
    kv = torch.randn(1, HEADS_KV, window, HEAD_DIM)
    ring.update(kv, kv, torch.arange(window))
    after_window, ptr = ring.nbytes, ring.k.data_ptr()
    one = torch.randn(1, HEADS_KV, 1, HEAD_DIM)
    positions = torch.arange(window, window + tokens).view(-1, 1)
    start = time.perf_counter()
    for i in range(tokens):
        ring.update(one, one, positions[i])
        if i % 200_000 == 0 and i:
            print(f"#   {i:,} tokens, {time.perf_counter() - start:.0f} s", flush=True)
    same = ring.nbytes == after_window and ring.k.data_ptr() == ptr
    print(f"# ring after {window:,} tokens: {ring.nbytes:,} bytes; after {window + tokens:,}: {ring.nbytes:,} bytes "
          f"({'identical, same buffer' if same else 'DIFFERENT'}); slots hold positions "
          f"{int(ring.slot_pos.min()):,}..{int(ring.slot_pos.max()):,}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts up to 16k, 20,000 decode steps")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100, help="decode steps timed per context (median)")
    parser.add_argument("--million", type=int, default=1_000_000, help="decode steps for the memory check")
    parser.add_argument("--kv-dtype", choices=list(dtypes.KV), default="fp32", help="how the caches store keys and values")
    args = parser.parse_args(argv)
    kv = dtypes.kv_dtype(args.kv_dtype)
    if args.quick:
        args.contexts, args.million, args.steps = [1024, 8192, 16384], 20_000, 40
    gen = torch.Generator().manual_seed(0)
    print(f"# one attention layer, {HEADS}/{HEADS_KV} heads (q/kv), head_dim {HEAD_DIM}, fp32 queries, "
          f"{args.kv_dtype} caches, soft-cap, window {args.window}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; memory read {read_bandwidth(256 << 20):.1f} GB/s", flush=True)
    print(f"# decode = per-token median over {args.steps} steps (cache write + attention; local layers timed "
          f"round-robin across contexts); memory = cache bytes")
    header = (f"{'context':>8} | {'local (ring)':>12} {'memory':>9} | {'global (full)':>13} {'memory':>9} "
              f"{'reads':>10} | {'transformers sliding':>20} {'memory':>9}")
    print(header)
    print("-" * len(header))
    # Local layers first, all contexts interleaved round by round, so that machine drift
    # falls on every context alike (the work per token is the same: the ring is full).
    rings = {c: RingCache(1, HEADS_KV, HEAD_DIM, args.window, kv_dtype=kv) for c in args.contexts}
    steps = {}
    for context, ring in rings.items():
        _fill(ring, context, gen)
        steps[context] = _swattn_step(ring, context, args.steps, gen)
        steps[context](0)  # warm-up
    samples = {c: [] for c in args.contexts}
    for rnd in range(args.steps):
        for context in args.contexts:
            start = time.perf_counter()
            steps[context](1 + rnd)
            samples[context].append(time.perf_counter() - start)
    local_ms = {c: 1e3 * statistics.median(samples[c]) for c in args.contexts}
    for context in args.contexts:
        full = FullCache(1, HEADS_KV, HEAD_DIM, kv_dtype=kv)  # grows by doubling, as without a known capacity
        _fill(full, context, gen)
        global_ms = _decode_ms(_swattn_step(full, context, args.steps, gen), args.steps)
        # what a step reads: the visible keys and values as stored (int8: and a scale per token and head)
        per_token = 2 * HEADS_KV * (HEAD_DIM * full.k.element_size() + (4 if full.k_scale is not None else 0))
        reads = f"{context * per_token / global_ms / 1e6:.1f} GB/s"
        hf_ms, hf_mem = _transformers_row(args.window, context, args.steps, gen)
        print(f"{context:>8} | {local_ms[context]:9.2f} ms {fmt_bytes(rings[context].nbytes):>9} | {global_ms:10.2f} ms "
              f"{fmt_bytes(full.nbytes):>9} {reads:>10} | {hf_ms:>20} {hf_mem:>9}", flush=True)
        del full
    del rings, steps
    base = 8192 if 8192 in local_ms else min(local_ms)
    for context in sorted(local_ms):
        if context > base:
            print(f"# local decode at {context:,} / at {base:,} context: {local_ms[context] / local_ms[base]:.2f}x")
    million(args.window, args.million)
    return 0


if __name__ == "__main__":
    sys.exit(main())
