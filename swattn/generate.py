"""Text generation over swattn's caches: chunked prefill, then one token per row per step.

Prompts of different lengths are left-padded (padding has position -1, so it is never
stored nor seen); a row that meets a stop token steps on with position -1, which leaves
its caches untouched, until every row is done.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from swattn.cache import ModelCache
from swattn.models.transformer import CausalLM


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationStats:
    """What a generation run measured; filled in as it goes, so a caller holding it sees the figures so far.

    ``decode_seconds`` counts the decode steps only, not the ``on_step`` callback's time
    (streaming to a slow terminal is not the model's speed); ``new_tokens`` counts decoded
    tokens; ``prefilled`` is how many positions of the (left-padded) prompt batch went
    through the model (less than the longest prompt only when stopped during prefill).
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0
    prefilled: int = 0
    stopped: bool = False  # should_stop ended the run early
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else float("nan")


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from ``logits`` ``(batch, vocab)``: ``(batch,)`` int64."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    chunk_size: int = 2048,
    capacity: int | None = None,
    cache: ModelCache | None = None,
    on_step: Callable[[list[int | None]], None] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stats: GenerationStats | None = None,
) -> GenerationStats:
    """Generates continuations of a batch of token-id prompts.

    Args:
        model: a loaded :class:`CausalLM`.
        prompts: one list of token ids per row (lengths may differ; each at least 1).
        max_new_tokens: new tokens per row at most.
        sampling: greedy, or temperature / top-k / top-p with a seed.
        stop_tokens: ids that end a row (the stop token is kept in its output).
        chunk_size: prompt tokens per prefill step (memory stays bounded for any length).
        capacity: positions to preallocate for global layers (None: the longest prompt plus
            ``max_new_tokens``, known up front, so a global cache never grows by copying).
        cache: continue from this cache (``model.new_cache(len(prompts))`` holding earlier
            text): each row's prompt continues at that row's ``cache.seq_len``, so a chat's new
            turn prefills only its own tokens. The cache ends up holding the prompts and every
            new token but the last of each row (it was chosen, not yet fed). None: a new cache.
        on_step: called after each decode step with each row's new token (None once done): streaming.
        on_prefill: called with (tokens prefilled, total) after each prefill chunk: progress.
        should_stop: checked between prefill chunks and between decode steps; True ends the
            run there (the cache stays consistent), with ``stats.stopped`` set.
        stats: filled in as the run goes (pass your own to read the figures after an exception).

    Returns:
        :class:`GenerationStats` with each row's new tokens and timings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0 or chunk_size < 1:
        raise ValueError("max_new_tokens must be >= 0 and chunk_size >= 1")
    device = model.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    if cache is None:
        start_pos = [0] * batch
        cache = model.new_cache(batch, capacity=capacity or longest + max_new_tokens)
    elif len(cache.seq_len) != batch:
        raise ValueError(f"cache holds {len(cache.seq_len)} rows but {batch} prompts were given")
    else:
        start_pos = cache.seq_len.tolist()
    _warn_past_max_positions(model, max(s + len(p) for s, p in zip(start_pos, prompts)) + max_new_tokens)
    pad = model.cfg.pad_token_id or 0
    ids = torch.full((batch, longest), pad, dtype=torch.int64, device=device)
    pos = torch.full((batch, longest), -1, dtype=torch.int64, device=device)
    for row, (prompt, first) in enumerate(zip(prompts, start_pos)):  # left padding
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
        pos[row, longest - len(prompt):] = torch.arange(first, first + len(prompt))
    generator = None if sampling.seed is None else torch.Generator(device=device).manual_seed(sampling.seed)
    if device.type == "cpu":  # build the CPU kernel (once, saying so) before anything is timed
        from swattn.ops import cpu

        cpu.available()
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.tokens = sum(len(p) for p in prompts), [[] for _ in prompts]
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.int64, device=device)
    should_stop = should_stop or (lambda: False)

    with torch.inference_mode():
        start = time.perf_counter()
        for begin in range(0, longest, chunk_size):
            if should_stop():
                stats.stopped = True
                return stats
            logits = model(ids[:, begin : begin + chunk_size], pos[:, begin : begin + chunk_size], cache, last_only=True)
            stats.prefilled = min(begin + chunk_size, longest)
            stats.prefill_seconds = time.perf_counter() - start
            stats.cache_bytes = cache.nbytes
            if on_prefill:
                on_prefill(stats.prefilled, longest)
                start = time.perf_counter() - stats.prefill_seconds  # the callback's time is not prefill's
        last = logits[:, -1]
        next_pos = torch.tensor([s + len(p) for s, p in zip(start_pos, prompts)], dtype=torch.int64, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            start = time.perf_counter()
            token = choose(last, sampling, generator)
            emitted = [None if d else int(t) for t, d in zip(token.tolist(), done.tolist())]
            for row, t in enumerate(emitted):
                if t is not None:
                    stats.tokens[row].append(t)
                    stats.new_tokens += 1
            done |= torch.isin(token, stop)
            finished = step == max_new_tokens - 1 or bool(done.all())
            stats.decode_seconds += time.perf_counter() - start
            if on_step:
                on_step(emitted)
            if finished:
                break
            if should_stop():
                stats.stopped = True
                break
            start = time.perf_counter()
            step_pos = torch.where(done, torch.full_like(next_pos, -1), next_pos).unsqueeze(1)
            last = model(token.unsqueeze(1), step_pos, cache, last_only=True)[:, -1]
            next_pos = next_pos + 1
            stats.decode_seconds += time.perf_counter() - start
    stats.cache_bytes = cache.nbytes
    return stats


def _warn_past_max_positions(model: CausalLM, positions: int) -> None:
    """Warns once per model when a run reaches positions the checkpoint was not made for."""
    limit = model.cfg.max_position_embeddings
    if limit and positions > limit and not getattr(model, "_warned_past_max_positions", False):
        model._warned_past_max_positions = True
        warnings.warn(f"generating up to position {positions:,}, past the model's max_position_embeddings "
                      f"({limit:,}): quality may drop beyond what it was trained for", stacklevel=3)
