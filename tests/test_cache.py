"""Caches: decoding and chunked prefill through them equal one full pass with the window mask."""

import random

import pytest
import torch

import swattn
from swattn.cache import CacheState, FullCache, ModelCache, RingCache
from swattn.models.config import layer_windows

W = 7
HEADS, HEADS_KV, DIM = 4, 2, 16


def text(batch=2, length=5 * W + 3, pad=(0, 4)):
    """Random q, k, v for a text, and per-row positions with left padding (-1)."""
    q = torch.randn(batch, HEADS, length, DIM)
    k = torch.randn(batch, HEADS_KV, length, DIM)
    v = torch.randn(batch, HEADS_KV, length, DIM)
    pos = torch.arange(length).repeat(batch, 1)
    for row, p in enumerate(pad):
        pos[row] -= p
        pos[row, :p] = -1
    return q, k, v, pos


def full_pass(q, k, v, pos, window, softcap=None):
    return swattn.sliding_window_attention(q, k, v, window, softcap=softcap, q_pos=pos, k_pos=pos)


def chunked(cache, q, k, v, pos, sizes, softcap=None):
    outs, start = [], 0
    for size in sizes:
        s = slice(start, start + size)
        outs.append(cache.attend(q[:, :, s], k[:, :, s], v[:, :, s], pos[:, s], softcap=softcap))
        start += size
    assert start == q.shape[2]
    return torch.cat(outs, dim=2)


def schedule(kind, length):
    if kind == "mix":
        rng, sizes = random.Random(length), []
        while sum(sizes) < length:
            sizes.append(min(rng.choice([1, 2, 5, W, 2 * W + 1]), length - sum(sizes)))
        return sizes
    size = {"1": 1, "3": 3, "W-1": W - 1, "W": W, "W+1": W + 1, "3W": 3 * W}[kind]
    return [min(size, length - s) for s in range(0, length, size)]


def make(kind, batch=2):
    if kind == "full-windowed":  # a local layer keeping every token (caches without rings)
        return FullCache(batch, HEADS_KV, DIM, window=W)
    return RingCache(batch, HEADS_KV, DIM, W) if kind == "ring" else FullCache(batch, HEADS_KV, DIM)


@pytest.mark.parametrize("cache_kind", ["ring", "full", "full-windowed"])
@pytest.mark.parametrize("sizes", ["1", "3", "W-1", "W", "W+1", "3W", "mix"])
def test_chunks_of_any_size_equal_one_full_pass(cache_kind, sizes):
    q, k, v, pos = text()
    cache = make(cache_kind)
    window = None if cache_kind == "full" else W
    got = chunked(cache, q, k, v, pos, schedule(sizes, q.shape[2]), softcap=20.0)
    torch.testing.assert_close(got, full_pass(q, k, v, pos, window, softcap=20.0), atol=1e-5, rtol=1e-5)
    assert (got[1, :, :4] == 0).all()  # row 1's padding


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16])
def test_short_aligned_chunks_read_the_ring_in_place_and_match_one_pass(softcap, kv_dtype, monkeypatch):
    """Chunks of 2 and 3 tokens into a 48-slot ring (at most window / 16 tokens take the in-place
    path, which merges the ring's part and the chunk's own by log-sum-exp), before and after it
    comes round, mixed with single tokens and longer chunks (the time-ordered path): the same
    as one pass (fp32 caches) and as the time-ordered path alone (bf16 caches, whose stored keys
    are rounded while a chunk's own are not, on both paths)."""
    import swattn.cache as cache_module

    window = 48
    q, k, v, pos = text(pad=(0, 0), length=3 * window + 7)
    sizes, start = [], 0
    for size in [5, 2, 3, 1, 2, 4, 3, 30, 2, 3, 4, 1] * 9:
        size = min(size, q.shape[2] - start)
        if size > 0:
            sizes.append(size)
            start += size

    def run():
        ring, outs, start = RingCache(2, HEADS_KV, DIM, window, kv_dtype=kv_dtype), [], 0
        for size in sizes:
            s = slice(start, start + size)
            outs.append(ring.attend(q[:, :, s], k[:, :, s], v[:, :, s], pos[:, s], softcap=softcap, aligned=True))
            start += size
        return torch.cat(outs, dim=2)

    taken = []
    real = RingCache._attend_small
    monkeypatch.setattr(RingCache, "_attend_small", lambda self, *a: taken.append(1) or real(self, *a))
    got = run()
    assert len(taken) >= 10 and 3 * cache_module.SMALL_CHUNK_RATIO <= window  # chunks of 2 and 3 took it
    if kv_dtype is None:
        torch.testing.assert_close(got, full_pass(q, k, v, pos, window, softcap=softcap), atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(cache_module, "SMALL_CHUNK_RATIO", 10**9)
    torch.testing.assert_close(got, run(), atol=1e-5, rtol=1e-5)


def test_rows_that_stop_early_keep_their_cache_and_others_continue():
    q, k, v, pos = text(pad=(0, 0))
    cache = RingCache(2, HEADS_KV, DIM, W)
    stop = 3 * W + 2
    pos_run = pos.clone()
    pos_run[0, stop:] = -1  # row 0 stops; the batch keeps stepping
    outs = []
    for t in range(q.shape[2]):
        outs.append(cache.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], pos_run[:, t : t + 1]))
        if t == stop - 1:
            frozen = cache.save()
    got = torch.cat(outs, dim=2)
    ref = full_pass(q, k, v, pos, W)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0, :, :stop], ref[0, :, :stop], atol=1e-5, rtol=1e-5)
    assert (got[0, :, stop:] == 0).all()
    for now, then in zip((cache.k, cache.v, cache.slot_pos, cache.last_pos), frozen.tensors):
        assert torch.equal(now[0], then[0])  # the stopped row's slots were not touched


@pytest.mark.parametrize("cache_kind", ["ring", "full", "model"])
def test_saved_prefix_restored_then_continued_equals_the_uninterrupted_run(cache_kind):
    q, k, v, pos = text()
    prefix, rest = 2 * W + 3, q.shape[2] - (2 * W + 3)
    windows = [W, None, W]
    cache = ModelCache(windows, 2, HEADS_KV, DIM) if cache_kind == "model" else make(cache_kind)
    layers = list(cache.layers) if cache_kind == "model" else [cache]

    def run(sl, qq=q, kk=k, vv=v):
        return [layer.attend(qq[:, :, sl], kk[:, :, sl], vv[:, :, sl], pos[:, sl]) for layer in layers]

    run(slice(0, prefix))
    state = cache.save()
    run(slice(prefix, None), torch.randn_like(q), torch.randn_like(k), torch.randn_like(v))  # another continuation
    cache.restore(state)
    after_restore = run(slice(prefix, None))

    fresh = ModelCache(windows, 2, HEADS_KV, DIM) if cache_kind == "model" else make(cache_kind)
    fresh_layers = list(fresh.layers) if cache_kind == "model" else [fresh]
    for layer in fresh_layers:
        layer.attend(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], pos[:, :prefix])
    for layer, got in zip(fresh_layers, after_restore):
        want = layer.attend(q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:], pos[:, prefix:])
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert rest > W


@pytest.mark.parametrize("prefix", [1, W - 3, W - 1, W, W + 2])
def test_a_ring_saved_before_it_came_round_keeps_only_its_used_slots(prefix):
    q, k, v, pos = text(pad=(0, 0))
    ring = RingCache(2, HEADS_KV, DIM, W)
    ring.attend(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], pos[:, :prefix], aligned=True)
    state = ring.save()
    assert state.tensors[0].shape[2] == min(prefix, W)  # a full ring once it has come round
    noise = [torch.randn_like(t[:, :, prefix:]) for t in (q, k, v)]
    ring.attend(*noise, pos[:, prefix:], aligned=True)  # another continuation, then back
    ring.restore(state)
    fresh = RingCache(2, HEADS_KV, DIM, W)
    fresh.attend(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], pos[:, :prefix], aligned=True)
    for sl, aligned in ((slice(prefix, prefix + 2), False), (slice(prefix + 2, prefix + 3), False)):
        got = ring.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], pos[:, sl], aligned=aligned)
        want = fresh.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], pos[:, sl], aligned=aligned)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for t, f in zip((ring.k, ring.v, ring.slot_pos, ring.last_pos), (fresh.k, fresh.v, fresh.slot_pos, fresh.last_pos)):
        assert torch.equal(t, f)
    if prefix < W:  # a short state is only ever a ring's first slots
        tampered = list(state.tensors)
        tampered[3] = torch.full_like(tampered[3], W + 5)
        with pytest.raises(ValueError, match="ring"):
            RingCache(2, HEADS_KV, DIM, W).restore(CacheState("RingCache", tuple(tampered), None))


@pytest.mark.parametrize("how", ["decode", "one chunk"])
def test_wrap_around_slots_pinned(how):
    cache = RingCache(1, 1, 2, 4)
    k = torch.arange(10, dtype=torch.float32).view(1, 1, 10, 1).expand(1, 1, 10, 2).contiguous()
    if how == "decode":
        for p in range(10):
            cache.update(k[:, :, p : p + 1], k[:, :, p : p + 1], torch.tensor([p]))
    else:
        cache.update(k, k, torch.arange(10))
    # positions 6..9 remain; position p sits in slot p % 4
    assert cache.slot_pos.tolist() == [[8, 9, 6, 7]]
    assert cache.k[0, 0, :, 0].tolist() == [8.0, 9.0, 6.0, 7.0]
    assert cache.seq_len.tolist() == [10]


def test_ring_memory_is_fixed_and_written_in_place():
    cache = RingCache(1, HEADS_KV, DIM, W)
    kv = torch.randn(1, HEADS_KV, W, DIM)
    cache.update(kv, kv, torch.arange(W))
    nbytes, ptr = cache.nbytes, cache.k.data_ptr()
    one = torch.randn(1, HEADS_KV, 1, DIM)
    for p in range(W, 3000):
        cache.update(one, one, torch.tensor([p]))
    assert cache.nbytes == nbytes == 2 * HEADS_KV * W * DIM * 4 + (W + 1) * 8
    assert cache.k.data_ptr() == ptr  # never reallocated, rolled or copied
    assert sorted(cache.slot_pos[0].tolist()) == list(range(3000 - W, 3000))


def test_full_cache_grows_by_doubling_or_refuses_past_its_capacity():
    grow = FullCache(1, 1, 4)
    kv = torch.randn(1, 1, 300, 4)
    keys, _, key_pos = grow.update(kv, kv, torch.arange(300))
    assert grow.k.shape[2] == 512 and keys.shape[2] == 300 and key_pos[0, -1] == 299
    fixed = FullCache(1, 1, 4, capacity=100)
    fixed.update(kv[:, :, :100], kv[:, :, :100], torch.arange(100))
    with pytest.raises(ValueError, match="capacity exceeded: position 100 does not fit in capacity 100"):
        fixed.update(kv[:, :, :1], kv[:, :, :1], torch.tensor([100]))


def test_model_cache_builds_the_right_layer_kinds():
    assert layer_windows("gemma2", 4, 4096) == [4096, None, 4096, None]
    assert layer_windows("gemma3", 12, 1024) == [1024] * 5 + [None] + [1024] * 5 + [None]
    assert layer_windows("mistral", 3, 4096) == [4096] * 3
    cache = ModelCache(layer_windows("gemma3", 6, 8), 1, 2, 4, capacity=64)
    assert [type(layer).__name__ for layer in cache.layers] == ["RingCache"] * 5 + ["FullCache"]
    assert cache.nbytes == sum(layer.nbytes for layer in cache.layers)
    with pytest.raises(ValueError, match="unknown layer pattern"):
        layer_windows("llama", 2, 8)


def test_bad_use_is_a_clear_error():
    cache = RingCache(2, HEADS_KV, DIM, W)
    kv = torch.randn(2, HEADS_KV, 3, DIM)
    cache.update(kv, kv, torch.tensor([[5, 6, 7], [0, 1, 2]]))
    with pytest.raises(ValueError, match="positions must increase: row 0 got position 7 after position 7"):
        cache.update(kv[:, :, :1], kv[:, :, :1], torch.tensor([[7], [3]]))
    with pytest.raises(ValueError, match="positions must increase: row 1 got position 4 after position 9"):
        cache.update(kv, kv, torch.tensor([[8, 9, 10], [9, 4, 10]]))
    with pytest.raises(ValueError, match="batch 2, heads_kv 2, head_dim 16"):
        cache.update(kv[:1], kv[:1], torch.tensor([8, 9, 10]))
    with pytest.raises(ValueError, match="this cache holds"):
        cache.update(kv[:, :1], kv[:, :1], torch.tensor([8, 9, 10]))
    with pytest.raises(ValueError, match="this cache holds"):
        cache.update(kv[..., :8], kv[..., :8], torch.tensor([8, 9, 10]))
    with pytest.raises(TypeError, match="the cache is torch.float32"):
        cache.update(kv.double(), kv.double(), torch.tensor([8, 9, 10]))
    with pytest.raises(ValueError, match=r"pos must have shape \(2, 3\)"):
        cache.update(kv, kv, torch.tensor([8, 9]))
    with pytest.raises(ValueError, match="cannot restore a ring of 7 slots into a ring of 5"):
        RingCache(2, HEADS_KV, DIM, 5).restore(cache.save())
    with pytest.raises(ValueError, match="cannot restore a RingCache state into a FullCache"):
        FullCache(2, HEADS_KV, DIM).restore(cache.save())
    with pytest.raises(ValueError, match="cannot restore a state of 1 layers into a cache of 2"):
        ModelCache([W, None], 2, HEADS_KV, DIM).restore((cache.save(),))
    with pytest.raises(ValueError, match="a RingCache needs a window"):
        RingCache(1, 1, 4, None)


def test_bytes_in_use_count_stored_positions_not_preallocated_ones():
    from swattn.cache import ModelCache

    cache = ModelCache([4, None], batch=1, heads_kv=2, head_dim=8, capacity=100)
    k = torch.randn(1, 2, 10, 8)
    cache[0].attend(torch.randn(1, 2, 10, 8), k, k, torch.arange(10))
    cache[1].attend(torch.randn(1, 2, 10, 8), k, k, torch.arange(10))
    per_token = 2 * 2 * 8 * 4 + 8  # k and v of 2 heads x 8 fp32, one position
    assert cache[0].nbytes_used == cache[0].nbytes  # a ring: all of it, always
    assert cache[1].nbytes_used == 10 * per_token < cache[1].nbytes
    assert cache.nbytes_used == cache[0].nbytes + 10 * per_token


@pytest.mark.parametrize("kind", ["ring", "full", "full-windowed"])
@pytest.mark.parametrize("chunks", [[5, 3, 1, 1, 9, 1, 20, 2], [1, 1, 1, 30, 7], [64, 1, 13]], ids=str)
def test_aligned_chunks_take_the_fast_path_with_the_same_result(kind, chunks):
    window = 8
    make = {"ring": lambda: RingCache(2, 2, 16, window),
            "full": lambda: FullCache(2, 2, 16),
            "full-windowed": lambda: FullCache(2, 2, 16, window=window)}[kind]
    fast, slow = make(), make()
    start = 0
    for chunk in chunks:
        q = torch.randn(2, 4, chunk, 16)
        k, v = torch.randn(2, 2, chunk, 16), torch.randn(2, 2, chunk, 16)
        pos = torch.arange(start, start + chunk).expand(2, -1)
        got = fast.attend(q, k, v, pos, softcap=5.0, aligned=True)
        want = slow.attend(q, k, v, pos, softcap=5.0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        start += chunk
        assert fast.dense == start and slow.dense is None
    for a, b in zip((fast.k, fast.v, fast.slot_pos, fast.last_pos), (slow.k, slow.v, slow.slot_pos, slow.last_pos)):
        assert torch.equal(a, b)  # the same stored state either way


def test_model_cache_knows_when_positions_continue_densely():
    cache = ModelCache([4, None], 2, 2, 8, capacity=64)
    assert cache.aligned(torch.arange(5).expand(2, -1))
    assert not cache.aligned(torch.arange(1, 6).expand(2, -1))  # a gap
    padded = torch.arange(5).expand(2, -1).clone()
    padded[1, :2] = -1
    assert not cache.aligned(padded)
    k = torch.randn(2, 2, 5, 8)
    for layer in cache.layers:
        layer.attend(torch.randn(2, 2, 5, 8), k, k, padded)  # an irregular chunk: no longer known dense
    assert not cache.aligned(torch.arange(5, 8).expand(2, -1))
    fresh = ModelCache([4, None], 2, 2, 8, capacity=64)
    pos = torch.arange(6).expand(2, -1)
    for layer in fresh.layers:
        layer.attend(torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), pos, aligned=True)
    state = fresh.save()
    again = ModelCache([4, None], 2, 2, 8, capacity=64)
    again.restore(state)
    assert again.aligned(torch.arange(6, 7).expand(2, -1))  # a restored prefix keeps the fast path
