"""``swattn demo``: a tour of about a minute, offline, on the built-in model.

1. The built-in model (a small Gemma 2 that ``swattn train`` trained on Python's standard
   library) completes a Python prompt, streamed.
2. A long input (Python source) streams through the model's caches: memory and time per
   token against tokens processed, with rings for the local layers (they stay flat) and with
   every token kept (as a cache without rings does); a table and a PNG plot.
3. The op on a long sequence, checked against the float64 oracle and timed next to PyTorch's
   SDPA given the same window as a dense n x n mask (what one does without swattn).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from swattn.ops.api import sliding_window_attention
from swattn.ops.reference import reference_attention
from swattn.profiling import attention_flops, fmt_bytes, measure
from swattn.window import visible


@dataclass
class DemoConfig:
    """What the demo runs: the built-in model's tour, then one long op call (Gemma 2 2b's attention shape)."""

    n: int = 16384
    window: int = 4096
    heads: int = 8
    heads_kv: int = 4
    head_dim: int = 128
    softcap: float | None = 50.0
    check_queries: int = 256
    dense: bool = True
    model: str | None = None  # None: the built-in model
    # ends at the docstring, not at a newline: the tokenizer joins a newline with the indentation after it
    prompt: str = 'import os\n\n\ndef list_python_files(root):\n    """Return the paths of the .py files below root."""'

    new_tokens: int = 60
    stream_tokens: int = 32768
    chunk: int = 2048
    plot: str | None = "swattn-demo.png"
    tour: bool = True


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Runs the tour (model parts, then the op), printing as it goes; gives the measured figures."""
    result: dict = {}
    if cfg.tour:
        from swattn.models.loading import load

        model = load(cfg.model)
        _say(f"swattn demo: {'the built-in model' if cfg.model is None else cfg.model} "
             f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, Gemma 2: local layers with "
             f"window {min(w for w in model.cfg.windows if w)}, global layers, soft-caps), "
             f"{torch.get_num_threads()} threads\n")
        result["completion"] = complete_prompt(model, cfg)
        result["stream"] = stream_long_input(model, cfg)
    result.update(run_op_demo(cfg))
    return result


def complete_prompt(model, cfg: DemoConfig) -> str:
    """Part 1: the model continues a Python prompt; the text streams as it is generated."""
    from swattn.generate import Sampling, generate
    from swattn.streaming import TextStream

    _say(f"[1/3] completing a Python prompt ({cfg.new_tokens} tokens, temperature 0.3, top-k 40, seed 0):\n")
    print(cfg.prompt, end="", flush=True)
    stream = TextStream(model.tokenizer)

    def show(tokens):
        if tokens[0] is not None:
            print(stream.push(tokens[0]), end="", flush=True)

    ids = model.tokenizer.encode(cfg.prompt).ids
    stats = generate(model, [ids], max_new_tokens=cfg.new_tokens, stop_tokens=model.stop_tokens, on_step=show,
                     sampling=Sampling(temperature=0.3, top_k=40, seed=0))
    print(stream.finish(), flush=True)
    _say(f"\n      ({stats.new_tokens} tokens at {stats.decode_tokens_per_s:.0f} tokens/s)\n")
    return stream.text


def _source_tokens(tokenizer, n: int) -> list[int]:
    """About ``n`` tokens of Python source: the standard library's files, in order."""
    from swattn.training.data import stdlib_files

    ids: list[int] = []
    for f in stdlib_files():
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False).ids
        if len(ids) >= n:
            break
    return ids[:n]


def stream_long_input(model, cfg: DemoConfig) -> dict:
    """Part 2: a long input through the caches, rings vs every token kept: memory and time per token."""
    ids = torch.tensor([_source_tokens(model.tokenizer, cfg.stream_tokens)])
    n = ids.shape[1]
    local = [i for i, w in enumerate(model.cfg.windows) if w is not None]
    _say(f"[2/3] streaming {n:,} tokens of Python source through the model's caches, {cfg.chunk:,} at a time: "
         f"rings for the {len(local)} local layers, then every token kept...")
    runs = {}
    with torch.inference_mode():
        for rings in (True, False):
            cache = model.new_cache(1, capacity=n, rings=rings)
            rows = []
            for begin in range(0, n, cfg.chunk):
                chunk = ids[:, begin : begin + cfg.chunk]
                pos = torch.arange(begin, begin + chunk.shape[1]).unsqueeze(0)
                start = time.perf_counter()
                model(chunk, pos, cache, last_only=True)
                seconds = time.perf_counter() - start
                local_bytes = sum(cache[i].nbytes_used for i in local)
                rows.append(dict(tokens=begin + chunk.shape[1], ms_per_token=1e3 * seconds / chunk.shape[1],
                                 local_kv=local_bytes, total_kv=cache.nbytes_used))
            runs["rings" if rings else "every token"] = rows
    ring, full = runs["rings"], runs["every token"]
    _say(f"\n      {'tokens':>8} | {'local-layer KV':>14} {'all KV':>9} {'ms/token':>9} | "
         f"{'local-layer KV':>14} {'all KV':>9} {'ms/token':>9}")
    _say(f"      {'':>8} | {'rings':^34} | {'every token kept':^34}")
    picks = sorted({max(0, round(len(ring) * f) - 1) for f in (0.125, 0.25, 0.5, 0.75, 1.0)})
    for i in picks:
        a, b = ring[i], full[i]
        _say(f"      {a['tokens']:>8,} | {fmt_bytes(a['local_kv']):>14} {fmt_bytes(a['total_kv']):>9} "
             f"{a['ms_per_token']:>9.3f} | {fmt_bytes(b['local_kv']):>14} {fmt_bytes(b['total_kv']):>9} "
             f"{b['ms_per_token']:>9.3f}")
    _say(f"      the local layers' rings hold {fmt_bytes(ring[-1]['local_kv'])} whatever the length; kept whole they "
         f"grow to {fmt_bytes(full[-1]['local_kv'])} (global layers keep every token either way)")
    _say("      time per token is the same both ways (attention visits only the window's keys); it grows with the "
         "global layers, which see every token")
    if cfg.plot:
        _plot_stream(runs, cfg.plot)
        _say(f"      plot: {Path(cfg.plot).resolve()}")
    _say("")
    return runs


def _plot_stream(runs: dict, file: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows, style in (("rings", runs["rings"], "-"), ("every token kept", runs["every token"], "--")):
        xs = [r["tokens"] for r in rows]
        mem.plot(xs, [r["local_kv"] / 1e6 for r in rows], style, label=f"local layers, {name}")
        mem.plot(xs, [r["total_kv"] / 1e6 for r in rows], style, label=f"all layers, {name}", alpha=0.6)
        speed.plot(xs, [r["ms_per_token"] for r in rows], style, marker=".", label=name)
    mem.set(xlabel="tokens processed", ylabel="KV cache (MB)", title="cache memory")
    speed.set(xlabel="tokens processed", ylabel="ms per token", title="time per token (chunked prefill)")
    for ax in (mem, speed):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def run_op_demo(cfg: DemoConfig) -> dict:
    """Part 3: the op on one long sequence, checked against the oracle, next to dense SDPA."""
    _say(
        f"[3/3] the op alone: {cfg.n:,} tokens, window {cfg.window:,}, {cfg.heads} query / {cfg.heads_kv} kv heads, "
        f"head_dim {cfg.head_dim}, soft-cap {cfg.softcap}, float32, {torch.get_num_threads()} threads"
    )
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, cfg.heads, cfg.n, cfg.head_dim, generator=gen)
    k = torch.randn(1, cfg.heads_kv, cfg.n, cfg.head_dim, generator=gen)
    v = torch.randn(1, cfg.heads_kv, cfg.n, cfg.head_dim, generator=gen)
    io_bytes = 2 * (q.numel() + k.numel() + v.numel()) * 4  # q, k, v and out

    _say("      swattn (the first run builds the CPU kernel for this machine once)...")
    start = time.perf_counter()
    out = sliding_window_attention(q, k, v, cfg.window, softcap=cfg.softcap)
    first = time.perf_counter() - start
    # the first call was the warm-up; one timed run keeps the demo near a minute
    ours_s, ours_growth = measure(lambda: sliding_window_attention(q, k, v, cfg.window, softcap=cfg.softcap),
                                  repeat=1, warmup=False)
    gflops = attention_flops(cfg.n, cfg.window, cfg.heads, cfg.head_dim) / ours_s / 1e9
    _say(f"      {ours_s:.2f} s ({gflops:.0f} GFLOP/s, window-aware count; first call {first:.1f} s), "
         f"memory beyond q/k/v: {fmt_bytes(ours_growth)}")

    _say(f"      checking the last {cfg.check_queries} queries against the float64 oracle...")
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
        _say("      dense attention: SDPA with the same window as an n x n boolean mask...")
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
