"""The ``swattn`` command: a thin front over the library and the benchmark scripts."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

# name -> script in benchmarks/ (not "transformers.py": run as a script it would shadow the package)
BENCHMARKS = {"attention": "attention.py", "cache": "cache.py", "model": "model.py",
              "transformers": "transformers_backend.py"}
_BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _demo(args: argparse.Namespace) -> int:
    from swattn.demo import DemoConfig, run_demo

    cfg = DemoConfig(n=args.n, window=args.window, dense=not args.no_dense)
    if cfg.n < 1 or cfg.window < 1:
        raise SystemExit("swattn demo: --n and --window must be >= 1")
    return 0 if run_demo(cfg)["ok"] else 1


def _generate(args: argparse.Namespace) -> int:
    from swattn.generate import Sampling, generate
    from swattn.models.loading import load
    from swattn.profiling import fmt_bytes

    text = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text()
    model = load(args.model, dtype=args.dtype)
    if model.tokenizer is None:
        raise SystemExit(f"swattn generate: {args.model} has no tokenizer.json")
    ids = model.tokenizer.encode(text).ids
    if not ids:
        raise SystemExit("swattn generate: the prompt encodes to no tokens")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    generated: list[int] = []
    shown = ""

    def progress(done: int, total: int) -> None:
        if total > args.chunk_size:  # a prompt in several chunks: show a progress bar
            bar = "#" * (30 * done // total)
            print(f"\rprefill [{bar:<30}] {done:,}/{total:,} tokens", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    def stream(tokens: list[int | None]) -> None:
        nonlocal shown
        if tokens[0] is None:
            return
        generated.append(tokens[0])
        text_now = model.tokenizer.decode(generated)  # whole text: multi-token characters come out right
        print(text_now[len(shown):], end="", flush=True)
        shown = text_now

    stats = generate(model, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                     stop_tokens=model.stop_tokens, chunk_size=args.chunk_size, on_step=stream, on_prefill=progress)
    print(flush=True)
    print(f"prefill: {stats.prompt_tokens:,} tokens in {stats.prefill_seconds:.2f} s "
          f"({stats.prefill_tokens_per_s:.1f} tokens/s); decode: {stats.new_tokens:,} tokens in "
          f"{stats.decode_seconds:.2f} s ({stats.decode_tokens_per_s:.1f} tokens/s); "
          f"cache memory {fmt_bytes(stats.cache_bytes)}", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    script = _BENCH_DIR / BENCHMARKS[args.name]
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
    gen = sub.add_parser("generate", help="generate text from a Gemma 2 / Gemma 3 / Mistral checkpoint directory")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer.json)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file holding the prompt (for long documents)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--chunk-size", type=int, default=2048, help="prompt tokens per prefill step")
    bench = sub.add_parser("bench", help="side-by-side benchmarks against peers",
                           description="Runs benchmarks/NAME.py; options after NAME go to it (try NAME --help).")
    bench.add_argument("name", choices=BENCHMARKS)
    # everything after NAME (its --help included) belongs to the benchmark script
    bench.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        rest = args.options + rest
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
    if args.command == "generate":
        return _generate(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
