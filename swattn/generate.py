"""Text generation over swattn's caches: chunked prefill, then one token per row per step.

Prompts of different lengths are left-padded (padding has position -1, so it is never
stored nor seen); a row that meets a stop token steps on with position -1, which leaves
its caches untouched, until every row is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

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
    """What a generation run measured."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0
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
    on_step: Callable[[list[int | None]], None] | None = None,
    on_prefill: Callable[[int, int], None] | None = None,
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
        on_step: called after each decode step with each row's new token (None once done): streaming.
        on_prefill: called with (tokens prefilled, total) after each prefill chunk: progress.

    Returns:
        :class:`GenerationStats` with each row's new tokens and timings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0 or chunk_size < 1:
        raise ValueError("max_new_tokens must be >= 0 and chunk_size >= 1")
    device = model.embed_tokens.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    pad = model.cfg.pad_token_id or 0
    ids = torch.full((batch, longest), pad, dtype=torch.int64, device=device)
    pos = torch.full((batch, longest), -1, dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):  # left padding
        ids[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.int64)
        pos[row, longest - len(prompt):] = torch.arange(len(prompt))
    generator = None if sampling.seed is None else torch.Generator(device=device).manual_seed(sampling.seed)
    cache = model.new_cache(batch, capacity=capacity or longest + max_new_tokens)
    stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts), tokens=[[] for _ in prompts])
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.int64, device=device)

    with torch.inference_mode():
        start = time.perf_counter()
        for begin in range(0, longest, chunk_size):
            logits = model(ids[:, begin : begin + chunk_size], pos[:, begin : begin + chunk_size], cache, last_only=True)
            if on_prefill:
                on_prefill(min(begin + chunk_size, longest), longest)
        stats.prefill_seconds = time.perf_counter() - start
        last = logits[:, -1]
        next_pos = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        start = time.perf_counter()
        for step in range(max_new_tokens):
            token = choose(last, sampling, generator)
            emitted = [None if d else int(t) for t, d in zip(token.tolist(), done.tolist())]
            for row, t in enumerate(emitted):
                if t is not None:
                    stats.tokens[row].append(t)
                    stats.new_tokens += 1
            if on_step:
                on_step(emitted)
            done |= torch.isin(token, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            step_pos = torch.where(done, torch.full_like(next_pos, -1), next_pos).unsqueeze(1)
            last = model(token.unsqueeze(1), step_pos, cache, last_only=True)[:, -1]
            next_pos = next_pos + 1
        stats.decode_seconds = time.perf_counter() - start
    stats.cache_bytes = cache.nbytes
    return stats
