"""Starting and stopping ``swattn serve``: the model loads in the background (``/health`` says 503
until it is ready), uvicorn serves, Ctrl-C/SIGTERM end running requests and stop within a bound."""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from swattn import dtypes
from swattn.serve.api import ServerState, create_app


@dataclass
class ServeArgs:
    model: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    parallel: int = 4
    ctx_size: int = 4096
    dtype: str | None = None
    weights: str | None = None
    head: str | None = None
    kv_dtype: str | None = None
    api_key: str | None = None
    max_queue: int = 64
    prefill_chunk: int = 512
    itl_factor: float = 2.0
    prefix_cache_mb: int = 1024
    snapshot_every: int = 512
    name: str | None = None


def _load(state: ServerState, args: ServeArgs, log) -> None:
    """Loads the model and starts the engine (in a thread, while the server already answers /health)."""
    try:
        from swattn.chat import ChatTemplate
        from swattn.models.loading import load
        from swattn.ops import cpu
        from swattn.profiling import fmt_bytes
        from swattn.serve.engine import Engine

        model = load(args.model, dtype=args.dtype, weights=args.weights, head=args.head, kv_dtype=args.kv_dtype)
        cpu.available()  # build the CPU kernel before the first request waits for it
        engine = Engine(model, parallel=args.parallel, ctx_size=args.ctx_size, prefill_chunk=args.prefill_chunk,
                        itl_factor=args.itl_factor, max_queue=args.max_queue,
                        prefix_cache_bytes=args.prefix_cache_mb << 20, snapshot_every=args.snapshot_every)
        state.template = ChatTemplate.from_checkpoint(model.path)
        engine.start()
        state.engine = engine
        log(f"ready: {state.model_name} ({dtypes.name(model.dtype)}"
            + (f", {model.weights} weights" if model.weights else "")
            + (f", {dtypes.name(model.kv_dtype)} KV" if model.kv_dtype is not None else "") + "), "
            f"{args.parallel} slots x {args.ctx_size:,} positions, KV caches {fmt_bytes(engine.cache.nbytes)} "
            f"allocated, prefix cache up to {args.prefix_cache_mb} MB"
            + ("" if state.template else "; no chat template: /v1/chat/completions is off"))
    except Exception as exc:  # reported by /health and on stderr; the server stays up to say so
        state.load_error = f"could not load the model: {exc}"
        log(state.load_error)


def serve(args: ServeArgs, log=None) -> int:
    """Runs the server until Ctrl-C or SIGTERM; gives the exit status."""
    import uvicorn

    log = log or (lambda msg: print(f"swattn serve: {msg}", file=sys.stderr, flush=True))
    name = args.name or ("swattn-builtin" if args.model is None else Path(args.model).resolve().name)
    state = ServerState(model_name=name, api_key=args.api_key)
    app = create_app(state)
    loader = threading.Thread(target=_load, args=(state, args, log), daemon=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:  # say the real port (--port 0 picks a free one)
                port = self.servers[0].sockets[0].getsockname()[1]
                log(f"listening on http://{args.host}:{port} (model {name})")

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown, which would kill the
            # process before the engine stops: a requested stop is a normal exit here
            with super().capture_signals():
                yield
                self._captured_signals.clear()

        def handle_exit(self, sig, frame):  # end running requests at once, so their streams close
            if state.engine is not None:
                state.engine.cancel_all()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = Server(config)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log(f"warning: serving on {args.host} without --api-key: anyone who can reach it may use it")
    loader.start()
    try:
        server.run()
    finally:
        loader.join(timeout=1)
        if state.engine is not None:
            state.engine.stop()
    log("stopped")
    return 0
