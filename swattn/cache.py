"""KV caches for sliding-window inference: a ring per local layer, a full cache per global one.

A local layer's :class:`RingCache` keeps exactly ``window`` slots per row: the token at
position ``p`` lives in slot ``p % window``, written in place, and every slot remembers its
absolute position. Attention masks by position (the op's ``k_pos``), so the ring is never
rotated, rolled or copied: memory is fixed at ``window`` tokens however long the text, and
a decode step writes one slot. A global layer's :class:`FullCache` keeps every token, at
index = position, in a buffer preallocated to a capacity or grown by doubling.

Each cache's ``attend`` stores the new keys and values and runs attention over what the
layer may see, for a chunk of any size: a single token per row (decode), a chunk smaller
than, equal to or larger than the window (chunked prefill). Rows of a batch carry their
own positions (``-1`` = padding, not stored), so left-padded prompts and rows that stop
early just work. ``save``/``restore`` copy a cache's state, for prefix reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swattn.ops import cpu, linear
from swattn.ops.api import merge_partials, sliding_window_attention
from swattn.ops.validate import check_window

INITIAL_CAPACITY = 256  # a growable FullCache starts here and doubles
# aligned chunks of up to window / SMALL_CHUNK_RATIO tokens attend over a ring in place (two
# parts merged) rather than copying it into time order: measured faster up to 256 of 4096
SMALL_CHUNK_RATIO = 16
# what keys and values may be stored as (kv_dtype); int8 with a float scale per token and head
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


def decode_kernel(q: torch.Tensor) -> bool:
    """Whether a one-token step runs through the compiled decode step (CPU tensors the kernel takes)."""
    return q.device.type == "cpu" and q.dtype in cpu.DTYPES and linear.kernels() and not (
        torch.is_grad_enabled() and q.requires_grad)


def decode_scalars(softcap: float | None, scale: float | None, head_dim: int) -> tuple[float, float]:
    """The compiled decode step's ``softcap`` (0: none) and ``scale`` (None: ``head_dim ** -0.5``)."""
    return 0.0 if softcap is None else float(softcap), head_dim ** -0.5 if scale is None else float(scale)


def decode_call(op, *args) -> torch.Tensor:
    """Runs a compiled decode step (``op(*args)``); positions out of order raise ValueError, in one line."""
    try:
        return op(*args)
    except RuntimeError as exc:
        if "positions must increase" in str(exc):
            raise ValueError(str(exc).splitlines()[0]) from None
        raise


@dataclass(frozen=True)
class CacheState:
    """A saved copy of one layer cache (see ``save``/``restore``)."""

    kind: str
    tensors: tuple[torch.Tensor, ...]
    dense: int | None = None  # the cache's ``dense`` when saved


class _LayerCache:
    """What both caches share: buffers, checks, positions bookkeeping, attention."""

    window: int | None
    # whether a one-token aligned step attends over the keys in time order (the op's aligned
    # path); a ring's decode step instead attends over its slots as they lie, by position
    ALIGNED_DECODE = True
    k: torch.Tensor  # (batch, heads_kv, slots, head_dim)
    v: torch.Tensor
    slot_pos: torch.Tensor  # (batch, slots) int64: position held by each slot, -1 = empty
    last_pos: torch.Tensor  # (batch,) int64: last position stored per row, -1 = none

    def _init_buffers(self, batch: int, heads_kv: int, head_dim: int, slots: int, dtype, device,
                      kv_dtype=None) -> None:
        for name, value in (("batch", batch), ("heads_kv", heads_kv), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        stored = dtype if kv_dtype is None else kv_dtype
        if stored not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(str(d) for d in KV_DTYPES)}, got {stored!r}")
        self.dtype = dtype  # what attend takes and gives; the buffers hold `stored`
        self.k = torch.zeros(batch, heads_kv, slots, head_dim, dtype=stored, device=device)
        self.v = torch.zeros_like(self.k)
        # int8: one float scale per token and head (max|x| / 127)
        self.k_scale = self.v_scale = None
        if stored == torch.int8:
            self.k_scale = torch.zeros(batch, heads_kv, slots, dtype=torch.float32, device=device)
            self.v_scale = torch.zeros_like(self.k_scale)
        self.slot_pos = torch.full((batch, slots), -1, dtype=torch.int64, device=device)
        self.last_pos = torch.full((batch,), -1, dtype=torch.int64, device=device)
        # Host-side bookkeeping: every row holds exactly positions 0 .. dense - 1 (None: not
        # known to). While it holds, chunks that continue it (``aligned``) attend without
        # per-key positions and without reading positions back from the tensors.
        self.dense: int | None = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's buffers."""
        return sum(t.numel() * t.element_size() for t in self._buffers())

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        """k, v, slot_pos, last_pos (and the int8 scales)."""
        scales = () if self.k_scale is None else (self.k_scale, self.v_scale)
        return (self.k, self.v, self.slot_pos, self.last_pos, *scales)

    def _put(self, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes keys and values (compute dtype) at ``index`` of the buffers' first three dimensions."""
        if self.k_scale is None:
            self.k[index], self.v[index] = k.to(self.k.dtype), v.to(self.v.dtype)  # advanced indexing does not cast
            return
        for buf, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            s = x.float().abs().amax(-1) / 127
            buf[index] = torch.round(x.float() / torch.where(s > 0, s, 1.0).unsqueeze(-1)).to(torch.int8)
            scale[index] = s

    def _stored(self, which: str, stop: int | None = None, index: tuple | None = None) -> torch.Tensor:
        """The stored keys (``which="k"``) or values up to slot ``stop`` (or at ``index`` of the
        first three dimensions), in the compute dtype: only what is asked for is converted."""
        index = (slice(None), slice(None), slice(None, stop)) if index is None else index
        buf = (self.k if which == "k" else self.v)[index]
        if self.k_scale is not None:
            scale = (self.k_scale if which == "k" else self.v_scale)[index]
            return (buf.float() * scale.unsqueeze(-1)).to(self.dtype)
        return buf if buf.dtype == self.dtype else buf.to(self.dtype)

    @property
    def nbytes_used(self) -> int:
        """Bytes of the slots holding tokens (a ring: all of it; a full cache: up to the last position stored)."""
        return self.nbytes

    @property
    def seq_len(self) -> torch.Tensor:
        """Tokens seen per row, ``(batch,)``: the last stored position + 1 (0 when empty)."""
        return self.last_pos + 1

    def _check(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, aligned: bool = False,
               order: bool = True) -> torch.Tensor:
        """Checks a chunk against the cache; gives its positions as (batch, chunk) int64.

        ``aligned``: the caller vouches that the positions continue ``dense`` in every row
        (see :meth:`ModelCache.aligned`), so their order is not read back and checked again;
        ``order=False``: the caller checks the order itself (the decode kernel does).
        """
        batch, heads_kv, _, head_dim = self.k.shape
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a (batch, heads_kv, chunk, head_dim) tensor")
            if t.shape[0] != batch or t.shape[1] != heads_kv or t.shape[3] != head_dim:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but this cache holds batch {batch}, heads_kv {heads_kv}, "
                    f"head_dim {head_dim}"
                )
            if t.dtype != self.dtype or t.device != self.k.device:
                raise TypeError(f"{name} is {t.dtype} on {t.device}; the cache is {self.dtype} on {self.k.device}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        chunk = k.shape[2]
        if not isinstance(pos, torch.Tensor) or pos.dtype not in (torch.int64, torch.int32):
            raise TypeError("pos must be an int64 or int32 tensor of positions, (batch, chunk) or (chunk,)")
        if pos.dim() == 1:
            pos = pos.unsqueeze(0).expand(batch, -1)
        if pos.shape != (batch, chunk):
            raise ValueError(f"pos must have shape ({batch}, {chunk}) or ({chunk},), got {tuple(pos.shape)}")
        if pos.dtype != torch.int64 or pos.device != self.k.device:
            pos = pos.to(device=self.k.device, dtype=torch.int64)
        if aligned:
            if self.dense is None:
                raise ValueError("aligned=True needs a cache whose rows hold positions 0 .. dense - 1")
            return pos
        if not order:
            return pos
        # Positions of a row must increase, within the chunk and after what is stored.
        valid = pos >= 0
        if chunk == 1:  # the decode step: just after what is stored
            before = self.last_pos.unsqueeze(1)
        else:
            stamped = torch.where(valid, pos, torch.full_like(pos, -1))
            before = torch.cat([self.last_pos.unsqueeze(1), stamped[:, :-1]], dim=1).cummax(dim=1).values
        bad = valid & (pos <= before)
        if bad.any():
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"positions must increase: row {b} got position {int(pos[b, t])} after position {int(before[b, t])}"
            )
        return pos

    def _store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, slots: torch.Tensor) -> None:
        """Writes the kept tokens of a chunk into their slots (distinct per row by construction)."""
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        slot = slots[b_idx, t_idx]
        self._put((b_idx, slice(None), slot), k[b_idx, :, t_idx], v[b_idx, :, t_idx])
        self.slot_pos[b_idx, slot] = pos[b_idx, t_idx]
        self.last_pos.copy_(torch.maximum(self.last_pos, pos.amax(dim=1)))  # in place: row views share it

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Stores a chunk; gives ``(keys, values, key_positions)`` that the chunk attends over."""
        raise NotImplementedError

    def _update_aligned(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Stores a chunk that continues ``dense``; gives ``(keys, values)`` in time order, the chunk last."""
        raise NotImplementedError

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, *,
        softcap: float | None = None, scale: float | None = None, aligned: bool = False,
    ) -> torch.Tensor:
        """Stores a chunk's keys and values, then gives its attention output.

        Args:
            q: ``(batch, heads, chunk, head_dim)``; k, v: ``(batch, heads_kv, chunk, head_dim)``.
            pos: positions of the chunk's tokens, ``(batch, chunk)`` or ``(chunk,)``; -1 = padding.
            softcap, scale: as for :func:`swattn.sliding_window_attention`.
            aligned: the caller vouches that every row's positions are ``dense, dense + 1, ...``
                (:meth:`ModelCache.aligned` checks it once for all layers): the keys are then
                handed to the op in time order without positions, its fastest path.

        Returns:
            ``(batch, heads, chunk, head_dim)``; padding tokens get zeros.
        """
        if k.shape[2] == 1 and decode_kernel(q):
            return self._decode(q, k, v, pos, softcap, scale, aligned)
        if aligned and self.dense is not None and (k.shape[2] > 1 or self.ALIGNED_DECODE):
            pos = self._check(k, v, pos, aligned=True)
            if self._small_chunk(k.shape[2]):
                return self._attend_small(q, k, v, pos, softcap, scale)
            keys, values = self._update_aligned(k, v, pos)
            self.dense += k.shape[2]
            return sliding_window_attention(q, keys, values, self.window, softcap=softcap, scale=scale)
        start = self.dense
        keys, values, key_pos = self.update(k, v, pos, aligned=aligned and start is not None)
        self.dense = start + k.shape[2] if aligned and start is not None else None
        q_pos = pos if pos.dim() == 2 else pos.unsqueeze(0).expand(q.shape[0], -1)
        return sliding_window_attention(
            q, keys, values, self.window, softcap=softcap, scale=scale, q_pos=q_pos.to(key_pos.device), k_pos=key_pos
        )

    def _small_chunk(self, n: int) -> bool:
        """Whether an aligned chunk of ``n`` tokens takes :meth:`RingCache._attend_small` (rings only)."""
        return False

    def _decode(self, q, k, v, pos, softcap, scale, aligned) -> torch.Tensor:
        """One token per row through the compiled decode step: store, then attend, in one call."""
        args = self.decode_args(self._check(k, v, pos, order=False), aligned)
        out = decode_call(torch.ops.swattn.decode_attention, q.contiguous(), k.contiguous(), v.contiguous(), *args,
                          *decode_scalars(softcap, scale, q.shape[-1]))
        self.decoded(aligned)
        return out

    def decode_args(self, pos: torch.Tensor, aligned: bool) -> tuple:
        """The compiled decode step's cache arguments for one token per row at ``pos`` ``(batch, 1)``
        or ``(batch,)``: buffers, positions, window, kind, slots in use; makes room for the token
        first. The caller runs the step (through :func:`decode_call`), then :meth:`decoded`."""
        pos = pos.reshape(-1)  # (batch,): one token per row
        if pos.dtype != torch.int64 or pos.device != self.k.device:
            pos = pos.to(device=self.k.device, dtype=torch.int64)
        if pos.shape[0] != self.k.shape[0]:
            raise ValueError(f"pos must hold one position per row ({self.k.shape[0]}), got {pos.shape[0]}")
        if isinstance(self, FullCache):
            # the capacity check needs the furthest position: known on the host when aligned
            needed = self.dense + 1 if aligned and self.dense is not None else int(pos.max()) + 1
            self._reserve(needed)
            self._used = max(self._used, needed)
        window = -1 if self.window is None else self.window
        return (self.k, self.v, self.k_scale, self.v_scale, self.slot_pos, self.last_pos, pos, window,
                isinstance(self, RingCache), getattr(self, "_used", 0))

    def decoded(self, aligned: bool) -> None:
        """Bookkeeping after a compiled decode step over :meth:`decode_args`."""
        self.dense = self.dense + 1 if aligned and self.dense is not None else None

    def rows(self, start: int, stop: int) -> _LayerCache:
        """A cache over rows ``start:stop`` whose buffers are views of this one's (writes go through).

        What a server uses: each sequence slot prefills its own prompt through a one-row view,
        and a decode step runs the rows in use through a view of them. The batch cache's own
        bookkeeping then no longer knows its rows are dense (each view keeps its own).
        """
        if not 0 <= start < stop <= self.k.shape[0]:
            raise ValueError(f"rows {start}:{stop} out of range for a cache of {self.k.shape[0]} rows")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        if self.k_scale is not None:
            view.k_scale, view.v_scale = self.k_scale[start:stop], self.v_scale[start:stop]
        view.slot_pos, view.last_pos = self.slot_pos[start:stop], self.last_pos[start:stop]
        self.dense = None
        view.dense = None
        return view

    def row(self, i: int) -> _LayerCache:
        """Row ``i`` alone as a view (see :meth:`rows`)."""
        return self.rows(i, i + 1)

    def clear(self) -> None:
        """Empties the cache in place (every slot free, nothing seen); buffers are kept."""
        self.slot_pos.fill_(-1)
        self.last_pos.fill_(-1)
        self.dense = 0

    def save(self) -> CacheState:
        """Gives a copy of the cache's state (cheap for a ring: window tokens)."""
        return CacheState(type(self).__name__, tuple(t.clone() for t in self._buffers()), self.dense)

    def restore(self, state: CacheState) -> None:
        """Puts the cache back to a saved state of the same kind and shape."""
        if not isinstance(state, CacheState) or state.kind != type(self).__name__:
            raise ValueError(f"cannot restore a {getattr(state, 'kind', type(state).__name__)} state into a {type(self).__name__}")
        k = state.tensors[0]
        if (k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3] or k.dtype != self.k.dtype
                or len(state.tensors) != len(self._buffers())):
            raise ValueError(f"cannot restore a state of shape {tuple(k.shape)} into a cache of shape {tuple(self.k.shape)}")
        self._restore_buffers(state.tensors)  # a kind's own checks of the slot count come first there
        self.dense = state.dense

    def _restore_buffers(self, tensors: tuple[torch.Tensor, ...]) -> None:
        for buf, saved in zip(self._buffers(), tensors):
            buf.copy_(saved)

    def _save_first(self, n: int) -> tuple[torch.Tensor, ...]:
        """Copies of the buffers' first ``n`` slots (and of ``last_pos``)."""
        return tuple(t.clone() if t is self.last_pos else (t[:, :n] if t is self.slot_pos else t[:, :, :n]).clone()
                     for t in self._buffers())

    def _restore_first(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Puts back a :meth:`_save_first` state: its slots first, the rest empty (position -1, zeros)."""
        n = tensors[0].shape[2]
        for buf, saved in zip(self._buffers(), tensors):
            if buf is self.last_pos:
                buf.copy_(saved)
            elif buf is self.slot_pos:
                buf[:, :n].copy_(saved)
                buf[:, n:].fill_(-1)
            else:
                buf[:, :, :n].copy_(saved)
                buf[:, :, n:].zero_()


class RingCache(_LayerCache):
    """Keys and values of one local layer: ``window`` slots per row, position p in slot p % window.

    Args:
        batch, heads_kv, head_dim: the layer's key/value shape.
        window: the layer's window (keys a query sees, itself included).
        dtype, device: of the stored keys and values.
    """

    ALIGNED_DECODE = False  # its decode step writes one slot in place: no copy into time order

    def __init__(self, batch: int, heads_kv: int, head_dim: int, window: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 kv_dtype: torch.dtype | None = None):
        window = check_window(window)
        if window is None:
            raise ValueError("a RingCache needs a window; use FullCache for a global layer")
        self.window = window
        self._init_buffers(batch, heads_kv, head_dim, window, dtype, device, kv_dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, aligned: bool = False):
        """Stores a chunk; gives what it attends over: ``(keys, values, key_positions)``.

        One token per row: written in place first (its slot held position p - window, which
        it cannot see anyway), then the ring itself is returned: no copy. A longer chunk
        attends over the ring's old contents plus its own keys (its first queries need keys
        that its last tokens will overwrite), then only its last ``window`` tokens are kept.
        """
        pos = self._check(k, v, pos, aligned)
        if k.shape[2] == 1:
            self._store_one(k, v, pos[:, 0])
            return self._stored("k"), self._stored("v"), self.slot_pos
        keys = torch.cat([self._stored("k"), k], dim=2)
        values = torch.cat([self._stored("v"), v], dim=2)
        key_pos = torch.cat([self.slot_pos, pos], dim=1)
        keep = (pos >= 0) & (pos > pos.amax(dim=1, keepdim=True) - self.window)
        self._store(k, v, pos, keep, pos % self.window)
        return keys, values, key_pos

    def _small_chunk(self, n: int) -> bool:
        # a chunk much shorter than the window: attend without putting the ring in time order
        return 1 < n and n * SMALL_CHUNK_RATIO <= self.window and self.dense > 0

    def _attend_small(self, q, k, v, pos, softcap, scale) -> torch.Tensor:
        """A short aligned chunk: its queries over the ring's keys as they lie (by position) and over
        its own keys, merged by log-sum-exp, then the chunk stored.

        The time-ordered path copies the whole ring per chunk (rolled, then the chunk appended):
        a 16-token chunk of a long prompt beside decoding streams spent 6 of its 30 ms there
        (4096-slot bf16 ring, 4 kv heads of 256); this reads the ring in place.
        """
        kw = dict(softcap=softcap, scale=scale, return_lse=True)
        old, old_lse = sliding_window_attention(q, self._stored("k"), self._stored("v"), self.window, q_pos=pos,
                                                k_pos=self.slot_pos, **kw)
        own, own_lse = sliding_window_attention(q, k, v, self.window, **kw)
        self._update_aligned_store(k, v, pos)
        self.dense += k.shape[2]
        return merge_partials(old, old_lse, own, own_lse)[0].to(q.dtype)

    def save(self) -> CacheState:
        """Gives a copy of the ring's state: only its first slots while it has not come round yet
        (a 512-token prompt's state in a 4096-slot ring: an eighth of the bytes)."""
        n = int(self.last_pos.max()) + 1  # positions < window sit in slots 0 .. n - 1
        if n >= self.window:
            return super().save()
        return CacheState("RingCache", self._save_first(n), self.dense)

    def _restore_buffers(self, tensors: tuple[torch.Tensor, ...]) -> None:
        slots = tensors[0].shape[2]
        if slots == self.k.shape[2]:
            return super()._restore_buffers(tensors)
        _, _, _, last_pos, *_ = tensors
        # only a ring saved before it came round may be shorter: positions 0 .. n - 1 in its first n slots
        if slots > self.k.shape[2] or int(last_pos.max()) >= slots:
            raise ValueError(f"cannot restore a ring of {slots} slots into a ring of {self.k.shape[2]}")
        self._restore_first(tensors)

    def _update_aligned(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """The ring's tokens in time order, then the chunk's: slot p % window holds position p,
        so the ring read from slot ``dense % window`` onwards and round is positions
        ``dense - window .. dense - 1`` (or slots ``0 .. dense - 1`` before it has filled)."""
        start, window = self.dense, self.window
        if start <= window:
            older_k, older_v = self._stored("k", start), self._stored("v", start)
        else:
            r = start % window
            ring_k, ring_v = self._stored("k"), self._stored("v")
            older_k = torch.cat([ring_k[:, :, r:], ring_k[:, :, :r]], dim=2)
            older_v = torch.cat([ring_v[:, :, r:], ring_v[:, :, :r]], dim=2)
        keys, values = torch.cat([older_k, k], dim=2), torch.cat([older_v, v], dim=2)
        self._update_aligned_store(k, v, pos)
        return keys, values

    def _update_aligned_store(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Stores an aligned chunk after the ring's ``dense`` tokens: its last ``window`` tokens, at slot p % window."""
        start, window, chunk = self.dense, self.window, k.shape[2]
        kept = min(chunk, window)
        first = start + chunk - kept
        slots = torch.arange(first, first + kept, device=self.k.device) % window
        self._put((slice(None), slice(None), slots), k[:, :, chunk - kept:], v[:, :, chunk - kept:])
        self.slot_pos[:, slots] = pos[:, chunk - kept:]
        self.last_pos.fill_(start + chunk - 1)

    def _store_one(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """The decode step: one indexed write per buffer, no host synchronisation, padding rows kept as they were.

        Advanced-index writes touch only the new slots; ``scatter_`` was measured copying the
        whole buffer on CPU (44 ms for an 8 x 4 x 4096 x 256 bf16 ring, against 0.01 ms).
        """
        batch = self.k.shape[0]
        valid = pos >= 0
        rows = torch.arange(batch, device=pos.device)
        slot = pos.clamp_min(0) % self.window
        keep_old = ~valid.view(batch, 1, 1)
        index = (rows, slice(None), slot)
        old_k, old_v = self._stored("k", index=index), self._stored("v", index=index)
        self._put(index, torch.where(keep_old, old_k, k[:, :, 0]), torch.where(keep_old, old_v, v[:, :, 0]))
        self.slot_pos[rows, slot] = torch.where(valid, pos, self.slot_pos[rows, slot])
        self.last_pos.copy_(torch.where(valid, pos, self.last_pos))


class FullCache(_LayerCache):
    """Keys and values of one global layer: the token at position p at index p.

    Args:
        batch, heads_kv, head_dim: the layer's key/value shape.
        capacity: positions to preallocate (static shapes for fast decode); going past it is
            an error. None: start small and grow by doubling.
        dtype, device: of the stored keys and values.
        window: None for a global layer; a local layer's window keeps every token but
            attends over the window (what a cache without rings does: the demo's comparison).
    """

    def __init__(self, batch: int, heads_kv: int, head_dim: int, capacity: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", window: int | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.window = check_window(window)  # a local layer's window over every token kept (for comparisons)
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be an int >= 1 or None, got {capacity!r}")
        self.capacity = capacity
        self._init_buffers(batch, heads_kv, head_dim, capacity or INITIAL_CAPACITY, dtype, device, kv_dtype)
        self._used = 0  # 1 + the largest position stored in any row

    def _reserve(self, needed: int) -> None:
        slots = self.k.shape[2]
        if needed <= slots:
            return
        if self.capacity is not None:
            raise ValueError(
                f"FullCache capacity exceeded: position {needed - 1} does not fit in capacity {self.capacity}; "
                "create the cache with a larger capacity (or capacity=None to grow)"
            )
        while slots < needed:
            slots *= 2
        grow = lambda t: torch.cat([t, t.new_zeros((*t.shape[:2], slots - t.shape[2], *t.shape[3:]))], dim=2)  # noqa: E731
        self.k, self.v = grow(self.k), grow(self.v)
        if self.k_scale is not None:
            self.k_scale, self.v_scale = grow(self.k_scale), grow(self.v_scale)
        pad = self.slot_pos.new_full((self.slot_pos.shape[0], slots - self.slot_pos.shape[1]), -1)
        self.slot_pos = torch.cat([self.slot_pos, pad], dim=1)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, aligned: bool = False):
        """Stores a chunk at index = position; gives the stored keys so far (the chunk's included)."""
        pos = self._check(k, v, pos, aligned)
        if aligned:  # known on the host: no read back
            needed = self.dense + k.shape[2]
            self._reserve(needed)
            self._write_aligned(k, v, pos)
            self._used = max(self._used, needed)
            return self._stored("k", self._used), self._stored("v", self._used), self.slot_pos[:, : self._used]
        needed = int(pos.max()) + 1  # one host sync: the capacity check needs the value
        self._reserve(needed)
        self._store(k, v, pos, pos >= 0, pos.clamp_min(0))
        self._used = max(self._used, needed)
        return self._stored("k", self._used), self._stored("v", self._used), self.slot_pos[:, : self._used]

    def rows(self, start: int, stop: int) -> FullCache:
        if self.capacity is None:
            raise ValueError("row views need a FullCache of fixed capacity (a growing one reallocates its buffers)")
        view = super().rows(start, stop)
        view._used = self._used  # until the view is cleared for a new sequence
        return view

    def clear(self) -> None:
        super().clear()
        self._used = 0

    def _write_aligned(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        start, chunk = self.dense, k.shape[2]
        self._put((slice(None), slice(None), slice(start, start + chunk)), k, v)
        self.slot_pos[:, start : start + chunk] = pos
        self.last_pos.fill_(start + chunk - 1)

    def _update_aligned(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Writes the chunk at index = position; the keys up to its end are in time order."""
        needed = self.dense + k.shape[2]
        self._reserve(needed)
        self._write_aligned(k, v, pos)
        self._used = max(self._used, needed)
        return self._stored("k", needed), self._stored("v", needed)

    @property
    def nbytes_used(self) -> int:
        """Bytes of the positions stored so far (the buffer may be preallocated beyond them)."""
        scales = 0 if self.k_scale is None else self.k_scale[:, :, :1].numel() * 4 * 2
        per_slot = (self.k[:, :, :1].numel() * self.k.element_size() * 2 + scales + self.slot_pos.shape[0] * 8)
        return per_slot * self._used

    def _restore_buffers(self, tensors: tuple[torch.Tensor, ...]) -> None:
        n = tensors[0].shape[2]
        if n > self.k.shape[2]:
            self._reserve(n)
        self._restore_first(tensors)
        self._used = int(self.last_pos.max()) + 1

    def save(self) -> CacheState:
        """Gives a copy of the stored part of the cache."""
        return CacheState("FullCache", self._save_first(self._used), self.dense)


class ModelCache:
    """One cache per layer, the kind each layer's attention type asks for.

    Args:
        windows: per layer, its window (a :class:`RingCache`) or None (a :class:`FullCache`).
        batch, heads_kv, head_dim, dtype, device: as for the layer caches.
        capacity: for the global layers (None: grow by doubling).
        rings: False keeps every token in local layers too (full caches attending over their
            window): the memory a cache without rings needs, for comparisons.
    """

    def __init__(self, windows: Sequence[int | None], batch: int, heads_kv: int, head_dim: int, *,
                 capacity: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", rings: bool = True, kv_dtype: torch.dtype | None = None):
        self.layers: list[_LayerCache] = [
            RingCache(batch, heads_kv, head_dim, w, dtype=dtype, device=device, kv_dtype=kv_dtype)
            if w is not None and rings
            else FullCache(batch, heads_kv, head_dim, capacity, dtype=dtype, device=device, window=w, kv_dtype=kv_dtype)
            for w in windows
        ]

    def __getitem__(self, i: int) -> _LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' buffers."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def nbytes_used(self) -> int:
        """Bytes of all layers' slots that hold tokens (global layers: what is stored, not what is preallocated)."""
        return sum(layer.nbytes_used for layer in self.layers)

    @property
    def seq_len(self) -> torch.Tensor:
        """Tokens seen per row, ``(batch,)``, read from the first layer (all layers see the same tokens)."""
        return self.layers[0].seq_len

    def rows(self, start: int, stop: int) -> ModelCache:
        """Rows ``start:stop`` of every layer as a :class:`ModelCache` of views (see ``_LayerCache.rows``)."""
        view = object.__new__(ModelCache)
        view.layers = [layer.rows(start, stop) for layer in self.layers]
        return view

    def row(self, i: int) -> ModelCache:
        """Row ``i`` of every layer as a batch-1 :class:`ModelCache` of views."""
        return self.rows(i, i + 1)

    def clear(self) -> None:
        """Empties every layer in place."""
        for layer in self.layers:
            layer.clear()

    def forget_extent(self) -> None:
        """Lets the global layers' visible extent shrink to the next chunk's furthest position.

        A batch whose rows are reused for new sequences (a server's slots) would otherwise keep
        attending up to the furthest position any earlier sequence reached.
        """
        for layer in self.layers:
            if isinstance(layer, FullCache):
                layer._used = 0

    def aligned(self, pos: torch.Tensor) -> bool:
        """Whether every row's positions ``pos`` ``(batch, chunk)`` continue what every layer holds densely.

        One host read for all layers (they see the same positions); when True, each layer's
        ``attend(..., aligned=True)`` takes the op's fastest path and reads nothing back.
        """
        start = self.layers[0].dense
        if start is None or any(layer.dense != start for layer in self.layers):
            return False
        if pos.dim() != 2 or pos.shape[0] != self.layers[0].k.shape[0]:
            return False
        expected = torch.arange(start, start + pos.shape[1], device=pos.device, dtype=pos.dtype)
        return bool((pos == expected).all())

    def save(self) -> tuple[CacheState, ...]:
        """Gives a copy of every layer's state, for prefix reuse."""
        return tuple(layer.save() for layer in self.layers)

    def restore(self, state: Sequence[CacheState]) -> None:
        """Puts every layer back to a saved state of the same model shape."""
        if len(state) != len(self.layers):
            raise ValueError(f"cannot restore a state of {len(state)} layers into a cache of {len(self.layers)}")
        for layer, s in zip(self.layers, state):
            layer.restore(s)
