#!/usr/bin/env python
"""Linear layers against the machine's best matrix product, for the shapes of Gemma 2 2B.

For each projection shape, a prefill-sized input (2048 rows) through swattn's ``Linear``
(what the models run), forward and forward+backward, next to the same products through
PyTorch's default (``F.linear``: MKL's sgemm for fp32 on x86) and oneDNN called directly:
median times, GFLOP/s and swattn's fraction of the best product measured for that shape in
the same run. In bf16, inference runs the weights prepacked in oneDNN's blocked layout
(``PrepackedLinear``, what ``swattn.load`` gives): its forward has a column of its own, and
"% best" takes it where it applies.

    python benchmarks/linear.py           # fp32 and bf16, 2048 rows
    python benchmarks/linear.py --quick   # fp32, 512 rows
    swattn bench linear [same options]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from swattn.models.layers import Linear, PrepackedLinear
from swattn.ops import linear
from swattn.profiling import median_time

# (in_features, out_features) of Gemma 2 2B's layers: q, k/v, o, gate/up, down
SHAPES = [(2304, 2048), (2304, 1024), (2048, 2304), (2304, 9216), (9216, 2304)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _products(x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, backward: bool):
    """name -> a callable computing the product (and, with backward, both gradients' products)."""
    def plain(mm):
        if not backward:
            return lambda: mm(x, w)
        return lambda: (mm(x, w), mm(grad, w.t()), mm(grad.t(), x.t()))

    out = {"torch": plain(F.linear)}
    if linear._onednn_available():
        out["onednn"] = plain(linear._onednn)
    return out


def _swattn(x: torch.Tensor, layer: Linear, grad: torch.Tensor, backward: bool):
    if not backward:
        def forward():
            with torch.no_grad():
                return layer(x)
        return forward
    xg = x.clone().requires_grad_()

    def step():
        layer.weight.grad = xg.grad = None
        layer(xg).backward(grad)
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swattn bench linear", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fp32, 512 rows")
    parser.add_argument("--rows", type=int, default=2048, help="input rows (tokens)")
    parser.add_argument("--shapes", nargs="+", metavar="IN:OUT", help="(default: Gemma 2 2B's projections)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per cell (median)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.dtype, args.repeat = 512, ["fp32"], 3
    if args.rows < 1 or args.repeat < 1:
        parser.error("--rows and --repeat must be at least 1")
    shapes = SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes]
        except ValueError:
            parser.error("--shapes takes IN:OUT pairs of integers, e.g. 2304:9216")
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            parser.error("--shapes takes IN:OUT pairs of positive integers, e.g. 2304:9216")

    print(f"# linear layers, {args.rows} rows, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"swattn's fp32 product here: {linear.fp32_product()}")
    print("# GFLOP/s of each product (median of runs); 'best' = the faster of PyTorch's default and oneDNN "
          "for that shape; fwd+bwd = the forward and both gradients' products")
    header = (f"{'in':>6} {'out':>6} {'dtype':>5} {'pass':>7} | {'swattn':>8} {'packed':>8} {'torch':>8} "
              f"{'onednn':>8} | {'% best':>6}")
    print(header)
    print("-" * len(header))
    for name in args.dtype:
        dtype = DTYPES[name]
        for k, n in shapes:
            torch.manual_seed(0)
            x = torch.randn(args.rows, k).to(dtype)
            layer = Linear(k, n).to(dtype)
            grad = torch.randn(args.rows, n).to(dtype)
            for backward in (False, True):
                flops = 2 * args.rows * k * n * (3 if backward else 1)
                rates = {p: flops / median_time(fn, repeat=args.repeat) / 1e9
                         for p, fn in _products(x, layer.weight.detach(), grad, backward).items()}
                ours = flops / median_time(_swattn(x, layer, grad, backward), repeat=args.repeat) / 1e9
                packed = None
                if not backward and linear.can_prepack(layer.weight):
                    prepacked = PrepackedLinear(layer.weight.detach())
                    packed = flops / median_time(lambda: prepacked(x), repeat=args.repeat) / 1e9
                cells = " ".join(f"{rates[p]:8.0f}" if p in rates else f"{'-':>8}" for p in ("torch", "onednn"))
                packed_cell = f"{packed:8.0f}" if packed is not None else f"{'-':>8}"
                print(f"{k:>6} {n:>6} {name:>5} {'fwd+bwd' if backward else 'fwd':>7} | {ours:8.0f} {packed_cell} "
                      f"{cells} | {100 * max(ours, packed or 0.0) / max(rates.values()):5.0f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
