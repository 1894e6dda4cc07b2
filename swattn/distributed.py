"""Sequence-parallel sliding-window attention on ``torch.distributed``.

Each rank holds a contiguous slice ``(batch, heads, local_len, head_dim)`` of one sequence,
the slices in rank order (they may differ in length). A local layer (``window`` W) needs,
besides its own keys, only the ``W - 1`` keys before its slice: a **halo**, received point
to point from the rank(s) before it (several when W is longer than a slice), whatever the
sequence's length. The attention over the rank's own keys runs while the halo is in flight;
the two parts are merged exactly through their log-sum-exps. A global layer (``window=None``)
needs every earlier key. Causal attention gives later ranks more pairs of (query block, key
block), so each pair is computed by one of its two ranks, chosen to spread the pairs evenly
(``Layout.computed_by``): near pairs by the later rank, which receives the earlier rank's keys
and values; far ones by the earlier rank, which receives the later rank's queries and sends
back a partial output and log-sum-exp. Everything is merged exactly the same way.

Backward: the gradient of each key set is computed with the merged output and log-sum-exp
(as flash-attention's backward does), and the halo's key/value gradients are sent back to
their owners, so every rank ends with the gradients of its own slice, equal to those of one
process running the whole sequence.

Every rank first exchanges a small description of its call (shape, dtype, window, soft-cap,
scale): a mismatch raises the same clear error on every rank instead of a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from swattn.ops.api import _rows_contiguous, _select_backend, merge_partials
from swattn.ops.validate import check_problem

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


@dataclass(frozen=True)
class Layout:
    """Where every rank's slice lies in the sequence: rank r holds ``[starts[r], starts[r] + lengths[r])``."""

    rank: int
    lengths: tuple[int, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        out, s = [], 0
        for n in self.lengths:
            out.append(s)
            s += n
        return tuple(out)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def end(self) -> int:
        return self.start + self.lengths[self.rank]

    def computed_by(self, i: int, j: int) -> int:
        """Which rank computes the queries of rank ``i`` against the keys of earlier rank ``j`` (global layers).

        Causal attention gives later ranks more key blocks; handing the farthest pairs to the
        earlier rank (a distance past half the ranks; at exactly half, alternately) spreads
        the pairs of blocks evenly: with 4 ranks the busiest does 2.5 block-pairs instead of
        3.5, with 8 ranks 4.5 instead of 7.5.
        """
        d, world = i - j, len(self.lengths)
        if 2 * d < world or (2 * d == world and j % 2 == 0):
            return i
        return j

    def halo_pieces(self, receiver: int, window: int) -> list[tuple[int, int, int]]:
        """What ``receiver`` needs from earlier ranks: ``(sender, first, last)`` local indices (end exclusive) of
        the sender's slice, for the ``window - 1`` positions before the receiver's slice."""
        lo = max(0, self.starts[receiver] - (window - 1))
        pieces = []
        for sender in range(receiver):
            s, e = self.starts[sender], self.starts[sender] + self.lengths[sender]
            a, b = max(s, lo), min(e, self.starts[receiver])
            if a < b:
                pieces.append((sender, a - s, b - s))
        return pieces


def _describe(q, k, v, window, softcap, scale, group, offset: int | None = None) -> Layout:
    """Exchanges every rank's call description; raises the same error on every rank if they disagree."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("swattn.distributed needs an initialised process group: call "
                           "torch.distributed.init_process_group first (torchrun sets its environment)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    problem = check_problem(q, k, v, window, softcap, scale, None, None)
    if problem.q_len != problem.k_len:
        raise ValueError(f"q, k and v must hold the same positions (this rank's slice): q has {problem.q_len}, "
                         f"k {problem.k_len}")
    desc = torch.tensor([problem.q_len, problem.batch, problem.heads, problem.heads_kv, problem.head_dim,
                         -1 if window is None else window, _DTYPE_CODES[q.dtype],
                         round((softcap or 0.0) * 1e6), round(problem.scale * 1e9),
                         -1 if offset is None else offset], dtype=torch.int64)
    gathered = [torch.empty_like(desc) for _ in range(world)]
    dist.all_gather(gathered, desc, group=group)
    names = ("batch", "heads", "heads_kv", "head_dim", "window", "dtype", "softcap", "scale")
    for other_rank, other in enumerate(gathered):
        for i, name in enumerate(names, start=1):
            if other[i] != desc[i]:
                mine, theirs = (desc[i].item(), other[i].item()) if rank < other_rank else (other[i].item(), desc[i].item())
                low, high = sorted((rank, other_rank))
                raise ValueError(f"swattn.distributed: ranks disagree on {name}: rank {low} has {mine}, rank {high} "
                                 f"has {theirs}; every rank must call with the same shapes and options")
    layout = Layout(rank, tuple(int(g[0]) for g in gathered))
    offsets = [int(g[9]) for g in gathered]
    if any(o >= 0 for o in offsets) and offsets != list(layout.starts):
        raise ValueError(f"swattn.distributed: the ranks' slices do not follow each other in rank order: they start "
                         f"at positions {offsets}, their lengths {list(layout.lengths)} put them at "
                         f"{list(layout.starts)}; give rank r the slice after rank r - 1's")
    return layout


_sent = [0]  # bytes this process has sent (forward and backward), for the benchmark


def bytes_sent(reset: bool = False) -> int:
    """Bytes this process has sent through swattn.distributed so far (``reset``: start counting anew)."""
    value = _sent[0]
    if reset:
        _sent[0] = 0
    return value


def _exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], group):
    """Posts point-to-point sends and receives together; gives the requests to wait on."""
    _sent[0] += sum(t.numel() * t.element_size() for _, t in sends)
    ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(group, peer) if group else peer, group)
           for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, peer) if group else peer, group)
            for peer, t in recvs]
    return dist.batch_isend_irecv(ops) if ops else []


@dataclass
class _Foreign:
    """Keys of another rank's slice that this rank attends over: its local indices ``[first, last)``."""

    owner: int
    first: int
    last: int
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


class _KeySets:
    """The key sets one rank's queries attend over: its own keys, then other ranks' pieces.

    ``needs``: pieces of earlier ranks this rank receives; ``gives``: pieces of this rank's
    slice that later ranks receive, as ``(rank, first, last)``. Local layer: the halo (the
    ``window - 1`` positions before the slice). Global layer: the whole slices of the earlier
    ranks whose block pairs this rank computes; ``served``/``delegated``: the pairs computed
    on the keys' side instead (see ``Layout.computed_by``). The receives are posted at once, so they travel while the
    rank attends over its own keys.
    """

    def __init__(self, q, k, v, window, layout: Layout, group):
        self.q, self.k, self.v, self.window, self.layout, self.group = q, k, v, window, layout, group
        world, rank = len(layout.lengths), layout.rank
        lengths = layout.lengths
        self.served: list[tuple[int, torch.Tensor]] = []  # (later rank, its queries) attended here over own keys
        self.delegated: list[int] = []  # earlier ranks that attend this rank's queries over their keys
        if window is None:
            pairs = [(i, j) for i in range(world) for j in range(i) if lengths[i] and lengths[j]]
            self.needs = [_Foreign(j, 0, lengths[j]) for i, j in pairs if i == rank and layout.computed_by(i, j) == i]
            self.gives = [(i, 0, lengths[rank]) for i, j in pairs if j == rank and layout.computed_by(i, j) == i]
            self.served = [(i, q.new_empty(q.shape[0], q.shape[1], lengths[i], q.shape[3]))
                           for i, j in pairs if j == rank and layout.computed_by(i, j) == j]
            self.delegated = [j for i, j in pairs if i == rank and layout.computed_by(i, j) == j]
        else:
            self.needs = [_Foreign(src, a, e) for src, a, e in layout.halo_pieces(rank, window)]
            self.gives = [(dst, a, e) for dst in range(rank + 1, world)
                          for src, a, e in layout.halo_pieces(dst, window) if src == rank]
        b, h, _, d = k.shape
        for f in self.needs:
            f.k, f.v = k.new_empty(b, h, f.last - f.first, d), v.new_empty(b, h, f.last - f.first, d)
        sends = [(dst, t[:, :, a:e]) for dst, a, e in self.gives for t in (k, v)] + [(j, q) for j in self.delegated]
        recvs = [(f.owner, t) for f in self.needs for t in (f.k, f.v)] + self.served
        self._pending = _exchange(sends, recvs, group)

    def positions(self, rank: int) -> torch.Tensor:
        start = self.layout.starts[rank]
        return torch.arange(start, start + self.layout.lengths[rank])

    def sets(self):
        """Yields ``(q_rows, rows, keys, values, q_pos, k_pos)``: own keys first (every row), then each piece."""
        n = self.q.shape[2]
        yield self.q, slice(0, n), self.k, self.v, None, None  # own keys, aligned: the fast path
        for req in self._pending:
            req.wait()
        self._pending = []
        start = self.layout.start
        for f in self.needs:
            rows = n if self.window is None else min(n, self.window - 1)  # only these queries reach back
            k_start = self.layout.starts[f.owner] + f.first
            yield (self.q[:, :, :rows], slice(0, rows), f.k, f.v, torch.arange(start, start + rows),
                   torch.arange(k_start, k_start + f.last - f.first))

    def return_grads(self, grads):
        """Sums this rank's key/value gradients: its own, and those later ranks computed for the pieces they got."""
        (dk, dv), *foreign = grads
        dk, dv = dk.float().clone(), dv.float().clone()
        sends = [(f.owner, g.to(self.k.dtype)) for f, (gk, gv) in zip(self.needs, foreign) for g in (gk, gv)]
        shape = lambda a, e: (*self.k.shape[:2], e - a, self.k.shape[3])  # noqa: E731
        recvs = [(dst, self.k.new_empty(shape(a, e))) for dst, a, e in self.gives for _ in (0, 1)]
        for req in _exchange(sends, recvs, self.group):
            req.wait()
        for i, (_, a, e) in enumerate(self.gives):
            dk[:, :, a:e] += recvs[2 * i][1].float()
            dv[:, :, a:e] += recvs[2 * i + 1][1].float()
        return dk, dv


class _Attention(torch.autograd.Function):
    """The whole distributed call; backward recomputes per key set with the merged out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, window, softcap, scale, group, layout):  # noqa: D102
        impl = _select_backend(None, q)
        parts = _KeySets(q, k, v, window, layout, group)
        out = lse = None
        problems = []
        for q_part, rows, k_set, v_set, q_pos, k_pos in parts.sets():
            q_part = q_part.contiguous()
            p = check_problem(q_part, k_set, v_set, window, softcap, scale, q_pos, k_pos)
            o, l = impl.forward(q_part, _rows_contiguous(k_set), _rows_contiguous(v_set), p)
            problems.append(p)
            if out is None:  # the first set is the rank's own keys: every row
                out, lse = o.float(), l
            else:
                out[:, :, rows], lse[:, :, rows] = merge_partials(out[:, :, rows], lse[:, :, rows], o, l)
        # global layers: attend later ranks' queries over this rank's keys for them, and take the
        # results of earlier ranks that attended this rank's queries over theirs (the load balance)
        sends, served_problems = [], []
        for i, q_i in parts.served:
            p = check_problem(q_i, k, v, None, softcap, scale, parts.positions(i), parts.positions(layout.rank))
            o, l = impl.forward(q_i, k, v, p)
            served_problems.append(p)
            sends += [(i, o.float().contiguous()), (i, l.contiguous())]
        recvs = [(j, t) for j in parts.delegated for t in (torch.empty(out.shape), torch.empty(lse.shape))]
        for req in _exchange(sends, recvs, group):
            req.wait()
        for n in range(0, len(recvs), 2):
            out, lse = merge_partials(out, lse, recvs[n][1], recvs[n + 1][1])
        ctx.save_for_backward(q, out.to(q.dtype), lse)
        ctx.parts, ctx.problems, ctx.served_problems, ctx.impl = parts, problems, served_problems, impl
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # noqa: D102
        q, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32)
        parts = ctx.parts
        # the ranks that attended this rank's queries need its output gradient, output and lse
        shipped = [(j, t) for j in parts.delegated for t in (dout.float(), out.float(), lse)]
        incoming = [(i, [torch.empty(q_i.shape), torch.empty(q_i.shape), torch.empty(q_i.shape[:3])])
                    for i, q_i in parts.served]
        pending = _exchange(shipped, [(i, t) for i, ts in incoming for t in ts], parts.group)
        grads = []
        for (q_part, rows, k_set, v_set, _, _), p in zip(ctx.parts.sets(), ctx.problems):
            dq_p, dk_p, dv_p = ctx.impl.backward(
                q_part.contiguous(), _rows_contiguous(k_set), _rows_contiguous(v_set), out[:, :, rows].contiguous(),
                lse[:, :, rows].contiguous(), dout[:, :, rows].contiguous(), p)
            dq[:, :, rows] += dq_p.float()
            grads.append((dk_p, dv_p))
        dk, dv = parts.return_grads(grads)
        for req in pending:
            req.wait()
        sends = []
        for (i, q_i), (_, (dout_i, out_i, lse_i)), p in zip(parts.served, incoming, ctx.served_problems):
            dq_i, dk_p, dv_p = ctx.impl.backward(q_i, parts.k, parts.v, out_i.to(q.dtype), lse_i,
                                                 dout_i.to(q.dtype), p)
            dk += dk_p.float()
            dv += dv_p.float()
            sends.append((i, dq_i.float().contiguous()))
        recvs = [(j, torch.empty(q.shape)) for j in parts.delegated]
        for req in _exchange(sends, recvs, parts.group):
            req.wait()
        for _, dq_j in recvs:
            dq += dq_j
        ctx.parts = None
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None, None, None, None


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    *,
    softcap: float | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    offset: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window (or causal) attention over a sequence split across the ranks of ``group``.

    Args:
        q: this rank's slice of the queries ``(batch, heads, local_len, head_dim)``; the
            slices of ranks 0, 1, ... follow each other in the sequence (lengths may differ,
            a rank may hold none).
        k, v: this rank's slice of the keys and values ``(batch, heads_kv, local_len, head_dim)``.
        window: as for :func:`swattn.sliding_window_attention` (None: causal attention over every
            earlier slice, the work spread over the ranks).
        softcap, scale: as for :func:`swattn.sliding_window_attention`.
        group: the process group holding the whole sequence (default: the world).
        offset: this slice's first position in the sequence, if known: checked against the
            other ranks' slices (ranks that hold the sequence out of order get an error).
        return_lse: also give the per-row log-sum-exp ``(batch, heads, local_len)``.

    Returns:
        This rank's slice of the output ``(batch, heads, local_len, head_dim)``, equal to the
        same rows of a single-process call on the whole sequence; differentiable in q, k, v.

    Raises:
        RuntimeError: no initialised process group. ValueError/TypeError: bad input, or
        ranks that disagree on shapes or options (the same message on every rank).
    """
    layout = _describe(q, k, v, window, softcap, scale, group, offset)
    q, k, v = q.contiguous(), _rows_contiguous(k), _rows_contiguous(v)
    out, lse = _Attention.apply(q, k, v, window, softcap, scale, group, layout)
    return (out, lse) if return_lse else out


@dataclass(frozen=True)
class TokenBytes:
    """Bytes per token of what the exchanges carry (see :func:`traffic`)."""

    kv: int  # keys and values (and their gradients), in the inputs' dtype
    q: int  # queries, in the inputs' dtype
    out: int  # a partial output and its log-sum-exp (float32)
    grad_in: int  # output gradient, output and log-sum-exp (float32), for the backward of a delegated pair
    dq: int  # a query gradient (float32)

    @classmethod
    def of(cls, heads: int, heads_kv: int, head_dim: int, element_size: int) -> TokenBytes:
        return cls(kv=2 * heads_kv * head_dim * element_size, q=heads * head_dim * element_size,
                   out=heads * head_dim * 4 + heads * 4, grad_in=2 * heads * head_dim * 4 + heads * 4,
                   dq=heads * head_dim * 4)


def traffic(lengths: list[int], window: int | None, rank: int, sizes: TokenBytes) -> tuple[int, int]:
    """Bytes ``rank`` sends in one layer's (forward, backward), from the same plans the exchanges follow."""
    layout = Layout(rank, tuple(lengths))
    n_r = lengths[rank]
    if window is not None:
        sent = sum(e - a for dst in range(rank + 1, len(lengths)) for src, a, e in layout.halo_pieces(dst, window)
                   if src == rank)
        received = sum(e - a for _, a, e in layout.halo_pieces(rank, window))
        return sizes.kv * sent, sizes.kv * received  # backward: the halo's gradients go back to their owners
    fwd = bwd = 0
    for other, n_o in enumerate(lengths):
        if other == rank or not n_o or not n_r:
            continue
        i, j = max(rank, other), min(rank, other)
        by = layout.computed_by(i, j)
        if rank == j and by == i:  # my keys to the later rank; its gradients of them come back (its bytes)
            fwd += sizes.kv * n_r
        elif rank == i and by == i:  # I computed with the earlier rank's keys: their gradients go back
            bwd += sizes.kv * n_o
        elif rank == i and by == j:  # my queries to the earlier rank, then what its backward needs
            fwd += sizes.q * n_r
            bwd += sizes.grad_in * n_r
        else:  # rank == j computes for the later rank: partial results, then its query gradients
            fwd += sizes.out * n_o
            bwd += sizes.dq * n_o
    return fwd, bwd


def ring_attention_bytes(lengths: list[int], sizes: TokenBytes) -> int:
    """Forward bytes a rank sends in ring attention: every key/value block but one passes through it."""
    return sizes.kv * max(lengths) * (len(lengths) - 1)


def init_from_torchrun(timeout_s: float = 600.0) -> bool:
    """Joins the process group when launched by ``torchrun`` with several processes (gloo on CPU, NCCL on GPU).

    Returns whether this process is one of several ranks. The timeout bounds every
    collective, so a rank that dies leaves the others with an error, not a hang.
    """
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        import atexit

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(finish)
    return True


def finish() -> None:
    """Leaves the process group cleanly: waits for every rank, then destroys it.

    A rank that simply exits while another still uses the group (rank 0 saving the model)
    tears down gloo's threads under it: an intermittent "terminate called without an
    active exception" abort at exit. Registered at exit by :func:`init_from_torchrun`.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_slice(n: int, group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """This rank's contiguous share ``[start, end)`` of ``n`` positions split as evenly as possible in rank order."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def all_sum(*values: float) -> list[float]:
    """Sums numbers over the default group's ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


@contextmanager
def sequence_parallel(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Runs ``model``'s attention layers sequence-parallel across ``group`` while the block lasts.

    Each rank calls the model on its contiguous slice of the sequence, with the slice's
    global positions (rotary embeddings and norms are per token and need nothing else)::

        with sequence_parallel(model):
            logits = model(ids[:, start:end], pos=torch.arange(start, end)[None])

    Its logits are those rows of a single-process forward; a loss summed over the slice,
    backpropagated and with the weight gradients all-reduced (summed) over the ranks, gives
    the single-process gradients.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel needs an initialised process group (torch.distributed.init_process_group)")
    layers = [m for m in model.modules() if hasattr(m, "group") and hasattr(m, "window")]
    for layer in layers:
        layer.group = group if group is not None else dist.group.WORLD
    try:
        yield
    finally:
        for layer in layers:
            layer.group = None
