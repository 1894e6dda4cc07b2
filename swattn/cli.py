"""The ``swattn`` command: a thin front over the library and the benchmark scripts."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = ("attention", "cache")
_BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _demo(args: argparse.Namespace) -> int:
    from swattn.demo import DemoConfig, run_demo

    cfg = DemoConfig(n=args.n, window=args.window, dense=not args.no_dense)
    if cfg.n < 1 or cfg.window < 1:
        raise SystemExit("swattn demo: --n and --window must be >= 1")
    return 0 if run_demo(cfg)["ok"] else 1


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    script = _BENCH_DIR / f"{args.name}.py"
    if not script.exists():
        raise SystemExit(
            f"swattn bench: {script} not found; the benchmarks ship with the source tree, "
            "so run them from a clone (pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location(f"swattn_bench_{args.name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(rest)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``swattn`` command."""
    parser = argparse.ArgumentParser(prog="swattn", description="Exact sliding-window attention, fast on CPU.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="run the op on a long sequence next to dense attention (about a minute)")
    demo.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    demo.add_argument("--window", type=int, default=4096, help="window (default 4096, Gemma 2's)")
    demo.add_argument("--no-dense", action="store_true", help="skip the dense-attention comparison")
    bench = sub.add_parser("bench", help="side-by-side benchmarks against peers",
                           description="Runs benchmarks/NAME.py; options after NAME go to it (try NAME --help).")
    bench.add_argument("name", choices=BENCHMARKS)
    args, rest = parser.parse_known_args(argv)
    if args.version:
        from swattn import __version__

        print(__version__)
        return 0
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        return _demo(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
