#!/usr/bin/env python
"""Training step: swattn vs transformers' eager and SDPA attention, the built-in model's shape.

One training step (forward, backward, AdamW update) of the built-in model's architecture
(Gemma 2: 6 layers, local window 256 alternating with global ones, hidden 256, 4 query /
2 kv heads of 64, vocabulary 8192; random weights, the same for every implementation) at
each context, with the batch chosen so that every step holds the same number of tokens.

- swattn: swattn's model, its op forward and backward, and the fused chunked head loss
  that ``swattn train`` uses (no tokens x vocabulary logits held);
- eager / sdpa: the same checkpoint loaded by transformers' ``Gemma2ForCausalLM`` with that
  attention implementation, loss from ``labels``. transformers refuses SDPA for Gemma 2
  (SDPA cannot soft-cap), so the sdpa column runs the model with its attention soft-cap
  removed (SDPA allowed in the benchmark's own process): a slightly different model, timed
  for what SDPA itself costs;
- flex_attention is not run: FlexAttention has no backward on CPU.

Each cell runs in a fresh subprocess: the median of ``--repeat`` steps after one warm-up,
and the peak growth of resident memory during the timed steps above the loaded model and
its optimizer state (activations, gradients, temporaries). bf16 runs under autocast.

    python benchmarks/train.py                 # contexts 2048 and 8192, 8192 tokens per step, fp32 and bf16
    python benchmarks/train.py --quick         # context 512, 1024 tokens per step, fp32
    swattn bench train [same options]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from swattn.profiling import cell_worker, describe_rates, fmt_bytes, matmul_rates, measure, run_cell_in_subprocess

IMPLS = ("swattn", "eager", "sdpa")


def checkpoint(directory: str) -> str:
    """Writes (once) a random model of the built-in model's shape; gives its directory."""
    from swattn.models.config import ModelConfig
    from swattn.models.loading import BUILTIN
    from swattn.models.saving import gemma2_config, save_checkpoint
    from swattn.models.transformer import CausalLM
    from swattn.training.presets import PRESETS, gemma2_model_config
    from swattn.training.trainer import _init_weights

    path = os.path.join(directory, "train-bench-model")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    if (BUILTIN / "config.json").exists():
        hf = json.loads((BUILTIN / "config.json").read_text())
        cfg = ModelConfig.from_hf_config(hf)
    else:
        preset = PRESETS["small"]
        cfg = gemma2_model_config(preset, preset.window, {"pad": 0, "eos": 1, "bos": 2})
        hf = gemma2_config(cfg, 8192)
    hf["max_position_embeddings"] = max(hf.get("max_position_embeddings", 0), 8192)
    model = CausalLM(cfg)
    _init_weights(model, 0)
    save_checkpoint(model, __import__("pathlib").Path(path), config=hf, dtype=torch.float32)
    return path


def run_cell(cell: dict) -> dict:
    """One implementation at one context and precision: a training step's time and peak memory."""
    bf16 = cell["precision"] == "bf16"
    if cell["impl"] == "swattn":
        import swattn
        from swattn.training.loss import linear_cross_entropy

        model = swattn.load(cell["path"], dtype="float32", prepack=False).requires_grad_(True)  # load() is for inference

        def loss_of(ids):
            h = model.features(ids[:, :-1])
            return linear_cross_entropy(h.flatten(0, 1), model.head_weight, ids[:, 1:].flatten(),
                                        model.cfg.final_softcap)
    else:
        from transformers import Gemma2ForCausalLM

        extra = {}
        if cell["impl"] == "sdpa":  # refused for Gemma 2 (no soft-cap in SDPA): drop the cap to time SDPA at all
            from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

            Gemma2PreTrainedModel._supports_sdpa = True  # this benchmark process only
            extra = dict(attn_logit_softcapping=None)
        model = Gemma2ForCausalLM.from_pretrained(cell["path"], attn_implementation=cell["impl"], dtype=torch.float32,
                                                  **extra)

        def loss_of(ids):
            return model(ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
    model.train()
    vocab = model.config.vocab_size if hasattr(model, "config") else model.cfg.vocab_size
    batch = cell["tokens"] // cell["context"]
    ids = torch.randint(0, vocab, (batch, cell["context"] + 1), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    seconds, peak = measure(step, repeat=cell["repeat"])
    return {"seconds": seconds, "peak": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="context 512, 1024 tokens per step, fp32")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens / context)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per cell (median)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "swattn-bench"),
                        help="where the random checkpoint is written once")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cell_worker(run_cell, args.worker)
        return 0
    if args.quick:
        args.contexts, args.tokens, args.precision = [512], 1024, ["fp32"]
    for c in args.contexts:
        if c < 2 or args.tokens % c:
            parser.error(f"--tokens {args.tokens} must be a multiple of each context (got {c})")
    path = checkpoint(args.dir)
    import transformers

    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul now, GFLOP/s: fp32 {describe_rates(matmul_rates(torch.float32))}, "
          f"bf16 {describe_rates(matmul_rates(torch.bfloat16))}")
    print(f"# the built-in model's shape (Gemma 2, 6 layers, window 256 / global), random weights; {args.tokens} "
          "tokens per step; AdamW")
    print("# step time (median), peak memory growth during the step; ratios: the fastest transformers path over "
          "swattn (>1: swattn better)")
    print("# flex_attention: not run (FlexAttention has no backward on CPU); sdpa: transformers refuses SDPA for "
          "Gemma 2 (no soft-cap), so it runs without the attention soft-cap")
    header = (f"{'context':>7} {'batch':>5} {'prec':>4} | " + " | ".join(f"{impl:^22}" for impl in args.impl)
              + " | swattn vs best peer")
    print(header)
    print("-" * len(header))
    for precision in args.precision:
        for context in args.contexts:
            results = {}
            for impl in args.impl:
                cell = dict(impl=impl, context=context, tokens=args.tokens, precision=precision, path=path,
                            repeat=args.repeat)
                results[impl] = run_cell_in_subprocess(os.path.abspath(__file__), cell, args.timeout)
            cols = [f"{r['seconds']:7.2f} s {fmt_bytes(r['peak']):>9}" if "seconds" in r else r["error"][:22]
                    for r in (results[i] for i in args.impl)]
            ours = results.get("swattn", {})
            peers = [(i, results[i]) for i in args.impl if i != "swattn" and "seconds" in results[i]]
            note = ""
            if peers and "seconds" in ours:
                name, best = min(peers, key=lambda p: p[1]["seconds"])
                note = (f"{best['seconds'] / ours['seconds']:.2f}x faster than {name}, "
                        f"{ours['peak'] / max(best['peak'], 1):.2f}x its memory")
            print(f"{context:>7} {args.tokens // context:>5} {precision:>4} | " + " | ".join(f"{c:^22}" for c in cols)
                  + " | " + note, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
