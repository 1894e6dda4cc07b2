"""``swattn perplexity``: how well a model predicts a text, and what a window costs.

As llama.cpp's ``llama-perplexity``: the text's tokens are cut into segments of ``context``
tokens, each evaluated from an empty cache (a ``<bos>`` first where the model has one, so
every token of the text is predicted). A segment streams through the model's caches in
chunks, so memory stays bounded for any length: local layers keep their window, global ones
the segment. Perplexity is ``exp(mean cross-entropy)`` over the predicted tokens; bits per
byte divides the total by ln 2 and the UTF-8 bytes those tokens decode to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swattn.models.transformer import CausalLM

LOGIT_ROWS = 256  # positions whose logits exist at once (a 256k vocabulary x 256 x 4 bytes = 256 MB)


@dataclass
class PerplexityResult:
    """One evaluation: totals, and the mean loss by position within a segment."""

    window: int | None  # the local layers' window it ran with
    tokens: int = 0
    nll: float = 0.0  # nats, summed over predicted tokens
    bytes: int = 0
    kl: float = 0.0  # summed KL(base || model), nats
    top1: int = 0  # tokens where both models' most likely next token agree
    has_base: bool = False
    position_nll: torch.Tensor | None = None  # (context,) summed loss at each position in a segment
    position_count: torch.Tensor | None = None
    segments: int = 0

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def mean_kl(self) -> float:
        return self.kl / self.tokens if self.tokens else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.top1 / self.tokens if self.tokens else float("nan")


def segments(ids: list[int], context: int, bos: int | None) -> list[list[int]]:
    """Cuts the text's tokens into segments of ``context`` tokens, each starting with ``bos`` (if any)."""
    if context < 2:
        raise ValueError(f"context must be at least 2, got {context}")
    step = context - 1 if bos is not None else context
    return [([bos] if bos is not None else []) + ids[s : s + step] for s in range(0, len(ids), step)
            if len(ids[s : s + step]) + (bos is not None) >= 2]


def _log_probs(model: CausalLM, h: torch.Tensor) -> torch.Tensor:
    return model.logits(h).float().log_softmax(dim=-1)


def _score_rows(model, base, h, hb, target, result) -> torch.Tensor:
    """Negative log-likelihoods of ``target`` given final hidden states ``h`` (rows); KL and top-1 into ``result``."""
    nll = torch.empty(len(target), dtype=torch.float64)
    for r in range(0, len(target), LOGIT_ROWS):
        lp = _log_probs(model, h[r : r + LOGIT_ROWS])
        t = target[r : r + LOGIT_ROWS]
        nll[r : r + len(t)] = -lp.gather(1, t[:, None]).squeeze(1).double()
        if hb is not None:
            lpb = _log_probs(base, hb[r : r + LOGIT_ROWS])
            result.kl += float((lpb.exp() * (lpb - lp)).sum())
            result.top1 += int((lpb.argmax(-1) == lp.argmax(-1)).sum())
    return nll


@torch.inference_mode()
def evaluate(
    model: CausalLM,
    ids: list[int],
    *,
    context: int,
    chunk_size: int = 1024,
    base: CausalLM | None = None,
    tokenizer=None,
    on_progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Evaluates ``model`` on a text's token ids (without ``<bos>``; it is added per segment).

    Under ``torchrun`` (a process group of several ranks) each segment is split across the
    ranks instead (sequence parallelism, one forward per segment, no caches) and the totals
    are summed; every rank gets the same result.

    Args:
        model: the model (its local layers' windows as set, see ``set_local_window``).
        ids: the text's tokens.
        context: tokens per segment, ``<bos>`` included.
        chunk_size: tokens per forward through the caches (one process).
        base: a reference model of the same vocabulary: KL divergence and top-1 agreement.
        tokenizer: to count the bytes the predicted tokens decode to (bits per byte).
        on_progress: called with the number of tokens just evaluated.

    Returns:
        :class:`PerplexityResult`.
    """
    from swattn import distributed

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if base is not None and base.cfg.vocab_size != model.cfg.vocab_size:
        raise ValueError(f"the KL base has a vocabulary of {base.cfg.vocab_size}, the model {model.cfg.vocab_size}: "
                         "they must share a tokenizer")
    segs = segments(ids, context, model.cfg.bos_token_id)
    if not segs:
        raise ValueError("the text has too few tokens to predict any")
    result = PerplexityResult(window=next((w for w in model.cfg.windows if w is not None), None), has_base=base is not None,
                              position_nll=torch.zeros(context, dtype=torch.float64),
                              position_count=torch.zeros(context, dtype=torch.int64), segments=len(segs))
    _, world = distributed.world()
    for seg in segs:
        tokens = torch.tensor([seg])
        n = len(seg) - 1  # the last token predicts nothing in this segment
        nll_seg = torch.zeros(n, dtype=torch.float64)
        if world > 1:
            start, end = distributed.local_slice(n)
            pos = torch.arange(start, end)[None]
            hs = []
            for m in (model, base):
                if m is not None:
                    with distributed.sequence_parallel(m):
                        hs.append(m.features(tokens[:, start:end], pos)[0])
            nll_seg[start:end] = _score_rows(model, base, hs[0], hs[1] if base is not None else None,
                                             tokens[0, start + 1 : end + 1], result)
            if on_progress:
                on_progress(n)
        else:
            caches = [m.new_cache(1, capacity=len(seg)) for m in (model, base) if m is not None]
            for begin in range(0, n, chunk_size):
                end = min(begin + chunk_size, n)
                chunk, pos = tokens[:, begin:end], torch.arange(begin, end)[None]
                h = model.features(chunk, pos, caches[0])[0]
                hb = base.features(chunk, pos, caches[1])[0] if base is not None else None
                nll_seg[begin:end] = _score_rows(model, base, h, hb, tokens[0, begin + 1 : end + 1], result)
                if on_progress:
                    on_progress(end - begin)
        result.nll += float(nll_seg.sum())
        result.tokens += n
        result.position_nll[:n] += nll_seg
        result.position_count[:n] += 1
        if tokenizer is not None:
            result.bytes += len(tokenizer.decode(seg[1:], skip_special_tokens=True).encode("utf-8"))
    if world > 1:  # every rank scored its rows: sum the parts (token counts and bytes are already whole)
        import torch.distributed as dist

        result.nll, result.kl, result.top1 = distributed.all_sum(result.nll, result.kl, result.top1)
        result.top1 = int(result.top1)
        dist.all_reduce(result.position_nll)
    return result


def plot_by_position(results: list[PerplexityResult], file: str, buckets: int = 32, title: str = "") -> None:
    """Mean loss against position in the segment, averaged in buckets: one line per window (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        n = int((r.position_count > 0).sum())
        edges = torch.linspace(0, n, buckets + 1).long().unique()
        xs, ys = [], []
        for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
            count = int(r.position_count[lo:hi].sum())
            if count:
                xs.append((lo + hi - 1) / 2)
                ys.append(float(r.position_nll[lo:hi].sum()) / count)
        ax.plot(xs, ys, marker=".", label=f"window {r.window if r.window is not None else 'full'}")
    ax.set_xlabel("position in the segment (tokens)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)
