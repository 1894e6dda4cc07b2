#!/usr/bin/env python
"""Whole-model prefill and decode: swattn vs transformers (eager, flex_attention) and llama.cpp.

Two decoder layers of the Gemma 2 2b shape (hidden 2304, MLP 9216, 8/4 heads of 256, one
local layer with window 4096 and one global), a 4096-token vocabulary, random weights; the
same weights and inputs for every implementation (``--shape 2b``: all 26 layers and the
256,000-token vocabulary, decode only). Prefill: time, achieved GFLOP/s (with its fraction of
the matmul rate of that dtype measured in the same run) and peak memory. Decode: tokens/s
after a context, and its fraction of the bandwidth bound: bytes read per token (weights in
their format, plus the visible keys and values) over this machine's read rate, measured
just before and just after each decode row (the better of the two: on a shared virtual
machine it moves by tens of percent within minutes). ``--weights q8 q4`` adds quantized rows
(transformers has no peer for them; llama.cpp's Q8_0/Q4_0 are, with ``--llama-bench``; rows of several
sequences take its ``llama-batched-bench`` from beside it). Each cell runs in a fresh subprocess;
a peer that cannot run a size is shown as such.

    python benchmarks/model.py --quick     # n=4096 prefill, decode after 2048
    python benchmarks/model.py             # n in {4096, 16384, 32768, 131072}, decode after 2048 and 16384
    swattn bench model --n --impl swattn --dtype bf16 --weights dense q8 q4   # decode only, swattn only
    swattn bench model [same options]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from swattn import dtypes, profiling
from swattn.models.config import ModelConfig
from swattn.profiling import (cell_worker, count_ops, fmt_bytes, describe_rates, matmul_rates, measure,
                              read_bandwidth, run_cell_in_subprocess)

SHAPE = dict(vocab_size=4096, hidden_size=2304, intermediate_size=9216, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
             max_position_embeddings=262144)
# all 26 layers of Gemma 2 2b (local and global alternating) and its vocabulary
SHAPE_2B = dict(SHAPE, vocab_size=256000, num_hidden_layers=26, max_position_embeddings=8192)
IMPLS = ("swattn", "eager", "flex_attention")
DTYPES = dtypes.SHORT
WEIGHTS = ("dense", "q8", "q4")


def decode_bytes(shape: dict, dtype: str, weights: str, context: int, kv_bytes: float | None = None) -> float:
    """Bytes one decode step reads: every weight once (in its format) and the visible keys and values.

    The tied embedding is read as the output head (its lookup of one row is negligible);
    quantized models keep the head in q8 (swattn's default policy).
    """
    from swattn import quant

    h, f, heads, kv, d = (shape[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                              "num_key_value_heads", "head_dim"))
    dense = 4 if dtype == "fp32" else 2
    per_weight = dense if weights == "dense" else quant.bytes_per_weight(weights)
    head_bytes = dense if weights == "dense" else quant.bytes_per_weight("q8")
    layers = shape["num_hidden_layers"]
    body = layers * (h * heads * d * 2 + h * kv * d * 2 + 3 * h * f) * per_weight
    head = shape["vocab_size"] * h * head_bytes
    kv_bytes = dense if kv_bytes is None else kv_bytes
    visible = sum(min(context + 1, shape["sliding_window"]) if i % 2 == 0 else context + 1 for i in range(layers))
    return body + head + visible * 2 * kv * d * kv_bytes


def prefill_flops(n: int) -> float:
    """FLOPs of one prefill: projections and MLP, window-aware attention per layer, and the LM head
    for the last position only."""
    cfg = ModelConfig.from_hf_config(dict(SHAPE, model_type="gemma2"))
    return profiling.prefill_flops(cfg, 0, n) + 2 * SHAPE["hidden_size"] * SHAPE["vocab_size"]


def _checkpoint(directory: str, shape: str = "2layer") -> str:
    """Writes the random model once (transformers' own save, bf16 for the 2b shape) and gives its path."""
    path = os.path.join(directory, "gemma2-2layer" if shape == "2layer" else "gemma2-2b-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        if shape == "2b":  # 2.6B parameters: built and saved in bf16 (5 GB), not fp32 (10 GB)
            torch.set_default_dtype(torch.bfloat16)
        model = Gemma2ForCausalLM(Gemma2Config(**(SHAPE if shape == "2layer" else SHAPE_2B)))
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.1)
        model.save_pretrained(path)
    return path


def _load(impl: str, path: str, dtype: torch.dtype, weights: str = "dense"):
    if impl == "swattn":
        from swattn.models.loading import load

        return load(path, dtype=dtype, weights=None if weights == "dense" else weights)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=dtype).eval()


def _prefill(impl, model, ids, chunk):
    """Reads the whole prompt and gives the last position's logits (what generation needs).

    swattn does what ``swattn generate`` does: chunks of ``chunk`` tokens through the
    layer caches (a ring for the local layer, a full cache for the global one). The peers
    run one forward without a cache (``use_cache=False``: less work and memory for them
    than building one) and keep one position's logits.
    """
    if impl == "swattn":
        return _fill_swattn_cache(model, ids, chunk, model.new_cache(1, capacity=ids.shape[1]))
    return model(ids, use_cache=False, logits_to_keep=1).logits


def _fill_swattn_cache(model, ids, chunk, cache):
    """Feeds ``ids`` (batch 1) through swattn's caches ``chunk`` tokens at a time; gives the last logits."""
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start : start + chunk]
        pos = torch.arange(start, start + part.shape[1]).expand(part.shape[0], -1)
        logits = model(part, pos, cache, last_only=True)
    return logits


def _fill_peer_cache(model, ids, chunk):
    """transformers' cache after ``ids``, fed ``chunk`` tokens at a time (a 16k-token eager
    forward in one piece would need ~21 GB of scores)."""
    cache = None
    for start in range(0, ids.shape[1], chunk):
        out = model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    return cache


def run_cell(cell: dict) -> dict:
    """One implementation, one task (prefill of n tokens, or decode after a context)."""
    dtype = DTYPES[cell["dtype"]]
    model = _load(cell["impl"], cell["path"], dtype, cell.get("weights", "dense"))
    gen = torch.Generator().manual_seed(1)
    if cell["task"] == "prefill":
        ids = torch.randint(0, SHAPE["vocab_size"], (1, cell["n"]), generator=gen)
        with torch.inference_mode():
            # torch.compile specialises on the length: flex warms up on the whole input; the
            # others on a short one (their first-call costs do not depend on n, and a second
            # 131072-token prefill would double a long run)
            full_warmup = cell["impl"] == "flex_attention"
            if not full_warmup:
                _prefill(cell["impl"], model, ids[:, :512], cell["chunk"])
            seconds, growth = measure(lambda: _prefill(cell["impl"], model, ids, cell["chunk"]), repeat=cell["repeat"],
                                      warmup=full_warmup)
        return {"seconds": seconds, "peak": growth}
    context, steps, batch = cell["n"], cell["steps"], cell.get("batch", 1)
    spare = WARMUP_STEPS + PROFILED_STEPS + 2  # tokens besides the timed steps
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, context + steps + spare), generator=gen)  # in both vocabularies
    with torch.inference_mode():
        if cell["impl"] == "swattn":
            cache = model.new_cache(batch, capacity=context + steps + spare + 1, kv_dtype=cell.get("kv_dtype"))
            _fill_swattn_cache(model, ids[:, :context], cell["chunk"], cache)
            for i in range(context, context + WARMUP_STEPS):
                model(ids[:, i : i + 1], torch.full((batch, 1), i), cache)
            context += WARMUP_STEPS
            times = []
            for i in range(steps):
                t0 = time.perf_counter()
                model(ids[:, context + i : context + i + 1], torch.full((batch, 1), context + i), cache)
                times.append(time.perf_counter() - t0)
            last = context + steps
            overhead = _overhead(model, cache, ids, last, times)
            after = last + PROFILED_STEPS
            ops = count_ops(lambda: model(ids[:, after : after + 1], torch.full((batch, 1), after), cache),
                            model.layers)
            return {"tokens_per_s": batch * steps / sum(times), "overhead": overhead, "ops": ops}
        else:
            cache = _fill_peer_cache(model, ids[:, :context], cell["chunk"])
            for i in range(WARMUP_STEPS + steps):
                if i == WARMUP_STEPS:
                    start = time.perf_counter()
                cache = model(ids[:, context + i : context + i + 1], past_key_values=cache, use_cache=True,
                              logits_to_keep=1).past_key_values
        seconds = time.perf_counter() - start
    return {"tokens_per_s": steps / seconds}


# swattn's KV storage -> llama.cpp's cache type (-ctk/-ctv); llama.cpp has no f32 cache
LLAMA_KV = {"bf16": "bf16", "fp16": "f16", "int8": "q8_0", None: None}


def _llama_format(dtype: str, weights: str) -> str:
    """The GGUF that matches a swattn row: its dense dtype, or the quantized format."""
    return weights if weights != "dense" else dtype


def _better_setting(command, read, kv: str | None, timeout: float) -> dict:
    """Runs ``command(fa)`` for both of llama.cpp's attention settings (plus ``kv``, its cache type
    -ctk/-ctv, None for its default f16), reads each output's tokens/s with ``read``; the better."""
    import subprocess

    best, notes = None, []
    for fa in ("off", "on"):
        cmd = command(fa) + (["-ctk", kv, "-ctv", kv] if kv is not None else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
            rate = read(out)
        except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
            notes.append(f"fa {fa}: {str(exc).splitlines()[0][:60]}")
            continue
        if best is None or rate > best[0]:
            best = (rate, fa)
    if best is None:
        return {"error": "; ".join(notes)}
    return {"tokens_per_s": best[0], "fa": best[1]}


def llama_bench(binary: str, gguf: str, task: str, n: int, steps: int, kv: str | None, timeout: float) -> dict:
    """llama.cpp's own benchmark, 2 threads, median of 3, both attention settings, the better one.

    Prefill: ``-p n -n 0``; decode: ``-p 0 -n steps -d n`` (generation after n tokens of depth).
    ``kv``: its cache type (-ctk/-ctv), None for its default (f16).
    """
    import json

    def command(fa: str) -> list[str]:
        cmd = [binary, "-m", gguf, "-t", str(torch.get_num_threads()), "-r", "3", "-fa", fa, "-o", "json"]
        return cmd + (["-p", str(n), "-n", "0"] if task == "prefill" else ["-p", "0", "-n", str(steps), "-d", str(n)])

    return _better_setting(command, lambda out: float(json.loads(out)[0]["avg_ts"]), kv, timeout)


def llama_batched_bench(binary: str, gguf: str, context: int, steps: int, batch: int, kv: str | None,
                        timeout: float) -> dict:
    """llama.cpp's ``llama-batched-bench``: ``batch`` sequences of ``context`` prompt tokens each
    (not shared), then ``steps`` tokens generated by all together; their tokens/s (all rows), 2
    threads, both attention settings, the better one.

    Each sequence gets its own KV buffer (``-no-kvu``): with one buffer for all (its ``-kvu``)
    every sequence's attention spans all of them, masked, and decodes slower (two-layer model,
    Q4_0, 8 sequences after 512 tokens: 505 / 571 tokens/s with fa off / on, against 699 / 688).
    """
    import json

    def command(fa: str) -> list[str]:
        return [binary, "-m", gguf, "-t", str(torch.get_num_threads()), "-fa", fa, "-no-kvu",
                "-c", str(batch * (context + steps + 64)), "-b", "2048", "-ub", "512",
                "-npp", str(context), "-ntg", str(steps), "-npl", str(batch), "--output-format", "jsonl"]

    # jsonl: a line of settings, then one of results
    return _better_setting(command, lambda out: float(json.loads(out.strip().splitlines()[-1])["speed_tg"]),
                           kv, timeout)


def batched_binary(llama_bench_path: str) -> str | None:
    """``llama-batched-bench`` beside ``llama-bench`` (``benchmarks/llama_cpp.sh`` builds both), if there."""
    path = os.path.join(os.path.dirname(llama_bench_path), "llama-batched-bench")
    return path if os.path.isfile(path) else None


PRODUCTS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm")  # what prepacked and plain products run as
# compiled ops that only orchestrate others (their own time is bookkeeping, not kernel work)
ORCHESTRATORS = ("swattn::decode_block",)
PROFILED_STEPS = 4  # decode steps profiled for the overhead column
# decode steps run before the timed ones (the first dozen or so after a prefill run up to a fifth
# slower: 2-layer model, q4, after 512 tokens, 2.1-2.2 ms settling to 1.7; llama-bench warms up too)
WARMUP_STEPS = 8


def _overhead(model, cache, ids, first: int, times: list[float]) -> float:
    """Seconds per step outside the compiled kernels and matrix products (the Python and PyTorch
    bookkeeping around them): the timed steps' median minus the kernels' own time per step in
    ``PROFILED_STEPS`` more steps from position ``first`` (token ids ``ids[:, first]`` on),
    profiled. (The profiled steps' own wall time would count the profiler's cost per op too.)"""
    from torch.profiler import ProfilerActivity, profile

    batch = ids.shape[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(first, first + PROFILED_STEPS):
            model(ids[:, i : i + 1], torch.full((batch, 1), i), cache)
    kernels = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if (e.key.startswith("swattn::") and e.key not in ORCHESTRATORS) or e.key in PRODUCTS)
    return max(0.0, sorted(times)[len(times) // 2] - kernels / 1e6 / PROFILED_STEPS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="prefill 4096 tokens, decode after 2048, fp32")
    parser.add_argument("--n", type=int, nargs="*", default=[4096, 16384, 32768, 131072], help="prefill lengths")
    parser.add_argument("--contexts", type=int, nargs="*", default=[2048, 16384], help="decode after these")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["dense"],
                        help="swattn's linear layers: dense (the dtype's), q8, q4")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences decoding together (swattn)")
    parser.add_argument("--kv-dtype", choices=["fp32", "bf16", "fp16", "int8"],
                        help="swattn's cache storage in decode rows (default: the model's dtype); llama.cpp gets "
                             "the same (int8: its q8_0), or its default f16 when not given")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary: adds its column (see the README)")
    parser.add_argument("--llama-kv", choices=["f16", "bf16", "q8_0", "f32"],
                        help="llama.cpp's cache type (default: the same as --kv-dtype, else its own default f16)")
    parser.add_argument("--gguf", nargs="+", default=[], metavar="FORMAT=PATH",
                        help="the benchmark model as GGUF for llama.cpp, per format: fp32=, bf16=, q8= (Q8_0), q4= (Q4_0)")
    parser.add_argument("--shape", choices=["2layer", "2b"], default="2layer",
                        help="2b: all 26 layers and the 256k vocabulary (decode only; a 5 GB checkpoint)")
    parser.add_argument("--repeat", type=int, default=1, help="timed prefill runs (median)")
    parser.add_argument("--chunk", type=int, default=4096,
                        help="swattn's prefill chunk (and the chunk that fills caches before decoding)")
    parser.add_argument("--peer-max-n", type=int, default=16384, help="largest prefill n for transformers' peers, and largest sequences x context for "
                        "llama-batched-bench (it prefills them all: 8 x 16384 bf16 took it over 12 minutes)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "swattn-bench"),
                        help="where the random checkpoint is written once")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cell_worker(run_cell, args.worker)
        return 0
    if args.quick:
        args.n, args.contexts, args.dtype = [4096], [2048], ["fp32"]
    shape = SHAPE if args.shape == "2layer" else SHAPE_2B
    ggufs = {}
    for item in args.gguf:
        fmt, _, file = item.partition("=")
        if fmt not in ("fp32", "bf16", "q8", "q4") or not os.path.isfile(file):
            parser.error(f"--gguf {item}: give FORMAT=PATH with FORMAT fp32, bf16, q8 or q4 and an existing file")
        ggufs[fmt] = file
    llama_kv = args.llama_kv or LLAMA_KV[args.kv_dtype]
    if ggufs and not args.llama_bench:
        parser.error("--gguf needs --llama-bench PATH (llama.cpp's llama-bench binary)")
    if args.llama_bench and not os.path.isfile(args.llama_bench):
        parser.error(f"--llama-bench {args.llama_bench}: no such file")
    if args.shape == "2b":
        args.n, args.impl = [], [i for i in args.impl if i == "swattn"]  # decode only: the 2b shape's bound
    path = _checkpoint(args.dir, args.shape)
    products = {name: matmul_rates(DTYPES[name], size=2048) for name in args.dtype}
    rates = {name: max(r.values()) for name, r in products.items()}
    bandwidth = read_bandwidth()
    fresh = bandwidth  # the read rate measured last, while nothing ran since (None once a prefill cell has)
    print(f"# Gemma 2 2b-shaped, {shape['num_hidden_layers']} layers (local w=4096 / global), vocab "
          f"{shape['vocab_size']}, random weights; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          "matmul 2048^3 now, GFLOP/s, best (each product): "
          + ", ".join(f"{name} {describe_rates(r)}" for name, r in products.items())
          + f"; memory read {bandwidth:.1f} GB/s; KV caches: swattn {args.kv_dtype or 'the model dtype'}"
          + (f", llama.cpp {llama_kv or 'f16'}" if ggufs else ""))
    if args.n:
        print("# prefill: seconds, GFLOP/s (% of that dtype's best matmul rate), peak memory growth; "
              "'x' = peer time / swattn time")
    print(f"# decode: tokens/s (all rows) over {args.steps} steps after {WARMUP_STEPS} untimed ones, and % of the "
          "bandwidth bound: bytes per step (weights in their format + "
          "each row's visible K/V) / the better read rate measured just before and after the row; "
          "'x' = swattn / peer")
    for dtype in args.dtype:
        for weights in args.weights:
            tag = dtype if weights == "dense" else f"{dtype}+{weights}"
            impls = [i for i in args.impl if weights == "dense" or i == "swattn"]
            for n in args.n:
                row, ours = f"prefill {n:>6} {tag} |", None
                for impl in impls:
                    if impl != "swattn" and n > args.peer_max_n:
                        row += f" {impl}: not run (n > --peer-max-n) |"
                        continue
                    r = run_cell_in_subprocess(os.path.abspath(__file__), dict(
                        impl=impl, task="prefill", n=n, dtype=dtype, weights=weights, path=path, repeat=args.repeat,
                        chunk=args.chunk), args.timeout)
                    if "seconds" not in r:
                        row += f" {impl}: {r['error']} |"
                        continue
                    gf = prefill_flops(n) / r["seconds"] / 1e9
                    ratio = f" {r['seconds'] / ours:.1f}x" if ours and impl != "swattn" else ""
                    ours = ours or (r["seconds"] if impl == "swattn" else None)
                    row += (f" {impl}: {r['seconds']:.2f} s {gf:.0f} GFLOP/s ({100 * gf / rates[dtype]:.0f}%) "
                            f"{fmt_bytes(r['peak'])}{ratio} |")
                gguf = ggufs.get(_llama_format(dtype, weights))
                if gguf and ours:
                    r = llama_bench(args.llama_bench, gguf, "prefill", n, 0, llama_kv, args.timeout)
                    row += (f" llama.cpp {_llama_format(dtype, weights)}: {r['error']} |" if "error" in r else
                            f" llama.cpp {_llama_format(dtype, weights)}: {n / r['tokens_per_s']:.2f} s "
                            f"(fa {r['fa']}; swattn {n / r['tokens_per_s'] / ours:.2f}x) |")
                print(row, flush=True)
                fresh = None
            for context in args.contexts:
                for batch in args.batch:
                    row, ours = f"decode @{context:>6} {tag} x{batch} |", None
                    kv_bytes = {None: None, "fp32": 4, "bf16": 2, "fp16": 2, "int8": 1 + 4 / shape["head_dim"]}[args.kv_dtype]
                    step_bytes = decode_bytes(shape, dtype, weights, context, kv_bytes)
                    step_bytes += (batch - 1) * (step_bytes - decode_bytes(shape, dtype, weights, -1, kv_bytes))
                    # this virtual machine's read rate moves by tens of percent within minutes: each
                    # row is judged by the better of the rates measured just before and just after it
                    # (the previous decode row's "after" is this one's "before": nothing ran between)
                    before = fresh if fresh is not None else read_bandwidth()
                    cells = []
                    for impl in impls:
                        if impl == "flex_attention" or (impl != "swattn" and batch > 1):
                            continue  # flex recompiles per length in decode; peers run one sequence here
                        r = run_cell_in_subprocess(os.path.abspath(__file__), dict(
                            impl=impl, task="decode", n=context, dtype=dtype, weights=weights, path=path,
                            steps=args.steps, chunk=args.chunk, batch=batch, kv_dtype=args.kv_dtype), args.timeout)
                        if "tokens_per_s" not in r:
                            row += f" {impl}: {r['error']} |"
                            continue
                        rate = r["tokens_per_s"]
                        ratio = f" (swattn {ours / rate:.2f}x)" if ours and impl != "swattn" else ""
                        ours = ours or (rate if impl == "swattn" else None)
                        cells.append((impl, rate, ratio, r.get("overhead"), r.get("ops")))
                    gguf = ggufs.get(_llama_format(dtype, weights))
                    peer = None
                    if gguf and ours and batch == 1:
                        peer = llama_bench(args.llama_bench, gguf, "decode", context, 64, llama_kv, args.timeout)
                    elif gguf and ours:
                        batched = batched_binary(args.llama_bench)
                        if batched is None:
                            peer = {"error": "no llama-batched-bench beside llama-bench (benchmarks/llama_cpp.sh builds it)"}
                        elif batch * context > args.peer_max_n:  # it prefills every sequence first
                            peer = {"error": f"not run ({batch} x {context} prompt tokens > --peer-max-n)"}
                        else:
                            peer = llama_batched_bench(batched, gguf, context, 32, batch, llama_kv, args.timeout)
                    after = fresh = read_bandwidth()
                    read = max(before, after)
                    bound = batch * read * 1e9 / step_bytes
                    for impl, rate, ratio, overhead, ops in cells:
                        layers = shape["num_hidden_layers"]
                        extra = (f", {100 * rate / bound:.0f}% of bound, overhead {1e3 * overhead:.2f} ms/step, "
                                 f"{ops['within'] / layers:.0f} ops/layer + {ops['total'] - ops['within']} per step"
                                 if impl == "swattn" else "")
                        row += f" {impl}: {rate:.1f} tokens/s{ratio}{extra} |"
                    if peer is not None:
                        fmt = _llama_format(dtype, weights)
                        row += (f" llama.cpp {fmt}: {peer['error']} |" if "error" in peer else
                                f" llama.cpp {fmt}: {peer['tokens_per_s']:.1f} tokens/s (fa {peer['fa']}, "
                                f"{100 * peer['tokens_per_s'] / bound:.0f}% of bound; swattn "
                                f"{ours / peer['tokens_per_s']:.2f}x) |")
                    print(row + f" bound {bound:.0f} tokens/s ({fmt_bytes(step_bytes)} per step, read "
                          f"{before:.1f} / {after:.1f} GB/s before / after)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
