"""Training text: files to read, a tokenizer trained on them, a token stream, batches.

Documents are read whole, each becomes ``<bos> tokens <eos>``, and all are concatenated into
one stream. Every ``HOLDOUT_EVERY``-th document (in sorted path order) is held out for
evaluation. Batches are random windows of the stream drawn from a generator seeded by
(seed, step), so the data order does not depend on where a run was stopped and resumed.
"""

from __future__ import annotations

import glob
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

HOLDOUT_EVERY = 50
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, Gemma's order
STDLIB = "stdlib"  # --data stdlib: the running interpreter's standard library source


def stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library (not site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def expand(patterns: list[str]) -> list[Path]:
    """Files named by paths, directories (every file below) and globs (``**`` recurses).

    Raises:
        ValueError: a pattern that names nothing, naming it.
    """
    files: set[Path] = set()
    for pattern in patterns:
        if pattern == STDLIB:
            found = stdlib_files()
        elif Path(pattern).is_dir():
            found = [p for p in Path(pattern).rglob("*") if p.is_file()]
        else:
            found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        if not found:
            raise ValueError(f"--data {pattern!r} names no file")
        files.update(found)
    return sorted(files)


def read_documents(files: list[Path]) -> list[str]:
    """Reads each file as UTF-8 text (undecodable bytes replaced); skips empty files.

    Raises:
        ValueError: a file that cannot be read, or no text at all.
    """
    docs = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise ValueError(f"cannot read {f}: {exc.strerror or exc}") from exc
        if text.strip():
            docs.append(text)
    if not docs:
        raise ValueError(f"the data ({len(files)} file(s)) holds no text")
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``docs`` (the ``tokenizers`` library).

    Every byte has a token of its own, so any text encodes (no unknown token) and decoding
    gives back the exact bytes; a ``<bos>`` is added in front of every encoding, as Gemma's
    tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (every byte and the special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return tok


def special_ids(tokenizer) -> dict[str, int | None]:
    """Ids of ``<pad>``, ``<eos>``, ``<bos>`` in ``tokenizer`` (None where absent)."""
    return {name.strip("<>"): tokenizer.token_to_id(name) for name in ("<pad>", "<eos>", "<bos>")}


def is_heldout(index: int) -> bool:
    """Whether the document at ``index`` (among the non-empty ones, in path order) is held out."""
    return index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


@dataclass
class Corpus:
    """The tokenized data: a training stream and a held-out stream of int32 token ids."""

    train: torch.Tensor
    heldout: torch.Tensor
    documents: int
    bytes: int


def tokenize(docs: list[str], tokenizer, eos_id: int | None) -> Corpus:
    """Encodes every document (``<bos>`` from the tokenizer, ``<eos>`` appended) into two streams."""
    encoded = tokenizer.encode_batch(docs)
    train, held = [], []
    for i, enc in enumerate(encoded):
        ids = enc.ids + ([eos_id] if eos_id is not None else [])
        (held if is_heldout(i) else train).append(torch.tensor(ids, dtype=torch.int32))
    if not held:  # fewer than HOLDOUT_EVERY documents: hold out the stream's last part instead
        stream = torch.cat(train)
        cut = max(1, len(stream) // HOLDOUT_EVERY)
        train, held = [stream[:-cut]], [stream[-cut:]]
    return Corpus(torch.cat(train), torch.cat(held), len(docs), sum(len(d.encode()) for d in docs))


def batch_at(stream: torch.Tensor, step: int, batch: int, context: int, seed: int) -> torch.Tensor:
    """The batch of step ``step``: ``(batch, context + 1)`` int64 windows at offsets drawn from (seed, step).

    Raises:
        ValueError: a stream shorter than one window.
    """
    span = len(stream) - context - 1
    if span < 1:
        raise ValueError(f"the training text has {len(stream):,} tokens, fewer than one window of context {context} + 1")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, span, (batch,), generator=gen)
    return torch.stack([stream[s : s + context + 1] for s in starts.tolist()]).long()


def heldout_batches(stream: torch.Tensor, context: int, batch: int, max_windows: int) -> list[torch.Tensor]:
    """Fixed evaluation batches: consecutive windows of the held-out stream (at most ``max_windows``)."""
    n = min(max_windows, (len(stream) - 1) // context)
    if n < 1:  # a held-out text shorter than the context: one shorter window
        return [stream[None].long()] if len(stream) > 1 else []
    windows = torch.stack([stream[i * context : i * context + context + 1] for i in range(n)]).long()
    return list(windows.split(batch))
