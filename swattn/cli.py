"""The ``swattn`` command: a thin front over the library and the benchmark scripts."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from swattn import dtypes

# name -> script in benchmarks/ (not "transformers.py": run as a script it would shadow the package)
BENCHMARKS = {"attention": "attention.py", "cache": "cache.py", "model": "model.py",
              "transformers": "transformers_backend.py", "train": "train.py",
              "distributed": "distributed.py", "serve": "serve.py", "linear": "linear.py"}
_BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit status 2."""


class CommandError(Exception):
    """A failure that is not a usage mistake (an unusable checkpoint, ...): one line, exit status 1."""


def _demo(args: argparse.Namespace) -> int:
    from swattn.demo import DemoConfig, run_demo

    for name in ("n", "window", "stream_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model is not None and not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: no such directory")
    cfg = DemoConfig(n=args.n, window=args.window, dense=not args.no_dense, model=args.model,
                     stream_tokens=args.stream_tokens, plot=args.plot, tour=not args.op_only)
    return 0 if run_demo(cfg)["ok"] else 1


def _sampling(args: argparse.Namespace):
    """The sampling options, checked: one-line errors naming the option."""
    from swattn.generate import Sampling

    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    try:  # Sampling checks its own fields; its messages name them as the options are named
        sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        raise UserError(f"--{field.replace('_', '-')} {rest}") from None
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UserError("--top-k/--top-p choose among tokens when sampling, but --temperature 0 (the default) is "
                        "greedy: give --temperature > 0 as well")
    return sampling


def _stats_line(stats) -> str:
    from swattn.profiling import fmt_bytes

    return (f"prefill: {stats.prefilled:,} tokens in {stats.prefill_seconds:.2f} s "
            f"({stats.prefilled / stats.prefill_seconds if stats.prefill_seconds else float('nan'):.1f} tokens/s); "
            f"decode: {stats.new_tokens:,} tokens in {stats.decode_seconds:.2f} s "
            f"({stats.decode_tokens_per_s:.1f} tokens/s); cache memory {fmt_bytes(stats.cache_bytes)}")


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--prompt-file {args.prompt_file}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"--prompt-file {args.prompt_file}: {exc.strerror or exc}") from None


def _chat_template(model):
    from swattn.chat import ChatTemplate

    template = ChatTemplate.from_checkpoint(model.path)
    if template is None:
        raise UserError(f"{model.path} has no chat template (chat_template.jinja, or chat_template in "
                        "tokenizer_config.json): it is not an instruction model; use swattn generate")
    return template


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from swattn.generate import GenerationStats, generate
    from swattn.interrupt import StopOnInterrupt
    from swattn.streaming import TextStream

    sampling = _sampling(args)
    if args.system is not None and not args.chat:
        raise UserError("--system goes with --chat")
    text = _read_prompt(args)
    model = _load_model(args.model, args.dtype, "generate", args)
    if model.tokenizer is None:
        raise CommandError(f"{model.path} has no tokenizer.json")
    if args.chat:
        from swattn.chat import check_system_supported, encode_rendered

        template = _chat_template(model)
        if args.system:
            check_system_supported(template)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": text}]
        ids = encode_rendered(model.tokenizer, template.render(messages))
    else:
        ids = model.tokenizer.encode(text).ids
    if not ids:
        raise UserError("the prompt encodes to no tokens")
    stream_text = TextStream(model.tokenizer)
    stops = set(model.stop_tokens)
    stats = GenerationStats()
    bar = tqdm(total=len(ids), desc="prefill", unit="tok", leave=False,
               disable=len(ids) <= args.chunk_size or not sys.stderr.isatty())

    def stream(tokens: list[int | None]) -> None:
        if tokens[0] is not None and tokens[0] not in stops:  # the end token is not printed
            print(stream_text.push(tokens[0]), end="", flush=True)  # held back until a character is complete

    with StopOnInterrupt("stopping after this step (Ctrl-C again to stop at once)...") as stop:
        try:
            generate(model, [ids], max_new_tokens=args.max_new_tokens, sampling=sampling,
                     stop_tokens=model.stop_tokens, chunk_size=args.chunk_size, on_step=stream,
                     on_prefill=lambda done, total: bar.update(done - bar.n), should_stop=stop, stats=stats)
        except KeyboardInterrupt:  # a second Ctrl-C, mid-step
            stop.requested = True
        finally:
            bar.close()
    print(stream_text.finish(), flush=True)
    print(_stats_line(stats), file=sys.stderr)
    if stop.requested:
        print("swattn generate: interrupted", file=sys.stderr)
        return 130
    return 0


def _chat(args: argparse.Namespace) -> int:
    from swattn.chat import ChatSession, TemplateError
    from swattn.interrupt import StopOnInterrupt

    sampling = _sampling(args)
    model = _load_model(args.model, args.dtype, "chat", args)
    if model.tokenizer is None:
        raise CommandError(f"{model.path} has no tokenizer.json")
    session = ChatSession(model, _chat_template(model), system=args.system, sampling=sampling,
                          max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("swattn chat: type a message; /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply",
              file=sys.stderr)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            print(file=sys.stderr)
            continue
        if not interactive and line == "":
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        with StopOnInterrupt() as stop:
            try:
                _, turn = session.send(text, on_text=lambda piece: print(piece, end="", flush=True), should_stop=stop)
            except TemplateError as exc:
                if not interactive:
                    raise
                print(f"swattn chat: error: {exc}", file=sys.stderr)
                continue
            except KeyboardInterrupt:  # a second Ctrl-C landed mid-step: the caches cannot be trusted
                session.reset()
                print("\n(stopped at once; the conversation was cleared)", file=sys.stderr)
                continue
        print(flush=True)
        gen = turn.generation
        print(f"({'stopped; ' if gen.stopped else ''}{gen.new_tokens} tokens at {gen.decode_tokens_per_s:.1f} "
              f"tokens/s; prompt: {turn.prefilled} new tokens, {turn.reused} from the cache)", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import json
    import os

    try:
        from swattn.serve.server import ServeArgs, serve
    except ImportError as exc:
        raise CommandError(f"{exc.name or exc} is missing: pip install 'swattn[serve]'") from None
    for name in ("parallel", "max_queue", "prefill_chunk", "snapshot_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if not args.itl_factor > 1:
        raise UserError(f"--itl-factor must be > 1, got {args.itl_factor}")
    if args.prefix_cache_mb < 0:
        raise UserError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    if args.head and not args.weights:
        raise UserError("--head applies to quantized weights: give --weights q8 or q4 too")
    from swattn.models.loading import BUILTIN

    path = Path(args.model) if args.model is not None else BUILTIN
    if not (path / "config.json").is_file():
        raise UserError(f"--model {args.model}: no config.json there" if args.model else "the built-in model is missing")
    ctx = args.ctx_size
    if ctx is None:
        try:
            ctx = min(json.loads((path / "config.json").read_text()).get("max_position_embeddings") or 8192, 8192)
        except ValueError as exc:
            raise CommandError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if ctx < 2:
        raise UserError(f"--ctx-size must be >= 2, got {ctx}")
    key = args.api_key or os.environ.get("SWATTN_API_KEY") or None
    return serve(ServeArgs(model=args.model, host=args.host, port=args.port, parallel=args.parallel, ctx_size=ctx,
                           dtype=args.dtype, weights=args.weights, head=args.head, kv_dtype=args.kv_dtype, api_key=key, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                           itl_factor=args.itl_factor,
                           prefix_cache_mb=args.prefix_cache_mb, snapshot_every=args.snapshot_every, name=args.name))


def _quantize(args: argparse.Namespace) -> int:
    """``swattn quantize``: a quantized checkpoint directory."""
    from swattn.models.loading import BUILTIN
    from swattn.models.quantize import write_checkpoint
    from swattn.profiling import fmt_bytes

    src = Path(args.model) if args.model else BUILTIN
    if not src.is_dir():
        raise UserError(f"--model {src}: no such directory")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise UserError(f"--out {args.out} exists and is not empty")
    summary = write_checkpoint(src, args.out, args.weights, args.head, dtype=args.dtype,
                               progress=sys.stderr.isatty())
    print(f"wrote {args.out}: {summary['tensors']} quantized tensors ({args.weights}), "
          f"{fmt_bytes(summary['bytes'])} (source {fmt_bytes(summary['source_bytes'])})"
          + (f"; kept dense: {', '.join(summary['dense'])}" if summary["dense"] else ""))
    return 0


def _load_model(path: str | None, dtype: str | None, command: str, args: argparse.Namespace | None = None):
    """Loads ``--model`` (or the built-in model, saying so), with ``args``' --weights/--head where given."""
    from swattn.models.loading import BUILTIN, load

    if path is None:
        if not (BUILTIN / "config.json").exists():
            raise UserError(f"no --model given and the built-in model is missing from {BUILTIN}")
        print(f"swattn {command}: using the built-in model (a small Gemma 2 trained on Python's standard library; "
              "--model DIR for another)", file=sys.stderr)
    elif not Path(path).is_dir():
        raise UserError(f"--model {path}: no such directory")
    weights, head = getattr(args, "weights", None), getattr(args, "head", None)
    if head and not weights:
        raise UserError("--head applies to quantized weights: give --weights q8 or q4 too")
    model = load(path, dtype=dtype, weights=weights, head=head, kv_dtype=getattr(args, "kv_dtype", None))
    if model.dense_layers and weights:
        print(f"swattn {command}: kept dense (in_features not a multiple of 64): {', '.join(model.dense_layers[:4])}"
              + (" ..." if len(model.dense_layers) > 4 else ""), file=sys.stderr)
    if model.skipped_tensors:
        print(f"swattn {command}: text only: skipped the vision tower ({len(model.skipped_tensors)} tensors)",
              file=sys.stderr)
    return model


def _perplexity(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from swattn import distributed
    from swattn.perplexity import evaluate, plot_by_position

    distributed.init_from_torchrun()
    rank, world = distributed.world()

    if args.context is not None and args.context < 2:
        raise UserError(f"--context must be >= 2, got {args.context}")
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    windows = [None if w in ("full", "none") else _positive_int(w, "--window") for w in (args.window or [])]
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"--file {args.file}: {exc.strerror or exc}") from None
    model = _load_model(args.model, args.dtype, "perplexity", args)
    if model.tokenizer is None:
        raise UserError(f"{model.path} has no tokenizer.json")
    base = None
    if args.kl_base:
        base_path = None if args.kl_base in ("float32", "bfloat16") else args.kl_base
        base = _load_model(base_path or args.model, args.kl_base if base_path is None else "float32", "perplexity")
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < 2:
        raise UserError(f"--file {args.file} holds {len(ids)} token(s): nothing to predict")
    context = args.context or min(len(ids) + 1, model.cfg.max_position_embeddings or 8192)
    own = model.cfg.windows
    runs = windows or ["own"]
    results = []
    if rank == 0:
        print(f"{len(ids):,} tokens in segments of {context:,}; local windows {sorted({w for w in own if w})} "
              f"(the model's own), global layers {sum(w is None for w in own)} of {len(own)}"
              + (f"; each segment split across {world} ranks" if world > 1 else ""), file=sys.stderr)
    for w in runs:
        if w != "own":
            model.set_local_window(w)
        with tqdm(total=len(ids), unit="tok", desc=f"window {w}", disable=not sys.stderr.isatty() or rank != 0,
                  leave=False) as bar:
            results.append(evaluate(model, ids, context=context, chunk_size=args.chunk_size, base=base,
                                    tokenizer=model.tokenizer, on_progress=bar.update))
    if rank != 0:
        return 0
    header = f"{'window':>8} {'tokens':>10} {'loss':>8} {'perplexity':>11} {'bits/byte':>10}"
    if base is not None:
        header += f" {'KL vs base':>11} {'top-1 agree':>12}"
    print(header)
    for r in results:
        row = (f"{'full' if r.window is None else r.window:>8} {r.tokens:>10,} {r.loss:>8.4f} {r.perplexity:>11.3f} "
               f"{r.bits_per_byte:>10.4f}")
        if base is not None:
            row += f" {r.mean_kl:>11.5f} {100 * r.top1_agreement:>11.2f}%"
        print(row)
    if args.plot:
        plot_by_position(results, args.plot, title=f"{Path(args.file).name}: loss by position, context {context}")
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


def _positive_int(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{option}: {text!r} is not an integer (or 'full')") from None
    if value < 1:
        raise UserError(f"{option} must be >= 1, got {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    from swattn.training.trainer import TrainArgs, parse_duration, train

    given = {k: getattr(args, k) for k in ("preset", "config", "init", "tokenizer", "context", "window", "steps",
                                           "batch", "lr", "warmup", "eval_every", "save_every", "precision",
                                           "save_dtype", "seed")}
    for name in ("context", "window", "steps", "batch", "warmup", "eval_every", "save_every"):
        if given[name] is not None and given[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {given[name]}")
    if given["lr"] is not None and given["lr"] <= 0:
        raise UserError(f"--lr must be > 0, got {given['lr']}")
    budget = parse_duration(args.time_budget) if args.time_budget else None
    if budget is not None and budget <= 0:
        raise UserError(f"--time-budget must be positive, got {args.time_budget!r}")
    if args.steps is not None and budget is not None:
        raise UserError("give --steps or --time-budget, not both")
    if args.init and (args.config or args.preset):
        raise UserError("--init takes its shape from the checkpoint; drop --preset/--config")
    defaults = {k: v for k, v in given.items() if v is not None}
    from swattn import distributed

    distributed.init_from_torchrun()
    train(TrainArgs(data=args.data, out=args.out, time_budget=budget, resume=args.resume, **defaults))
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


def _add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, help="sample among the k likeliest tokens (with --temperature > 0)")
    parser.add_argument("--top-p", type=float, help="sample among the likeliest tokens holding this probability")
    parser.add_argument("--seed", type=int, help="seed of the sampler")
    parser.add_argument("--dtype", choices=dtypes.MODEL_NAMES, help="default: the checkpoint's own")
    _add_weights_options(parser)
    parser.add_argument("--chunk-size", type=int, default=2048, help="prompt tokens per prefill step")


def _add_weights_options(parser: argparse.ArgumentParser) -> None:
    from swattn.models import quantize

    parser.add_argument("--weights", choices=quantize.WEIGHTS,
                        help="quantize the linear layers while loading: q8 (8.5 bits per weight) or q4 (4.5); "
                             "default: as stored")
    parser.add_argument("--head", choices=quantize.HEADS,
                        help="with --weights: the output head's (and tied embedding's) format (default q8)")
    parser.add_argument("--kv-dtype", choices=list(dtypes.KV),
                        help="what the caches store keys and values as: bf16, fp16, int8 (a scale per token and "
                             "head: half of bf16's memory) or fp32; default: the model's dtype")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``swattn`` command."""
    parser = argparse.ArgumentParser(prog="swattn", description="Exact sliding-window attention, fast on CPU.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (or SWATTN_DEBUG=1)")
    demo = sub.add_parser("demo", parents=[common], help="a tour on the built-in model: completion, long input through the caches, "
                                       "the op next to dense attention (about a minute)")
    demo.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    demo.add_argument("--window", type=int, default=4096, help="window (default 4096, Gemma 2's)")
    demo.add_argument("--no-dense", action="store_true", help="skip the dense-attention comparison")
    demo.add_argument("--model", help="checkpoint directory for the tour (default: the built-in model)")
    demo.add_argument("--stream-tokens", type=int, default=32768,
                      help="tokens streamed through the caches in part 2 (default 32768)")
    demo.add_argument("--plot", default="swattn-demo.png", help="where part 2's plot goes (default swattn-demo.png)")
    demo.add_argument("--op-only", action="store_true", help="only part 3: the op next to dense attention")
    gen = sub.add_parser("generate", parents=[common],
                         help="generate text from a Gemma 2 / Gemma 3 / Mistral checkpoint directory")
    gen.add_argument("--model", help="checkpoint directory (config.json, *.safetensors, tokenizer.json); "
                                      "default: the built-in model")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text")
    source.add_argument("--prompt-file", help="file holding the prompt (for long documents); '-': standard input")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the "
                                                         "checkpoint's chat template (instruction models)")
    gen.add_argument("--system", help="with --chat: a system message")
    _add_sampling_options(gen, max_new_tokens=128)
    chat = sub.add_parser("chat", parents=[common], help="chat with an instruction checkpoint (its chat template; "
                                                         "the caches carry over between turns)",
                          description="An interactive conversation: one line per message; /reset starts over, "
                                      "/exit or Ctrl-D leaves, Ctrl-C stops a reply. Reads messages from standard "
                                      "input, one per line, when it is not a terminal.")
    chat.add_argument("--model", required=True, help="instruction checkpoint directory (with a chat template)")
    chat.add_argument("--system", help="a system message (templates that refuse one say so)")
    _add_sampling_options(chat, max_new_tokens=512)
    srv = sub.add_parser("serve", parents=[common], help="an OpenAI-compatible HTTP server with continuous batching",
                         description="Serves /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, "
                                     "/tokenize and /detokenize. Ctrl-C or SIGTERM stops it.")
    srv.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    srv.add_argument("--parallel", type=int, default=4, help="requests generating at once (sequence slots)")
    srv.add_argument("--ctx-size", type=int, help="positions per slot, prompt + completion (default: the model's "
                                                  "max_position_embeddings, at most 8192)")
    srv.add_argument("--dtype", choices=dtypes.MODEL_NAMES, help="default: the checkpoint's own")
    _add_weights_options(srv)
    srv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set SWATTN_API_KEY)")
    srv.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (then 429)")
    srv.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per engine step at most")
    srv.add_argument("--itl-factor", type=float, default=2.0,
                     help="while streams decode, prefill only as much per step as keeps a step within this many "
                          "decode steps' time (default 2)")
    srv.add_argument("--prefix-cache-mb", type=int, default=1024, help="memory for saved prompt prefixes (0: off)")
    srv.add_argument("--snapshot-every", type=int, default=512,
                     help="save a prompt's caches after N tokens, then 2N, 4N, ... and at its end")
    srv.add_argument("--name", help="the model name clients use (default: the directory's name)")
    tr = sub.add_parser("train", parents=[common], help="train a Gemma 2 model on text files (or fine-tune a checkpoint)",
                        description="Trains a Gemma 2 architecture model with swattn's attention, forward and "
                                    "backward, on CPU; writes a Hugging Face checkpoint directory.")
    tr.add_argument("--data", nargs="+", required=True,
                    help="files, directories or globs ('src/**/*.py'); 'stdlib' is this Python's standard library")
    tr.add_argument("--out", required=True, help="output directory (model, loss.csv, loss.png, checkpoint/)")
    shape = tr.add_mutually_exclusive_group()
    shape.add_argument("--preset", choices=["tiny", "small"], help="model size (default small: ~7M parameters)")
    shape.add_argument("--config", help="a gemma2 config.json giving the model's shape")
    tr.add_argument("--init", help="checkpoint directory to fine-tune (Gemma 2 / Gemma 3 / Mistral), with its tokenizer")
    tr.add_argument("--tokenizer", help="tokenizer.json (or a directory holding one) instead of training one")
    tr.add_argument("--context", type=int, help="tokens per training sequence (preset: 2048)")
    tr.add_argument("--window", type=int, help="local layers' window (preset: 256); must not exceed --context")
    length = tr.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--time-budget", help="train for this long, e.g. 30m, 2h, 1h30m")
    tr.add_argument("--batch", type=int, help="sequences per step (preset: 16384 tokens per step)")
    tr.add_argument("--lr", type=float, help="peak learning rate (preset: 2e-3)")
    tr.add_argument("--warmup", type=int, help="warm-up steps")
    tr.add_argument("--eval-every", type=int, help="held-out evaluation every N steps (default 50)")
    tr.add_argument("--save-every", type=int, help="resumable checkpoint every N steps (default 100)")
    tr.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                    help="auto (default): bf16 autocast where the CPU has bf16 arithmetic")
    tr.add_argument("--save-dtype", choices=["bfloat16", "float32"], help="dtype of the saved model (default bfloat16)")
    tr.add_argument("--seed", type=int, help="initialisation and data order (default 0)")
    tr.add_argument("--resume", action="store_true", help="continue the checkpoint in --out exactly where it stopped")
    ppl = sub.add_parser("perplexity", parents=[common], help="perplexity and bits per byte of a text; quality against window",
                         description="Streams a text through the model's caches in segments of --context tokens "
                                     "(each from an empty cache, <bos> first) and prints perplexity and bits per byte.")
    ppl.add_argument("--model", help="checkpoint directory (default: the built-in model)")
    ppl.add_argument("--file", required=True, help="the text ('-': standard input)")
    ppl.add_argument("--context", type=int, help="tokens per segment (default: the model's max_position_embeddings)")
    ppl.add_argument("--window", nargs="+", help="run with every local layer's window set to W (several: one row "
                                                 "each; 'full' makes them global)")
    ppl.add_argument("--plot", help="PNG: loss against position in the segment, one line per window")
    ppl.add_argument("--kl-base", help="reference for KL divergence and top-1 agreement: a checkpoint directory, "
                                       "or float32/bfloat16 for this model in that dtype")
    ppl.add_argument("--dtype", choices=dtypes.MODEL_NAMES, help="default: the checkpoint's own")
    _add_weights_options(ppl)
    ppl.add_argument("--chunk-size", type=int, default=1024, help="tokens per forward through the caches")
    qz = sub.add_parser("quantize", parents=[common], help="write a q8 / q4 copy of a checkpoint that loads directly",
                        description="Quantizes the linear layers of a checkpoint tensor by tensor and writes a "
                                    "checkpoint directory that loads without quantizing again.")
    qz.add_argument("--model", help="dense checkpoint directory (default: the built-in model)")
    qz.add_argument("--out", required=True, help="output directory")
    qz.add_argument("--weights", required=True, choices=["q8", "q4"], help="q8 (8.5 bits per weight) or q4 (4.5)")
    qz.add_argument("--head", choices=["q8", "q4", "dense"], help="the output head's format (default q8)")
    qz.add_argument("--dtype", choices=dtypes.MODEL_NAMES, help="activations' dtype recorded in the copy "
                                                                 "(default: the checkpoint's own)")
    bench = sub.add_parser("bench", help="side-by-side benchmarks against peers",
                           description="Runs benchmarks/NAME.py; options after NAME go to it (try NAME --help).")
    bench.add_argument("name", choices=BENCHMARKS)
    # everything after NAME (its --help included) belongs to the benchmark script
    bench.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    from swattn.allocator import keep_freed_memory

    keep_freed_memory()  # every command computes in steps that free and reallocate the same buffers
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
    commands = {"demo": _demo, "generate": _generate, "chat": _chat, "serve": _serve, "train": _train,
                "perplexity": _perplexity, "quantize": _quantize}
    if args.command not in commands:
        parser.print_help()
        return 0
    return _run_reporting_errors(args.command, commands[args.command], args)


def _run_reporting_errors(name: str, fn, args: argparse.Namespace) -> int:
    """Runs a command; a user's mistake or a failure becomes one line on stderr (``--debug``: the traceback).

    Exit status: 0 done, 1 a failure, 2 a usage mistake, 130 Ctrl-C, 141 the output pipe closed.
    """
    import os
    import warnings

    from swattn.chat import TemplateError
    from swattn.training.trainer import Interrupted

    debug = getattr(args, "debug", False) or os.environ.get("SWATTN_DEBUG") == "1"

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"swattn {name}: warning: {message}", file=sys.stderr)

    if not debug:
        warnings.showwarning = one_line_warning
    try:
        return fn(args)
    except BrokenPipeError:  # `swattn generate ... | head`: stop quietly; no flush error at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (UserError, TemplateError) as exc:
        if debug:
            raise
        print(f"swattn {name}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"swattn {name}: {exc}", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, OSError, RuntimeError, ImportError) as exc:
        if debug:
            raise
        print(f"swattn {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nswattn {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
