"""The OpenAI-compatible HTTP API over the engine (FastAPI on uvicorn, SSE from sse-starlette).

Request and response shapes follow OpenAI's chat completions and completions, so the
official ``openai`` client works unchanged; errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from swattn.chat import ChatTemplate, TemplateError, encode_rendered
from swattn.generate import Sampling
from swattn.serve.engine import Engine, QueueFull
from swattn.serve.engine import Request as EngineRequest

# Fields OpenAI defines that swattn does not implement: refused unless at their neutral value.
UNSUPPORTED = {"n": 1, "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
               "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
               "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "audio": (None,),
               "modalities": (None, ["text"]), "prediction": (None,)}


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerState:
    """What the routes share: the engine (None while loading), the model's name, settings."""

    model_name: str
    engine: Engine | None = None
    template: ChatTemplate | None = None
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    load_error: str | None = None


def _number(body: dict, name: str, kind, lo=None, hi=None, default=None, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ApiError(400, f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}", name)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ApiError(400, f"'{name}' must be in {bounds}, got {value!r}", name)
    return kind(value)


def _sampling(body: dict) -> Sampling:
    return Sampling(temperature=_number(body, "temperature", float, 0, 2, default=1.0),
                    top_p=_number(body, "top_p", float, 0, 1, lo_open=True),
                    top_k=_number(body, "top_k", int, 1),
                    seed=_number(body, "seed", int))


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return [s for s in stop if s]


def _check_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if name in body:
            ok = neutral if isinstance(neutral, tuple) else (neutral,)
            if body[name] not in ok:
                raise ApiError(400, f"'{name}' = {body[name]!r} is not supported by this server", name)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}].role {m['role']!r} is not supported", f"messages[{i}].role")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


class _Relay:
    """Hands engine events to the event loop's queues once per engine step.

    One ``call_soon_threadsafe`` per token and stream would wake the loop (a pipe write and an
    epoll round) for each; with 8 streams that is 8 wake-ups per step, each taking a core from
    the engine's threads for a moment.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, tuple]] = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        """From the engine thread: an event for ``queue``, delivered at the next :meth:`flush`."""
        with self.lock:
            self.pending.append((queue, item))

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        if batch and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._deliver, batch)

    @staticmethod
    def _deliver(batch: list[tuple[asyncio.Queue, tuple]]) -> None:
        for queue, item in batch:
            queue.put_nowait(item)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state`` (its engine may arrive later: /health says 503 until then)."""
    app = FastAPI(title="swattn", docs_url=None, redoc_url=None, openapi_url=None)
    relay: _Relay | None = None  # made at the first request, on the server's event loop

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            if state.api_key is not None and request.url.path not in ("/health",):
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                    raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", None,
                                   "authentication_error", "invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
                raise ApiError(413, f"request body of {int(length):,} bytes exceeds the limit of "
                                    f"{state.max_body_bytes:,}", None, code="request_too_large")
            return await call_next(request)
        except ApiError as exc:
            if state.engine is not None:
                state.engine.metrics.errors.labels(str(exc.status)).inc()
            return exc.response()

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        if state.engine is not None:
            state.engine.metrics.errors.labels(str(exc.status)).inc()
        return exc.response()

    async def read_body(request: Request) -> dict:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > state.max_body_bytes:
                raise ApiError(413, f"request body exceeds the limit of {state.max_body_bytes:,} bytes",
                               code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def engine() -> Engine:
        if state.engine is None:
            raise ApiError(503, state.load_error or "the model is still loading", kind="server_error",
                           code="loading")
        return state.engine

    def check_model(body: dict) -> None:
        name = body.get("model")
        if name is not None and name != state.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                           "model", code="model_not_found")

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading" if state.load_error is None else "error",
                                 "error": state.load_error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        eng = engine()
        return Response(eng.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "swattn"}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body, eng = await read_body(request), engine()
        content = body.get("content")
        if not isinstance(content, str):
            raise ApiError(400, "'content' must be a string", "content")
        special = body.get("add_special", False)
        return {"tokens": eng.model.tokenizer.encode(content, add_special_tokens=bool(special)).ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body, eng = await read_body(request), engine()
        tokens = body.get("tokens")
        vocab = eng.model.cfg.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab})", "tokens")
        return {"content": eng.model.tokenizer.decode(tokens, skip_special_tokens=False)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, eng = await read_body(request), engine()
        check_model(body)
        _check_unsupported(body)
        if state.template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions", "messages")
        try:
            text = state.template.render(_messages(body))
        except TemplateError as exc:
            raise ApiError(400, f"the chat template refused the conversation: {exc}", "messages") from None
        prompt = encode_rendered(eng.model.tokenizer, text)
        return await run(request, body, eng, prompt, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, eng = await read_body(request), engine()
        check_model(body)
        _check_unsupported(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = eng.model.tokenizer.encode(prompt).ids
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = prompt
        else:
            raise ApiError(400, "'prompt' must be a string (or one list of token ids)", "prompt")
        if not ids:
            raise ApiError(400, "'prompt' encodes to no tokens", "prompt")
        return await run(request, body, eng, ids, chat=False)

    async def run(http: Request, body: dict, eng: Engine, prompt: list[int], chat: bool):
        max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
        room = eng.ctx_size - len(prompt)
        if max_tokens is None:
            max_tokens = room
        if room < 1 or max_tokens > room:
            raise ApiError(400, f"the prompt has {len(prompt):,} tokens and max_tokens is {max_tokens:,}: together "
                                f"more than the context of {eng.ctx_size:,} tokens", "max_tokens",
                           code="context_length_exceeded")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", "stream_options")
        include_usage = bool(options.get("include_usage", False))
        sampling, stop = _sampling(body), _stop(body)
        nonlocal relay
        if relay is None:
            relay = _Relay(asyncio.get_running_loop())
            eng.step_listeners.append(relay.flush)
        events: asyncio.Queue = asyncio.Queue()
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be a boolean", "ignore_eos")
        req = EngineRequest(prompt=list(prompt), max_tokens=max_tokens, sampling=sampling, stop=stop,
                            ignore_eos=ignore_eos,
                            on_event=lambda kind, data: relay.put(events, (kind, data)))
        try:
            eng.submit(req)
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy ({exc}); retry shortly", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) if text is None else {"content": text}
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if stream:
            async def chunks():
                try:
                    base = {"id": ident, "object": kind + ("" if not chat else ".chunk"), "created": created,
                            "model": state.model_name}
                    if chat:
                        yield {"data": json.dumps({**base, "choices": [choice(None, None, first=True)]})}
                    while True:
                        what, data = await events.get()
                        if what == "text":
                            yield {"data": json.dumps({**base, "choices": [choice(data, None)]}, ensure_ascii=False)}
                        elif what == "error":
                            yield {"data": json.dumps({"error": {"message": data, "type": "server_error",
                                                                 "param": None, "code": None}})}
                            break
                        else:
                            finish = data["finish_reason"]
                            yield {"data": json.dumps({**base, "choices": [choice(None if chat else "", finish)]})}
                            if include_usage and data["usage"] is not None:
                                yield {"data": json.dumps({**base, "choices": [], "usage": data["usage"]})}
                            break
                    yield {"data": "[DONE]"}
                finally:  # the client went away (or the stream ended): nothing more is computed
                    eng.cancel(req)

            return EventSourceResponse(chunks(), ping=15)

        pieces = []
        try:
            while True:
                try:
                    what, data = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():  # nobody to answer: stop computing now
                        return Response(status_code=499)
                    continue
                if what == "text":
                    pieces.append(data)
                elif what == "error":
                    raise ApiError(500, data, kind="server_error")
                else:
                    break
        finally:
            eng.cancel(req)
        text = "".join(pieces)
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": data["finish_reason"]}]
        else:
            choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": data["finish_reason"]}]
        return {"id": ident, "object": kind, "created": created, "model": state.model_name, "choices": choices,
                "usage": data["usage"]}

    return app
