"""``swattn train``: a Gemma 2 model trained (or an existing checkpoint fine-tuned) on text, on CPU.

The forward and backward of every attention layer run through swattn's op: local layers
with their window, global layers causal, memory that does not grow with n x window.
AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast where the CPU has bf16
arithmetic. A resumable checkpoint (``OUT/checkpoint/``: fp32 weights and optimizer state in
safetensors and ``weights_only`` torch files, settings and history as JSON) is written at
intervals, at the end and on Ctrl-C; ``--resume`` continues exactly where it stopped, since
each step's batch depends only on (seed, step). The trained model is written to ``OUT`` as a
Hugging Face checkpoint directory, with ``loss.csv`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from swattn.interrupt import StopOnInterrupt
from swattn.models.config import ModelConfig
from swattn.models.saving import gemma2_config, save_checkpoint
from swattn.models.transformer import CausalLM
from swattn.training import data as D
from swattn.training.loss import linear_cross_entropy
from swattn.training.presets import PRESETS, gemma2_model_config

CHECKPOINT = "checkpoint"
CALIBRATION_STEPS = 5  # with a time budget: steps timed before the total is fixed
# settings a resumed run must share with the checkpoint (the rest may change between runs)
SHAPE_KEYS = ("preset", "config", "init", "tokenizer", "context", "window", "batch", "lr", "warmup", "steps",
              "time_budget", "seed", "precision")


class Interrupted(Exception):
    """Ctrl-C during training; a resumable checkpoint has been saved."""


@dataclass
class TrainArgs:
    """What ``swattn train`` was asked to do (None: the preset's or the checkpoint's value)."""

    data: list[str]
    out: str
    preset: str | None = None  # None: "small"
    config: str | None = None
    init: str | None = None
    tokenizer: str | None = None
    context: int | None = None
    window: int | None = None
    steps: int | None = None
    time_budget: float | None = None  # seconds
    batch: int | None = None  # sequences per step
    lr: float | None = None
    warmup: int | None = None
    eval_every: int = 50
    eval_windows: int = 32
    save_every: int = 100
    precision: str | None = None  # auto (None) | bf16 | fp32
    save_dtype: str = "bfloat16"
    seed: int | None = None  # None: 0
    resume: bool = False


@dataclass
class TrainResult:
    """What a run ended with."""

    out: Path
    steps: int
    tokens: int
    train_loss: float
    heldout_loss: float
    seconds: float
    parameters: int
    history: list[dict] = field(default_factory=list)


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"30m"``, ``"2h"``, ``"1h30m"`` or a plain number of seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"--time-budget: cannot read {text!r}; write e.g. 90s, 30m, 2h or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def lr_at(step: int, base: float, warmup: int, total: int | None) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    if total is None or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _bf16_arithmetic() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512_BF16 / AMX) that makes bf16 autocast pay."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def _init_weights(model: CausalLM, seed: int) -> None:
    """Normal(0, 0.02) matrices, output projections scaled down by depth; norms as built (gain 1)."""
    gen = torch.Generator().manual_seed(seed)
    depth_scale = (2 * model.cfg.num_layers) ** -0.5
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 0.02 * (depth_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _data_fingerprint(corpus: D.Corpus) -> str:
    h = hashlib.sha256()
    h.update(corpus.train.numpy().tobytes())
    h.update(corpus.heldout.numpy().tobytes())
    return h.hexdigest()[:16]


class _Run:
    """One training run's state and the steps that change it.

    Under ``torchrun`` (a process group of several ranks) every rank takes the same batch and
    runs its contiguous share of each sequence (sequence parallelism: swattn.distributed),
    the weight gradients are summed over the ranks, and rank 0 alone writes files.
    """

    def __init__(self, args: TrainArgs, log):
        from swattn import distributed

        self.rank, self.world = distributed.world()
        self.log = log if self.rank == 0 else (lambda _msg: None)
        log = self.log
        self.out = Path(args.out)
        self.ckpt = self.out / CHECKPOINT
        stored = self._stored_state(args)
        if stored is not None:
            args = stored["args"]
        else:  # the defaults, written into the checkpoint so that a resumed run compares like with like
            args = dataclasses.replace(args, preset=args.preset or "small", precision=args.precision or "auto",
                                       seed=0 if args.seed is None else args.seed)
        self.args = args
        preset = PRESETS[args.preset]
        self.context = args.context or preset.context
        self.batch = args.batch or max(1, preset.batch_tokens // self.context)
        self.lr = args.lr or preset.lr
        self.warmup = args.warmup if args.warmup is not None else preset.warmup
        if self.warmup < 1:
            raise ValueError(f"--warmup must be >= 1, got {self.warmup}")
        if not (args.init or args.config):  # a preset's window is known now: fail before any work
            self._check_context(args.window or preset.window)

        files = D.expand(args.data)
        log(f"reading {len(files):,} file(s)...")
        docs = D.read_documents(files)
        self.tokenizer, self.tokenizer_from = self._tokenizer(args, docs, stored, preset)
        self.special = D.special_ids(self.tokenizer)
        self.model, self.hf_config = self._model(args, preset)
        self._check_context(self.local_window)
        log(f"tokenizing {len(docs):,} documents...")
        self.corpus = D.tokenize(docs, self.tokenizer, self.special["eos"])
        if len(self.corpus.train) <= self.context + 1:
            raise ValueError(f"the data gives {len(self.corpus.train):,} training tokens, not enough for one "
                             f"window of --context {self.context}; give more text or a shorter context")
        self.fingerprint = _data_fingerprint(self.corpus)
        self.heldout = D.heldout_batches(self.corpus.heldout, self.context, self.batch, args.eval_windows)

        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and _bf16_arithmetic())
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, 0.1), lr=self.lr, betas=(0.9, 0.95), eps=1e-8)
        self.step, self.total, self.history, self.seconds = 0, args.steps, [], 0.0
        if stored is not None:
            self._restore(stored)
        self.model.train()

    def _check_context(self, window: int) -> None:
        if self.context < window:
            raise ValueError(f"--context {self.context} is shorter than the local window {window}: the window would "
                             "not matter; use a context of at least the window, or a smaller --window")

    @property
    def local_window(self) -> int:
        return min((w for w in self.model.cfg.windows if w is not None), default=self.context)

    # -- setting up --------------------------------------------------------------------------------

    def _stored_state(self, args: TrainArgs) -> dict | None:
        state_file = self.ckpt / "trainer.json"
        if not args.resume:
            if state_file.exists():
                raise ValueError(f"{self.out} already holds a training checkpoint; pass --resume to continue it, "
                                 "or choose another --out")
            return None
        if not state_file.exists():
            raise ValueError(f"--resume: no checkpoint in {self.ckpt} (nothing to resume)")
        stored = json.loads(state_file.read_text())
        old = TrainArgs(**stored["args"])
        for key in SHAPE_KEYS:
            given, had = getattr(args, key), getattr(old, key)
            if given is not None and given != had:
                raise ValueError(f"--resume: the checkpoint in {self.ckpt} was trained with {key} {had!r}, "
                                 f"not {given!r}; resume it with its own settings, or train anew in another --out")
        # what may change on resume: how often to evaluate and save, the saved dtype; the data is checked
        # against the checkpoint's by its tokens, not by how the files were named
        stored["args"] = dataclasses.replace(old, resume=True, data=args.data, eval_every=args.eval_every,
                                             save_every=args.save_every, save_dtype=args.save_dtype)
        return stored

    def _tokenizer(self, args, docs, stored, preset):
        from tokenizers import Tokenizer

        if stored is not None:
            return Tokenizer.from_file(str(self.ckpt / "tokenizer.json")), None
        source = args.tokenizer or args.init
        if source is not None:
            file = Path(source) / "tokenizer.json" if Path(source).is_dir() else Path(source)
            if not file.exists():
                raise ValueError(f"no tokenizer.json in {source}")
            return Tokenizer.from_file(str(file)), (file.parent if file.name == "tokenizer.json" else None)
        vocab = preset.vocab_size
        if args.config:
            vocab = self._read_config(args.config).get("vocab_size", vocab)
        self.log(f"training a byte-level BPE tokenizer of {vocab:,} tokens on the data...")
        return D.train_tokenizer(docs, vocab), None

    @staticmethod
    def _read_config(path: str) -> dict:
        try:
            return json.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"--config: cannot read {path}: {exc.strerror or exc}") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config: {path} is not valid JSON: {exc}") from exc

    def _model(self, args: TrainArgs, preset) -> tuple[CausalLM, dict]:
        vocab = self.tokenizer.get_vocab_size()
        if args.init:
            from swattn.models.loading import load

            model = load(args.init, dtype="float32", prepack=False)
            hf = json.loads((Path(args.init) / "config.json").read_text())
            if args.window is not None:
                model.set_local_window(args.window)
                hf = dict(hf, sliding_window=args.window)
            self.log(f"fine-tuning {args.init} ({hf.get('model_type')})")
            model.requires_grad_(True)  # load() gives an inference model
            return model, hf
        if args.config:
            hf = self._read_config(args.config)
            cfg = ModelConfig.from_hf_config(hf)
            if args.window is not None:
                cfg = dataclasses.replace(cfg, windows=tuple(None if w is None else args.window for w in cfg.windows))
            max_pos = hf.get("max_position_embeddings", self.context)
        else:
            cfg = gemma2_model_config(preset, args.window or preset.window, self.special)
            cfg = dataclasses.replace(cfg, vocab_size=vocab)
            max_pos = self.context
        if cfg.vocab_size < vocab:
            raise ValueError(f"the model's vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab}")
        if cfg.model_type != "gemma2":
            raise ValueError(f"--config: swattn train builds gemma2 models (got model_type {cfg.model_type!r}); "
                             "fine-tune other families with --init")
        model = CausalLM(cfg)
        _init_weights(model, args.seed)
        return model, gemma2_config(cfg, max_pos)

    def _restore(self, stored: dict) -> None:
        from safetensors.torch import load_file

        if stored["fingerprint"] != self.fingerprint:
            raise ValueError("--resume: the data's tokens differ from the checkpoint's (files changed or "
                             "other --data); resume with the same data")
        weights = load_file(str(self.ckpt / "weights.safetensors"))
        own = self.model.state_dict()
        if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
            raise ValueError(f"--resume: the checkpoint in {self.ckpt} holds a model of another shape")
        self.model.load_state_dict(weights)
        self.optimizer.load_state_dict(torch.load(self.ckpt / "optimizer.pt", weights_only=True))
        self.step, self.total = stored["step"], stored["total_steps"]
        self.history, self.seconds = stored["history"], stored["seconds"]
        self.log(f"resuming at step {self.step:,} of {self.total:,}" if self.total else f"resuming at step {self.step:,}")

    # -- training ----------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``(batch, context + 1)`` windows (under torchrun: this rank's share
        of it, computed on its slice of every sequence; the shares sum to the mean)."""
        x, y = batch[:, :-1], batch[:, 1:]
        if self.world == 1:
            with self._autocast():
                h = self.model.features(x)
                return linear_cross_entropy(h.flatten(0, 1), self.model.head_weight, y.flatten(),
                                            self.model.cfg.final_softcap)
        from swattn.distributed import local_slice, sequence_parallel

        start, end = local_slice(x.shape[1])
        pos = torch.arange(start, end).expand(x.shape[0], -1)
        with self._autocast(), sequence_parallel(self.model):
            h = self.model.features(x[:, start:end], pos)
            share = linear_cross_entropy(h.flatten(0, 1), self.model.head_weight, y[:, start:end].flatten(),
                                         self.model.cfg.final_softcap)
        return share * ((end - start) / x.shape[1])

    def _sum(self, value: float) -> float:
        if self.world == 1:
            return value
        from swattn.distributed import all_sum

        return all_sum(value)[0]

    @torch.no_grad()
    def heldout_loss(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for b in self.heldout:
            total += self._sum(self.loss(b).item()) * b[:, 1:].numel()
            count += b[:, 1:].numel()
        self.model.train()
        return total / count if count else float("nan")

    def train_step(self) -> float:
        batch = D.batch_at(self.corpus.train, self.step, self.batch, self.context, self.args.seed)
        lr = lr_at(self.step, self.lr, self.warmup, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:  # every rank saw its slice of every sequence: the gradient is the sum
            for p in self.model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        return self._sum(loss.item())

    def save_state(self) -> None:
        """Writes the resumable checkpoint atomically (a new directory renamed over the old one); rank 0 only."""
        from safetensors.torch import save_file

        if self.rank != 0:
            return

        tmp = self.out / (CHECKPOINT + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp / "weights.safetensors"))
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        self.tokenizer.save(str(tmp / "tokenizer.json"))
        state = dict(args=dataclasses.asdict(self.args), step=self.step, total_steps=self.total,
                     history=self.history, seconds=self.seconds, fingerprint=self.fingerprint)
        (tmp / "trainer.json").write_text(json.dumps(state, indent=1) + "\n")
        old = self.out / (CHECKPOINT + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt.exists():
            self.ckpt.rename(old)
        tmp.rename(self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def export(self) -> None:
        """Writes the model as a Hugging Face checkpoint directory, and the loss curve (rank 0 only)."""
        if self.rank != 0:
            return
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.args.save_dtype]
        save_checkpoint(self.model, self.out, config=self.hf_config, dtype=dtype, tokenizer=self.tokenizer,
                        tokenizer_from=self.tokenizer_from)
        write_curve(self.history, self.out)


def write_curve(history: list[dict], out: Path) -> None:
    """``loss.csv`` (step, tokens, lr, train and held-out loss) and ``loss.png`` (matplotlib)."""
    rows = ["step,tokens,lr,train_loss,heldout_loss"]
    rows += [f"{h['step']},{h['tokens']},{h['lr']:.6g},{h['train_loss']:.5f},"
             f"{'' if h.get('heldout_loss') is None else format(h['heldout_loss'], '.5f')}" for h in history]
    (out / "loss.csv").write_text("\n".join(rows) + "\n")
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["tokens"] for h in history], [h["train_loss"] for h in history], label="train", lw=1)
    held = [h for h in history if h.get("heldout_loss") is not None]
    ax.plot([h["tokens"] for h in held], [h["heldout_loss"] for h in held], "o-", label="held-out", ms=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


def _broadcast(value: float, world: int) -> float:
    """Rank 0's ``value`` on every rank."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.broadcast(t, 0)
    return float(t)


def train(args: TrainArgs, log=None, progress: bool | None = None) -> TrainResult:
    """Runs ``swattn train``.

    Args:
        args: the settings (see :class:`TrainArgs`).
        log: where one-line messages go (default: stderr).
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: bad data or settings, naming them. Interrupted: Ctrl-C (a resumable
        checkpoint was saved first).
    """
    from tqdm import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    run = _Run(args, log)
    log = run.log  # rank 0 speaks for every rank
    args = run.args
    params = sum(p.numel() for p in run.model.parameters())
    tokens_per_step = run.batch * run.context
    log(f"model: {params / 1e6:.2f}M parameters, layers {list(run.model.cfg.windows)} (window / None = global); "
        f"data: {len(run.corpus.train):,} training + {len(run.corpus.heldout):,} held-out tokens; "
        f"{run.batch} x {run.context} tokens per step; {'bf16 autocast' if run.bf16 else 'fp32'}")
    budget = args.time_budget
    if run.total is None and budget is None:
        raise ValueError("give --steps N or --time-budget (e.g. 30m)")
    if run.total is not None and run.step >= run.total:
        log(f"the checkpoint already finished its {run.total:,} steps")
    show = (sys.stderr.isatty() if progress is None else progress) and run.rank == 0
    bar = tqdm(total=run.total, initial=run.step, unit="step", disable=not show, dynamic_ncols=True)
    stop = StopOnInterrupt("stopping after this step (Ctrl-C again to stop at once)...").__enter__()
    started = time.perf_counter()
    seconds_before = run.seconds
    calibration: list[float] = []
    last_save = run.step
    loss = float("nan")
    try:
        while run.total is None or run.step < run.total:
            if run._sum(float(stop.requested)):  # under torchrun: every rank stops at the same step
                stop.requested = True
                break
            t0 = time.perf_counter()
            loss = run.train_step()
            dt = time.perf_counter() - t0
            run.seconds = seconds_before + time.perf_counter() - started
            if run.total is None:  # a time budget: time a few steps (not the first), then fix the total
                if run.step > 1:
                    calibration.append(dt)
                if len(calibration) >= CALIBRATION_STEPS:  # the same on every rank (rank 0's timing)
                    per_step = _broadcast(sorted(calibration)[len(calibration) // 2], run.world)
                    run.total = max(run.step + 1, run.step + int((budget - run.seconds) / per_step))
                    run.total = max(run.total, run.warmup + 1)
                    bar.reset(total=run.total)
                    bar.update(run.step)
                    log(f"time budget {budget / 60:.1f} min at {per_step:.2f} s/step: {run.total:,} steps")
            entry = dict(step=run.step, tokens=run.step * tokens_per_step, lr=lr_at(run.step - 1, run.lr, run.warmup,
                                                                                    run.total), train_loss=loss)
            final = run.total is not None and run.step >= run.total
            if run.step % args.eval_every == 0 or final:
                entry["heldout_loss"] = run.heldout_loss()
                if bar.disable:
                    log(f"step {run.step:,}/{run.total or '?'}: loss {loss:.3f}, held-out {entry['heldout_loss']:.3f}, "
                        f"{tokens_per_step / dt:,.0f} tokens/s")
            run.history.append(entry)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
            bar.update(1)
            if run.step - last_save >= args.save_every:
                run.save_state()
                last_save = run.step
    except KeyboardInterrupt:  # a second Ctrl-C, mid-step: the weights may be half updated, keep the last save
        bar.close()
        saved = (f"the last checkpoint (step {last_save:,}) is in {run.ckpt}; continue with the same command and "
                 "--resume") if run.ckpt.exists() else "no checkpoint had been saved yet"
        raise Interrupted(f"stopped at once; {saved}") from None
    finally:
        stop.restore()
    bar.close()
    run.save_state()
    run.export()
    if stop.requested:  # a first Ctrl-C: the step in flight finished, so weights and optimizer agree
        raise Interrupted(f"interrupted at step {run.step:,}; saved a checkpoint in {run.ckpt} and the model so far "
                          f"in {run.out}; continue with the same command and --resume")
    held = next((h["heldout_loss"] for h in reversed(run.history) if h.get("heldout_loss") is not None), float("nan"))
    log(f"done: {run.step:,} steps, {run.step * tokens_per_step:,} tokens in {run.seconds / 60:.1f} min; "
        f"held-out loss {held:.3f} (perplexity {math.exp(held):.2f}); model in {run.out}")
    return TrainResult(run.out, run.step, run.step * tokens_per_step, loss, held, run.seconds, params, run.history)
