"""The serving engine: one thread owns the model and a fixed set of sequence slots.

Each slot is one row of a batch :class:`~swattn.cache.ModelCache` allocated at start (rings
for local layers, full caches of ``ctx_size`` positions for global ones), so memory is known
up front. Every engine step:

1. requests that were cancelled (a client went away) leave their slots, and waiting requests
   take free slots, reusing the longest saved prefix of their prompt (:mod:`.prefix`);
2. one pass over the weights runs every decoding slot's next token (as one batch of rows)
   together with chunks of the prompts being prefilled, each through its slot's row
   (:meth:`~swattn.models.transformer.CausalLM.forward_packed`): the linear layers read the
   weights once for all of them, attention runs per part over its own cache. The prompt
   tokens per step are bounded so that the streams already running keep their pace
   (chunked prefill, Sarathi-style).

Requests talk to the HTTP layer through ``on_event`` callbacks, called from this thread; the
``step_listeners`` are called after each step (and after ``stop``), when its events are out.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from swattn.generate import Sampling, choose
from swattn.profiling import prefill_flops
from swattn.serve.metrics import Metrics
from swattn.serve.prefix import PrefixStore
from swattn.streaming import TextStream


class QueueFull(Exception):
    """The wait queue is at ``max_queue``: retry later (HTTP 429)."""


@dataclass
class Request:
    """One completion to run. ``on_event(kind, data)`` receives ``("text", str)`` pieces, then one
    ``("done", {"finish_reason", "usage"})`` (or ``("error", message)``), from the engine thread."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    on_event: Callable[[str, object], None]
    stop: list[str] = field(default_factory=list)
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.perf_counter)
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)
    cancelled: bool = False
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Slot:
    index: int
    view: object  # the slot's row of the batch cache (a ModelCache of views)
    request: Request | None = None
    prefilled: int = 0
    decoding: bool = False
    next_pos: int = 0
    last_token: int = 0
    stream: TextStream | None = None
    unsent: str = ""
    generator: torch.Generator | None = None
    last_emit: float = 0.0


MIN_CHUNK = 16  # prompt tokens per step at least, however slow prefill is next to decoding


class Engine:
    """Continuous batching over ``parallel`` slots of ``ctx_size`` positions each.

    Args:
        model: a loaded :class:`~swattn.models.transformer.CausalLM` with a tokenizer.
        parallel: sequence slots (requests generating at once).
        ctx_size: positions per slot (prompt + completion).
        prefill_chunk: prompt tokens prefilled per engine step, across all slots, at most.
        itl_factor: while streams decode, each step's prefill delays every stream's next token,
            so a prompt longer than ``prefill_chunk`` is prefilled in chunks sized to keep a step
            within this many decode steps' time (Sarathi-style; at least ``MIN_CHUNK`` tokens),
            from the measured times of decode steps (by row count) and of prefill FLOPs, which
            grow with the context each chunk attends to. A prompt of up to ``prefill_chunk``
            tokens is prefilled in one step.
        max_queue: requests that may wait for a slot before new ones are refused.
        prefix_cache_bytes: memory for saved prefixes (0: no reuse).
        snapshot_every: a prompt's caches are saved after this many tokens, then after twice,
            four times as many and so on (see :meth:`_next_snapshot`), and at its end.
        metrics: where to count (a fresh :class:`Metrics` if None).
    """

    def __init__(self, model, *, parallel: int = 4, ctx_size: int = 4096, prefill_chunk: int = 512,
                 itl_factor: float = 2.0, max_queue: int = 64, prefix_cache_bytes: int = 1 << 30,
                 snapshot_every: int = 512, metrics: Metrics | None = None):
        for name, value in (("parallel", parallel), ("ctx_size", ctx_size), ("prefill_chunk", prefill_chunk),
                            ("snapshot_every", snapshot_every)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if model.tokenizer is None:
            raise ValueError(f"{model.path} has no tokenizer.json")
        self.model, self.parallel, self.ctx_size = model, parallel, ctx_size
        self.prefill_chunk, self.max_queue, self.snapshot_every = prefill_chunk, max_queue, snapshot_every
        if not itl_factor > 1:
            raise ValueError(f"itl_factor must be > 1, got {itl_factor}")
        self.itl_factor = itl_factor
        # moving averages: a decode step's seconds by its row count, seconds per prefill FLOP
        self._decode_s: dict[int, float] = {}
        self._flop_s: float | None = None
        self.stop_tokens = set(model.stop_tokens)
        self.cache = model.new_cache(parallel, capacity=ctx_size)
        self.slots = [_Slot(i, self.cache.row(i)) for i in range(parallel)]
        # decode steps run rows 0 .. n-1 only (slots are taken lowest index first): a view per n
        self._leading = [self.cache.rows(0, n) for n in range(1, parallel + 1)]
        for slot in self.slots:
            slot.view.clear()
        self.prefixes = PrefixStore(prefix_cache_bytes)
        self.metrics = metrics or Metrics()
        self.metrics.slots.set(parallel)
        self.metrics.kv_bytes.set(self.cache.nbytes)
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # engine steps that did work (tests and benchmarks read it)
        # called (from the engine thread) after each step's events: an HTTP layer hands them on
        # in one go rather than waking its event loop for every token
        self.step_listeners: list[Callable[[], None]] = []

    # ---- the HTTP side -------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queues a request; raises :class:`QueueFull` when ``max_queue`` are already waiting."""
        if len(request.prompt) + request.max_tokens > self.ctx_size:
            raise ValueError(f"{len(request.prompt)} prompt tokens + max_tokens {request.max_tokens} exceed the "
                             f"context of {self.ctx_size} tokens")
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Marks a request cancelled: it leaves its slot (or the queue) at the next step; nothing more is computed."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def cancel_all(self) -> None:
        """Cancels every running and waiting request (a server shutting down)."""
        with self._wake:
            for request in self._waiting:
                request.cancelled = True
            for slot in self.slots:
                if slot.request is not None:
                    slot.request.cancelled = True
            self._wake.notify()

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="swattn-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the loop; requests still running or waiting end with finish_reason "cancelled"."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for slot in self.slots:
            if slot.request is not None:
                self._finish(slot, "cancelled")
        while self._waiting:
            _drop(self._waiting.popleft())
        self._stepped()

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or any(s.request is not None for s in self.slots)

    # ---- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while self._running and not self.busy:
                        self._wake.wait()
                    if not self._running:
                        return
                try:
                    self.step()
                except Exception as exc:  # never leave a client hanging: fail what was running
                    for slot in self.slots:
                        if slot.request is not None:
                            slot.request.on_event("error", f"engine failure: {exc}")
                            self._release(slot)
                finally:
                    self._stepped()

    def _stepped(self) -> None:
        for listener in self.step_listeners:
            listener()

    def step(self) -> None:
        """One engine step: admissions, then one pass over the weights for the decoding rows and prompt chunks."""
        self._admit()
        self._run()
        self.steps += 1
        self.metrics.kv_bytes_used.set(self.cache.nbytes_used)

    def _admit(self) -> None:
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, "cancelled")
        with self._wake:
            for request in [r for r in self._waiting if r.cancelled]:  # gone while waiting: never run
                self._waiting.remove(request)
                _drop(request)
            free = [s for s in self.slots if s.request is None]
            while free and self._waiting:
                self._assign(free.pop(0), self._waiting.popleft())
            self.metrics.waiting.set(len(self._waiting))
        self.metrics.running.set(sum(s.request is not None for s in self.slots))

    def _assign(self, slot: _Slot, request: Request) -> None:
        slot.view.clear()
        slot.request, slot.prefilled, slot.decoding, slot.unsent = request, 0, False, ""
        slot.stream = TextStream(self.model.tokenizer)
        seed = request.sampling.seed
        slot.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.metrics.prompt_tokens.inc(len(request.prompt))
        self.metrics.prefix_queries.inc()
        found = self.prefixes.longest(request.prompt, below=len(request.prompt))
        if found is not None:  # continue from the saved caches: the rings as they were after the prefix
            slot.view.restore(found.state)
            slot.prefilled = request.cached_tokens = found.length
            self.metrics.prefix_hits.inc()
            self.metrics.prefix_hit_tokens.inc(found.length)

    def _run(self) -> None:
        """The decoding rows (one token each) and prompt chunks within the budget, in one packed forward."""
        parts, jobs = [], []
        active = [s for s in self.slots if s.request is not None and s.decoding]
        if active:
            n = max(s.index for s in active) + 1  # slots are taken lowest index first
            ids = torch.zeros(n, 1, dtype=torch.int64)
            pos = torch.full((n, 1), -1, dtype=torch.int64)  # idle and prefilling rows: untouched
            for s in active:
                ids[s.index, 0], pos[s.index, 0] = s.last_token, s.next_pos
            cache = self._leading[n - 1]
            cache.forget_extent()  # global layers attend up to the furthest active position only
            parts.append((ids, pos, cache))
            jobs.append(("decode", active, 0))
        # prompt chunks: prefill_chunk tokens per step across slots; while streams decode, a
        # prompt longer than that gets only what keeps the step within itl_factor decode steps
        # (one that fits in a chunk goes whole, once, as llama.cpp and vLLM take it, and first,
        # then the long ones by arrival)
        limit = self._prefill_seconds(len(active)) if active else None
        tokens, flops = 0, 0.0
        for slot in sorted((s for s in self.slots if s.request is not None and not s.decoding),
                           key=lambda s: (len(s.request.prompt) > self.prefill_chunk, s.request.arrived)):
            if tokens >= self.prefill_chunk:
                break
            prompt, begin = slot.request.prompt, slot.prefilled
            # one chunk per slot per step, ending at a snapshot boundary when it meets one
            end = min(len(prompt), begin + self.prefill_chunk - tokens, self._next_snapshot(begin))
            if limit is not None and len(prompt) > self.prefill_chunk:
                end = self._fit(begin, end, limit - flops * self._flop_s, least=MIN_CHUNK if not tokens else 0)
                if end <= begin:
                    continue
            parts.append((torch.tensor([prompt[begin:end]]), torch.arange(begin, end).view(1, -1), slot.view))
            jobs.append(("prefill", slot, end))
            tokens += end - begin
            flops += prefill_flops(self.model.cfg, begin, end)
        if not parts:
            return
        began = time.perf_counter()
        logits = self.model.forward_packed(parts)
        took = time.perf_counter() - began
        if not tokens:
            self._decode_s[len(active)] = _average(self._decode_s.get(len(active)), took)
        elif not active:
            self._flop_s = _average(self._flop_s, took / flops)
        elif len(active) in self._decode_s:
            self._flop_s = _average(self._flop_s, max(took - self._decode_s[len(active)], 0.0) / flops)
        for (kind, who, end), rows in zip(jobs, logits):
            if kind == "decode":
                for s in who:
                    s.next_pos += 1
                    self._emit(s, self._sample(s, rows[s.index : s.index + 1]))
                continue
            slot, prompt = who, who.request.prompt
            self.metrics.prefilled_tokens.inc(end - slot.prefilled)
            slot.prefilled = end
            if (end == self._next_snapshot(end - 1) or end == len(prompt)) and not self.prefixes.has(prompt[:end]):
                self.prefixes.put(prompt[:end], slot.view.save())
                self.metrics.prefix_bytes.set(self.prefixes.nbytes)
            if end == len(prompt):
                slot.decoding, slot.next_pos = True, end
                self.metrics.ttft.observe(time.perf_counter() - slot.request.arrived)
                slot.last_emit = time.perf_counter()
                self._emit(slot, self._sample(slot, rows[0:1]))

    def _next_snapshot(self, position: int) -> int:
        """The first snapshot boundary after ``position``: ``snapshot_every`` tokens, then doubling.

        A saved state holds every token up to its boundary (a global layer's cache grows with
        it), so boundaries at a fixed spacing would copy O(n^2) bytes over a long prompt (a 16k
        prompt every 512 tokens: 32 copies, up to 84 MB each on the benchmark model, every one
        a pause for the streams decoding beside it); doubling copies about twice the last state.
        """
        boundary = self.snapshot_every
        while boundary <= position:
            boundary *= 2
        return boundary

    def _prefill_seconds(self, rows: int) -> float | None:
        """What a step's long-prompt chunks may take beside ``rows`` decoding rows (None: not measured yet)."""
        if self._flop_s is None or not self._decode_s:
            return None
        # a decode step of this many rows, else of the nearest count measured
        decode = self._decode_s.get(rows) or self._decode_s[min(self._decode_s, key=lambda n: abs(n - rows))]
        return (self.itl_factor - 1) * decode

    def _fit(self, begin: int, end: int, seconds: float, least: int) -> int:
        """The furthest position in ``begin .. end`` whose chunk from ``begin`` takes at most ``seconds``
        (estimated from its FLOPs, which grow with the context the chunk attends to), at least ``least`` tokens."""
        cfg, low, high = self.model.cfg, begin, end
        while low < high:
            mid = (low + high + 1) // 2
            if prefill_flops(cfg, begin, mid) * self._flop_s <= seconds:
                low = mid
            else:
                high = mid - 1
        return max(low, min(end, begin + least))

    def _sample(self, slot: _Slot, logits: torch.Tensor) -> int:
        return int(choose(logits, slot.request.sampling, slot.generator)[0])

    def _emit(self, slot: _Slot, token: int) -> None:
        """Streams one generated token's text; ends the request on a stop token, a stop string or its length."""
        request = slot.request
        now = time.perf_counter()
        if request.completion_tokens:
            self.metrics.itl.observe(now - slot.last_emit)
        slot.last_emit = now
        if token in self.stop_tokens and not request.ignore_eos:
            request.completion_tokens += 1
            self._finish(slot, "stop")
            return
        request.completion_tokens += 1
        self.metrics.generated_tokens.inc()
        slot.last_token = token
        slot.unsent += slot.stream.push(token)
        if self._send(slot, final=False):
            self._finish(slot, "stop", flush=False)
        elif request.completion_tokens >= request.max_tokens:
            self._finish(slot, "length")

    def _send(self, slot: _Slot, final: bool) -> bool:
        """Sends what of ``unsent`` cannot begin a stop string; True when a stop string was met (cut there)."""
        request, text = slot.request, slot.unsent
        hits = [(text.find(s), s) for s in request.stop if s and s in text]
        if hits:
            cut = min(hits)[0]
            if cut:
                request.on_event("text", text[:cut])
            slot.unsent = ""
            return True
        keep = 0
        if not final:  # hold back a tail that may be the start of a stop string
            for stop in request.stop:
                for n in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:n]):
                        keep = max(keep, n)
                        break
        if len(text) > keep:
            request.on_event("text", text[: len(text) - keep])
            slot.unsent = text[len(text) - keep :]
        return False

    def _finish(self, slot: _Slot, reason: str, flush: bool = True) -> None:
        request = slot.request
        if flush and reason != "cancelled":
            slot.unsent += slot.stream.finish()
            if self._send(slot, final=True):
                reason = "stop"
        usage = {"prompt_tokens": len(request.prompt), "completion_tokens": request.completion_tokens,
                 "total_tokens": len(request.prompt) + request.completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": request.cached_tokens}}
        self.metrics.requests.labels(reason).inc()
        self._release(slot)
        request.on_event("done", {"finish_reason": reason, "usage": usage})

    def _release(self, slot: _Slot) -> None:
        slot.request, slot.decoding, slot.stream, slot.unsent = None, False, None, ""
        self.metrics.running.set(sum(s.request is not None for s in self.slots))


def _average(old: float | None, new: float, weight: float = 0.2) -> float:
    """An exponential moving average (the first value as it is)."""
    return new if old is None else (1 - weight) * old + weight * new


def _drop(request: Request) -> None:
    """Ends a request that never got a slot."""
    request.on_event("done", {"finish_reason": "cancelled", "usage": None})
