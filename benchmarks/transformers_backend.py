#!/usr/bin/env python
"""swattn inside Hugging Face transformers: eager vs flex_attention vs swattn, same model.

The two-layer Gemma 2 2b-shaped model of the model benchmark (one local layer, window
4096, one global; vocab 4096; random weights), loaded by transformers'
``from_pretrained`` with each attention implementation. Per cell, in a fresh subprocess:

- prefill: one forward over n tokens without a cache, keeping the last position's logits
  (``logits_to_keep=1``: what generation needs), under ``torch.inference_mode``;
- train: one training step at n tokens: forward with ``labels``, backward, and a plain
  SGD update (no optimizer state, so the memory is the step's own: activations, gradients).

Time is the median of ``--repeat`` runs after one warm-up (torch.compile for flex); peak
memory is the growth of resident memory above the loaded model while the timed runs go.

    python benchmarks/transformers_backend.py            # prefill 8192/16384, train 4096
    python benchmarks/transformers_backend.py --quick    # prefill 4096, train 1024
    swattn bench transformers [same options]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile

import torch

from swattn import dtypes
from swattn.profiling import cell_worker, describe_rates, fmt_bytes, matmul_rates, measure, run_cell_in_subprocess

IMPLS = ("eager", "flex_attention", "swattn")
DTYPES = dtypes.SHORT


def _model_bench():
    """The model benchmark's module (its shape and checkpoint writer), loaded by path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")
    spec = importlib.util.spec_from_file_location("swattn_bench_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(impl: str, path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if impl == "swattn":
        from swattn import register_with_transformers

        register_with_transformers()
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=dtype)


def run_cell(cell: dict) -> dict:
    """One implementation, one task: ``prefill`` or ``train`` at ``n`` tokens."""
    model = _load(cell["impl"], cell["path"], DTYPES[cell["dtype"]])
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, cell["n"]), generator=torch.Generator().manual_seed(1))
    if cell["task"] == "prefill":
        model.eval()

        def step():
            with torch.inference_mode():
                return model(ids, use_cache=False, logits_to_keep=1).logits

    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad, alpha=-1e-5)
                    p.grad = None
            return loss.item()

    seconds, peak = measure(step, repeat=cell["repeat"])
    return {"seconds": seconds, "peak": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench transformers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="prefill 4096, train 1024, fp32")
    parser.add_argument("--prefill", type=int, nargs="*", default=[8192, 16384], help="prefill lengths")
    parser.add_argument("--train", type=int, nargs="*", default=[4096], help="training-step lengths")
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32"])
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per cell (median)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "swattn-bench"),
                        help="where the random checkpoint is written once")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cell_worker(run_cell, args.worker)
        return 0
    if args.quick:
        args.prefill, args.train, args.dtype = [4096], [1024], ["fp32"]
    path = _model_bench()._checkpoint(args.dir)
    import transformers

    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"fp32 matmul now, GFLOP/s: {describe_rates(matmul_rates(torch.float32))}")
    print("# Gemma 2 2b-shaped, 2 layers (local w=4096 + global), vocab 4096, random weights, batch 1")
    print("# time (median), peak memory growth; ratios are the peer's over swattn's (>1: swattn better)")
    tasks = [("prefill", n) for n in args.prefill] + [("train", n) for n in args.train]
    header = f"{'task':>8} {'n':>6} {'dtype':>5} | " + " | ".join(f"{impl:^26}" for impl in args.impl)
    print(header + " | swattn vs peers")
    print("-" * len(header))
    for dtype in args.dtype:
        for task, n in tasks:
            results = {}
            for impl in args.impl:
                cell = dict(impl=impl, task=task, n=n, dtype=dtype, path=path, repeat=args.repeat)
                results[impl] = run_cell_in_subprocess(os.path.abspath(__file__), cell, args.timeout)
            cols = []
            for impl in args.impl:
                r = results[impl]
                cols.append(f"{r['seconds']:8.2f} s {fmt_bytes(r['peak']):>9}" if "seconds" in r else r["error"][:26])
            ours = results.get("swattn", {})
            ratios = []
            for impl in args.impl:
                r = results[impl]
                if impl != "swattn" and "seconds" in r and "seconds" in ours:
                    ratios.append(f"{impl}: {r['seconds'] / ours['seconds']:.2f}x time, "
                                  f"{r['peak'] / max(ours['peak'], 1):.1f}x memory")
            print(f"{task:>8} {n:>6} {dtype:>5} | " + " | ".join(f"{c:^26}" for c in cols) + " | " + "; ".join(ratios),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
