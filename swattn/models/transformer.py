"""The Gemma 2 / Gemma 3 / Mistral family in one file: norm, rotary, attention, MLP, block, model.

What differs between the families is data in :class:`ModelConfig` (per-layer windows,
soft-caps, norm style, q/k norms, rotary bases), not branches on the family's name.
Module names follow the Hugging Face checkpoints, so a state dict loads as it is.
At inference on the CPU kernels, a decode step runs each layer as one compiled call
(``swattn::decode_block``) that calls the same kernels as :meth:`Block.forward`, in its order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from swattn import dtypes
from swattn.cache import ModelCache, decode_call, decode_kernel, decode_scalars
from swattn.models.config import ModelConfig, Rope
from swattn.models.layers import Linear, PrepackedLinear, QuantEmbedding, QuantLinear
from swattn.ops import cpu, linear
from swattn.ops.api import sliding_window_attention


# Projections that read the same input and may run as one product at inference: per block part,
# the merged layer's name and the layers it stands for, in the order of its output features
FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}
MERGED_PARTS = dict(FUSED.values())  # merged layer's name -> the layers it stands for
# Decode steps run each layer as one compiled call where they can (Block._compiled_decode); off:
# the same kernels called from Python, one by one (the definition the tests compare it with)
COMPILED_DECODE = True


def projection_groups(model: nn.Module) -> Iterator[tuple[nn.Module, str, tuple[str, ...]]]:
    """``(owner, merged name, part names)`` for each block's q/k/v and gate/up projections still held apart."""
    for block in getattr(model, "layers", ()):  # (prepacking also takes modules that are no CausalLM)
        for part, (merged, names) in FUSED.items():
            owner = getattr(block, part, None)
            if getattr(owner, merged, None) is None and all(hasattr(owner, n) for n in names):
                yield owner, merged, names


@functools.lru_cache(maxsize=8)
def _in_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype``, as a Python number (Gemma casts the embedding scale to the
    activations' dtype first: 48.0 exactly in bf16; a number multiplies as that tensor would)."""
    return float(torch.tensor(value, dtype=dtype))


def _row_kernel(x: torch.Tensor, limit: int | None = linear.SMALL_ROWS) -> bool:
    """Whether the compiled row-wise ops take ``x`` (inference only): up to ``limit`` tokens (None: any)."""
    tokens = x.shape[0] * x.shape[-2] if x.dim() == 4 else x.numel() // x.shape[-1]  # (batch, heads, seq, dim)
    return ((limit is None or tokens <= limit) and x.device.type == "cpu" and x.dtype in cpu.DTYPES
            and x.stride(-1) == 1 and not (torch.is_grad_enabled() and x.requires_grad) and linear.kernels())


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; Gemma's gain is ``1 + w`` (weights start at 0), Mistral's ``w``."""

    def __init__(self, dim: int, eps: float, plus_one: bool):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At inference, any number of rows: one pass in fp32 (a decode step's few rows: one
        # call instead of a dozen; a prefill chunk of 4096 x 2304 bf16: 0.6 against 24 ms)
        if _row_kernel(x, limit=None):
            return torch.ops.swattn.rms_norm(x.contiguous(), self.weight, self.eps, self.plus_one)
        xf = x.float()
        # mean(x^2) from the norm: one read of x instead of writing x^2 out and reading it back
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
        y = xf * torch.rsqrt(ms + self.eps)
        if self.plus_one:
            return y.mul_(1.0 + self.weight.float()).to(x.dtype)
        return self.weight * y.to(x.dtype)  # Llama/Mistral order: cast, then the gain


def rotary(pos: torch.Tensor, head_dim: int, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary embedding for positions ``(batch, seq)``: ``(batch, 1, seq, head_dim)`` fp32."""
    angles = pos.float()[:, None, :, None] * _frequencies(head_dim, rope, pos.device)
    return angles.cos(), angles.sin()


@functools.lru_cache(maxsize=32)
def _frequencies(head_dim: int, rope: Rope, device: torch.device) -> torch.Tensor:
    """Each lane's angle per position ``(head_dim,)`` fp32, both halves (the same each step: built once)."""
    with torch.inference_mode(False):  # an ordinary tensor, whatever mode the first caller runs in
        inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        half = inv_freq / rope.linear_factor
        return torch.cat([half, half]).to(device)


def rotations(pos: torch.Tensor, cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos, sin for local and global layers (one computation where their rotary settings agree)."""
    local = rotary(pos, cfg.head_dim, cfg.rope_local)
    same = cfg.rope_global == cfg.rope_local
    return {"local": local, "global": local if same else rotary(pos, cfg.head_dim, cfg.rope_global)}


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` ``(batch, heads, seq, head_dim)`` in the split-half ("rotate_half") layout.

    ``x * cos + rotate_half(x) * sin``, written into a contiguous result (the layout the
    attention op takes, so it need not copy) without building ``rotate_half(x)``.
    """
    if _row_kernel(x):
        return torch.ops.swattn.rotary(x, cos, sin)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    if torch.is_grad_enabled() and x.requires_grad:  # out= has no autograd: the plain formula
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x2, sin[..., :half], value=-1)
    out[..., half:].addcmul_(x1, sin[..., half:])
    return out


@dataclass
class PackedLayer:
    """Several sequences' tokens in one pass, as one layer sees them (see :meth:`CausalLM.forward_packed`).

    Part ``i`` is ``shapes[i] = (rows, length)`` tokens flattened row by row, with its own
    layer cache ``caches[i]``, positions ``positions[i]`` ``(rows, length)`` and whether
    they continue that cache densely (``aligned[i]``).
    """

    shapes: list[tuple[int, int]]
    caches: list
    positions: list[torch.Tensor]
    aligned: list[bool]


class Attention(nn.Module):
    """Grouped-query attention with a window (local) or without (global), through swattn's op."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        self.cfg, self.window = cfg, window
        self.group = None  # a process group: the sequence is split across its ranks (swattn.distributed)
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, h * d)
        self.k_proj = Linear(cfg.hidden_size, hkv * d)
        self.v_proj = Linear(cfg.hidden_size, hkv * d)
        self.o_proj = Linear(h * d, cfg.hidden_size)
        self.qkv_proj = None  # q, k and v in one product (see swattn.models.quantize.fuse_projections)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.gemma_norms)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.gemma_norms)

    def forward(self, x, pos, cos, sin, cache=None, aligned=False):
        """``x`` ``(batch, seq, hidden)``; ``pos`` ``(batch, seq)``, or None for 0..seq-1 without a cache;
        ``aligned``: the positions continue what ``cache`` holds densely (see ``ModelCache.aligned``)."""
        batch, seq, _ = x.shape
        cfg = self.cfg
        if self.qkv_proj is not None:
            kv = cfg.num_kv_heads * cfg.head_dim
            q, k, v = self.qkv_proj(x).split([cfg.num_heads * cfg.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(batch, seq, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:  # Gemma 3: before the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        kw = dict(softcap=cfg.attn_softcap, scale=cfg.scale)
        if self.group is not None:  # this rank holds a contiguous slice; rotary already used global positions
            if cache is not None:
                raise ValueError("sequence-parallel layers take no cache")
            if pos is None:
                raise ValueError("under sequence_parallel, give the model this rank's global positions (pos=)")
            from swattn import distributed

            out = distributed.sliding_window_attention(q, k, v, self.window, group=self.group,
                                                       offset=int(pos[0, 0]), **kw)
        elif isinstance(cache, PackedLayer):
            out = self._packed(q, k, v, cache, kw)
        elif cache is None:
            out = sliding_window_attention(q, k, v, self.window, q_pos=pos, k_pos=pos, **kw)
        else:
            out = cache.attend(q, k, v, pos, aligned=aligned, **kw)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


    @staticmethod
    def _packed(q, k, v, packed: PackedLayer, kw) -> torch.Tensor:
        """Attention of each part over its own cache; ``q`` ``(1, heads, tokens, head_dim)``, parts in order."""
        outs, start = [], 0
        for (rows, length), cache, pos, aligned in zip(packed.shapes, packed.caches, packed.positions, packed.aligned):
            n = rows * length

            def part(t):  # (1, h, tokens, d) -> this part's (rows, h, length, d)
                return t[0, :, start : start + n].reshape(t.shape[1], rows, length, t.shape[3]).transpose(0, 1)

            out = cache.attend(part(q).contiguous(), part(k).contiguous(), part(v).contiguous(), pos,
                               aligned=aligned, **kw)
            outs.append(out.transpose(0, 1).reshape(q.shape[1], n, q.shape[3]))
            start += n
        return torch.cat(outs, dim=1).unsqueeze(0)


class MLP(nn.Module):
    """Gated MLP: GeGLU (tanh GELU) for Gemma, SwiGLU for Mistral.

    Long inputs go through in chunks of ``CHUNK`` tokens: the (tokens x intermediate)
    activations are the largest tensors of a long prefill, and need not exist all at once. At
    inference the chunks are smaller, since the products run faster while their output stays in
    the last-level cache (2304 x 9216 bf16 on 2 Zen 5 cores: 971 GFLOP/s at 512 or 1024 rows,
    865 at 2048); training keeps long chunks, as each chunk adds a weight-gradient product.
    Quantized weights are dequantized once for all of an input's chunks, not once per chunk (a
    4096-token prefill with q4 weights, 2 layers: 5.3 s dequantizing per 512-token chunk), so a
    long input holds one layer's MLP weights dense while it runs.
    """

    CHUNK = 2048
    INFERENCE_CHUNK = 512

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)
        self.gate_up_proj = None  # gate and up in one product (see swattn.models.quantize.fuse_projections)
        self.silu = cfg.activation == "silu"

    def forward(self, x):
        training = torch.is_grad_enabled() and x.requires_grad
        chunk = self.CHUNK if training else self.INFERENCE_CHUNK
        if x.shape[1] <= chunk:
            return self._forward(x, self._modules)
        # quantized weights are dequantized once for all the chunks, not once per chunk
        proj = self._projections(like=None if training else x)
        return torch.cat([self._forward(part, proj) for part in x.split(chunk, dim=1)], dim=1)

    def _projections(self, like: torch.Tensor | None = None) -> dict:
        """The projections by name; with ``like``, quantized ones dequantized to its dtype (the
        layer's dense weights, held until the caller drops them)."""
        if like is None:
            return self._modules
        return {name: p.expanded(like) if isinstance(p, QuantLinear) else p for name, p in self._modules.items()}

    def _forward(self, x, proj):
        """``proj``: the projections by name (the modules, or :meth:`_projections`' dequantized ones)."""
        if proj.get("gate_up_proj") is not None:
            gate, up = proj["gate_up_proj"](x).chunk(2, dim=-1)
        else:
            gate, up = proj["gate_proj"](x), proj["up_proj"](x)
        down = proj["down_proj"]
        if torch.is_grad_enabled() and x.requires_grad:
            act = F.silu(gate) if self.silu else F.gelu(gate, approximate="tanh")
            return down(act * up)
        # inference: activation and product in the gate's buffer, not two more (tokens x
        # intermediate) tensors, each a fresh mmap that the kernel must fault in and zero;
        # GeGLU on the compiled kernel in one pass (2048 x 9216 bf16: 4.3 against 14.5 ms)
        if not self.silu and _row_kernel(gate, limit=None) and up.stride(-1) == 1:
            return down(torch.ops.swattn.gelu_tanh_mul_(gate, up))
        if self.silu:
            torch.ops.aten.silu_(gate)
        else:
            torch.ops.aten.gelu_(gate, approximate="tanh")
        return down(gate.mul_(up))


class Block(nn.Module):
    """One decoder layer. Gemma: four norms (around attention and MLP); Mistral: two (before each)."""

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)  # noqa: E731
        self.self_attn = Attention(cfg, window)
        self.mlp = MLP(cfg)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()  # Mistral: the norm before the MLP
        if cfg.gemma_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.gemma = cfg.gemma_norms

    def forward(self, x, pos, cos, sin, cache=None, aligned=False, compiled=False):
        """``compiled``: a decode step (one token per row, a layer cache) the caller found the
        compiled step can run (:meth:`CausalLM.features`); it runs there unless a projection
        cannot."""
        if compiled:
            out = self._compiled_decode(x, pos, cos, sin, cache, aligned)
            if out is not None:
                return out
        attn = self.self_attn(self.input_layernorm(x), pos, cos, sin, cache, aligned)
        if self.gemma:
            h = x + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))

    def _compiled_decode(self, x, pos, cos, sin, cache, aligned) -> torch.Tensor | None:
        """This layer's decode step in one compiled call (``swattn::decode_block``: the kernels
        :meth:`forward` runs, in its order, without the Python around them); None where a
        projection has no few-row kernel description (the caller runs :meth:`forward`)."""
        attn, mlp = self.self_attn, self.mlp
        cfg = attn.cfg
        qkv = (attn.qkv_proj,) if attn.qkv_proj is not None else (attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = (mlp.gate_up_proj,) if mlp.gate_up_proj is not None else (mlp.gate_proj, mlp.up_proj)
        weights, kinds, features = [], [], []
        rows = x.shape[0]
        for proj in (*qkv, attn.o_proj, *gate_up, mlp.down_proj):
            plan = proj.row_product(rows, x) if hasattr(proj, "row_product") else None
            if plan is None:
                return None
            kinds.append(plan[0])
            weights += plan[1:3]
            features.append(plan[3])
        norms = [self.input_layernorm.weight, self.post_attention_layernorm.weight]
        if self.gemma:
            norms += [self.pre_feedforward_layernorm.weight, self.post_feedforward_layernorm.weight]
        if cfg.qk_norm:
            norms += [attn.q_norm.weight, attn.k_norm.weight]
        out = decode_call(torch.ops.swattn.decode_block, x, norms, weights, kinds, features, len(qkv), len(gate_up),
                          cos, sin, *cache.decode_args(pos, aligned),
                          *decode_scalars(cfg.attn_softcap, cfg.scale, cfg.head_dim), cfg.num_heads,
                          cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, self.gemma, cfg.qk_norm, mlp.silu)
        cache.decoded(aligned)
        return out


class CausalLM(nn.Module):
    """The whole model: embeddings, layers (each local or global), final norm, LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, w) for w in cfg.windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.weights = None  # "q8" / "q4" once quantized (swattn.models.quantize)
        self.kv_dtype = None  # caches' storage dtype by default (None: the model's dtype)

    def set_local_window(self, window: int | None) -> None:
        """Replaces every local layer's window by ``window`` (global layers stay global).

        What quality costs at another window (``swattn perplexity --window``), or training
        with a shorter one. ``None`` makes the local layers global.
        """
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        if not hasattr(self, "_own_windows"):
            self._own_windows = self.cfg.windows
        windows = tuple(None if w is None else window for w in self._own_windows)
        self.cfg = replace(self.cfg, windows=windows)
        for layer, w in zip(self.layers, windows):
            layer.self_attn.window, layer.self_attn.cfg = w, self.cfg

    def new_cache(self, batch: int, capacity: int | None = None, rings: bool = True,
                  kv_dtype: torch.dtype | str | None = None) -> ModelCache:
        """Gives empty caches for this model: a ring per local layer, a full cache per global one.

        ``rings=False`` keeps every token in the local layers too (for comparisons).
        ``kv_dtype``: what keys and values are stored as (fp32, bf16, fp16, int8; default the
        model's ``kv_dtype`` attribute, set by ``swattn.load(kv_dtype=)``, else its dtype).
        """
        kv = dtypes.kv_dtype(kv_dtype if kv_dtype is not None else self.kv_dtype)
        return ModelCache(self.cfg.windows, batch, self.cfg.num_kv_heads, self.cfg.head_dim, capacity=capacity,
                          dtype=self.dtype, device=self.device, rings=rings, kv_dtype=kv)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the dense weights' too)."""
        emb = self.embed_tokens
        return emb.dtype if isinstance(emb, QuantEmbedding) else emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, ids: torch.Tensor, pos: torch.Tensor | None = None, cache: ModelCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Gives next-token logits.

        Args:
            ids: token ids ``(batch, seq)``.
            pos: absolute positions ``(batch, seq)``, -1 for padding; default ``0..seq-1``
                (or continuing after what ``cache`` holds is the caller's to say).
            cache: from :meth:`new_cache`, for incremental use (chunked prefill, decoding).
            last_only: only the last position's logits (what generation needs; with a
                256k vocabulary, all positions' logits of a long prompt would not fit).

        Returns:
            logits ``(batch, seq, vocab_size)`` (``(batch, 1, vocab_size)`` with ``last_only``)
            in the model's dtype.
        """
        return self.logits(self.features(ids, pos, cache, last_only))

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head's dense matrix ``(vocab_size, hidden_size)`` (the embedding where tied)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head, QuantLinear):
            raise ValueError("this model's head is quantized; training and dense-head uses need dense weights")
        if isinstance(head, PrepackedLinear):
            raise ValueError("this model's head is prepacked for inference; load it with prepack=False (or call "
                             "swattn.models.prepack.unpack(model)) for training and dense-head uses")
        return head.weight

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states ``x`` ``(..., hidden)``: the head and Gemma's final soft-cap."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head, QuantEmbedding):
            logits = head.project(x)
        elif isinstance(head, (QuantLinear, PrepackedLinear)):
            logits = head(x)
        else:
            logits = linear.dense(x, head.weight)
        if self.cfg.final_softcap is not None:
            logits = self.cfg.final_softcap * torch.tanh(logits / self.cfg.final_softcap)
        return logits

    def forward_packed(self, parts: list[tuple[torch.Tensor, torch.Tensor, ModelCache]]) -> list[torch.Tensor]:
        """Several sequences' chunks in one pass over the weights; each attends over its own cache.

        What a server's step runs: the decoding rows (one token each, through a view of their
        rows) and prompt chunks of other sequences (through their own one-row views) share
        every linear layer's read of the weights; only attention is per part.

        Args:
            parts: ``(ids, pos, cache)`` per part: ids and positions ``(rows, length)``, the
                part's :class:`ModelCache` (``rows`` rows).

        Returns:
            per part, the logits of each row's last position, ``(rows, vocab_size)``.
        """
        if self.layers and self.layers[0].self_attn.group is not None:
            raise ValueError("forward_packed does not run under sequence_parallel")
        if len(parts) == 1 and parts[0][0].dim() == 2 and parts[0][0].shape[1] == 1:
            # a step of decoding rows alone (a server's usual step): the same computation row by
            # row as the packed pass, through forward, whose layers run compiled where they can
            ids, pos, cache = parts[0]
            return [self.forward(ids, pos, cache, last_only=True)[:, -1]]
        cfg = self.cfg
        ids = torch.cat([i.reshape(1, -1) for i, _, _ in parts], dim=1)
        pos = torch.cat([p.reshape(1, -1) for _, p, _ in parts], dim=1)
        x = self._embed(ids)
        tables = rotations(pos, cfg)
        shapes = [tuple(i.shape) for i, _, _ in parts]
        positions = [p for _, p, _ in parts]
        aligned = [c.aligned(p) for _, p, c in parts]
        for li, layer in enumerate(self.layers):
            cos, sin = tables["local" if cfg.windows[li] is not None else "global"]
            packed = PackedLayer(shapes, [c[li] for _, _, c in parts], positions, aligned)
            x = layer(x, pos, cos, sin, packed)
        last, start = [], 0
        for rows, length in shapes:
            last += [start + r * length + length - 1 for r in range(rows)]
            start += rows * length
        logits = self.logits(self.norm(x[0, last]))
        return list(logits.split([rows for rows, _ in shapes]))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of ``ids`` ``(batch, seq)``: ``(batch, seq, hidden)``, times Gemma's scale."""
        x = self.embed_tokens(ids)
        if self.cfg.gemma_norms:  # in place: the lookup's own fresh tensor (a mul by a scalar needs no saved input)
            x = x.mul_(_in_dtype(self.cfg.embed_scale, x.dtype))
        return x

    def features(self, ids: torch.Tensor, pos: torch.Tensor | None = None, cache: ModelCache | None = None,
                 last_only: bool = False) -> torch.Tensor:
        """Final hidden states (after the last norm) ``(batch, seq, hidden)``; arguments as :meth:`forward`."""
        # Default positions without a cache: the op's aligned path (its block plan skips whole
        # tiles outside the window; per-key positional masks are only needed otherwise).
        attn_pos = pos
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            if cache is not None:  # the cache stores by position
                attn_pos = pos
        cfg = self.cfg
        x = self._embed(ids)
        tables = rotations(pos, cfg)
        # one host read for all layers: do the positions continue what the caches hold densely?
        aligned = cache is not None and cache.aligned(attn_pos)
        compiled = cache is not None and self._compiled_decode(x)
        for i, layer in enumerate(self.layers):
            cos, sin = tables["local" if cfg.windows[i] is not None else "global"]
            x = layer(x, attn_pos, cos, sin, None if cache is None else cache[i], aligned, compiled)
        return self.norm(x[:, -1:] if last_only else x)

    def _compiled_decode(self, x: torch.Tensor) -> bool:
        """Whether a step over hidden states ``x`` ``(batch, seq, hidden)`` with a cache runs each
        layer as one compiled call (:meth:`Block._compiled_decode`): one token per row, at most
        the quantized kernels' rows, on the CPU kernels, at inference, no sequence parallelism."""
        return (COMPILED_DECODE and x.shape[1] == 1 and x.shape[0] <= linear.SMALL_ROWS and decode_kernel(x)
                and all(layer.self_attn.group is None for layer in self.layers))
