"""swattn inside transformers: logits, batched generation and weight gradients equal eager's."""

import pytest
import torch

from swattn.integrations.transformers import register_with_transformers

from test_models import FAMILIES, tiny_hf_model

register_with_transformers()


def padded_batch():
    ids = torch.randint(1, 256, (2, 21))  # 5 windows of 4
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, :6] = 0
    ids[1, :6] = 0
    return ids, mask


def with_impl(model, name):
    model.set_attn_implementation(name)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    return tiny_hf_model(request.param)


@pytest.mark.parametrize("padding", [False, True])
def test_logits_match_eager(model, padding):
    ids, mask = padded_batch()
    if not padding:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        want = with_impl(model, "eager")(ids, attention_mask=mask).logits
        got = with_impl(model, "swattn")(ids, attention_mask=mask).logits
    real = mask.bool()
    assert ((got - want)[real].abs().max() / want[real].abs().max()).item() < 1e-4


def test_batched_left_padded_generation_matches_eager(model):
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = with_impl(model, "eager").generate(ids, **kw)
        got = with_impl(model, "swattn").generate(ids, **kw)
    assert torch.equal(got, want)


def test_weight_gradients_match_eager(model):
    ids, _ = padded_batch()
    grads = {}
    for name in ("eager", "swattn"):
        with_impl(model, name).zero_grad()
        model(ids, labels=ids).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert grads["eager"].keys() == grads["swattn"].keys()
    for n, g in grads["eager"].items():
        err = ((grads["swattn"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-3, f"{n}: relative error {err:.2e}"


def test_old_or_missing_transformers_is_a_clear_error(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.46.0")
    with pytest.raises(ImportError, match="needs transformers >= 5.0, found 4.46.0"):
        register_with_transformers()
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs transformers >= 5.0: pip install"):
        register_with_transformers()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generation_with_transformers_caches_matches_eager(model, cache):
    """Dynamic caches (sliding layers cropped to the window) and static ones (keys beyond the
    position present but unfilled, queries not the last keys): both through the position masks."""
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
              cache_implementation=cache)
    with torch.no_grad():
        want = with_impl(model, "eager").generate(ids, **kw)
        got = with_impl(model, "swattn").generate(ids, **kw)
    assert torch.equal(got, want)


def test_boolean_masks_of_the_sliding_pattern_are_accepted_and_others_refused():
    from swattn.integrations.transformers import _attention
    from swattn.window import visible

    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    pos = torch.arange(9).expand(2, -1).clone()
    pos[1, :3] = -1  # left padding in row 1
    mask = visible(pos, pos, 4).unsqueeze(1)
    out, _ = _attention(None, q, k, v, mask, sliding_window=4)
    want, _ = _attention(None, q, k, v, None, sliding_window=4)
    assert torch.allclose(out[0], want[0], atol=1e-6)  # row 0 has no padding
    alone, _ = _attention(None, q[1:, :, 3:], k[1:, :, 3:], v[1:, :, 3:], None, sliding_window=4)
    assert torch.allclose(out[1, 3:], alone[0], atol=1e-6)
    packed = mask.clone()
    packed[:, :, 5:, :5] = False  # two packed sequences: not a window pattern
    with pytest.raises(ValueError, match="packed sequences"):
        _attention(None, q, k, v, packed, sliding_window=4)
    with pytest.raises(TypeError, match="attn_implementation='swattn'"):
        _attention(None, q, k, v, torch.zeros(2, 1, 9, 9), sliding_window=4)


def test_trainer_fine_tuning_through_swattn_follows_eager(tmp_path):
    """transformers' Trainer (SGD, 3 steps) on a tiny Gemma 2: the losses it logs and the
    weights it ends with are eager's, so the backward it runs is swattn's and is right."""
    import copy

    from transformers import Trainer, TrainingArguments

    base = tiny_hf_model("gemma2")
    data = [{"input_ids": t, "labels": t} for t in torch.randint(1, 256, (6, 21))]
    runs = {}
    for name in ("eager", "swattn"):
        model = with_impl(copy.deepcopy(base), name).train()
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=2,
                                 learning_rate=0.1, optim="sgd", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        runs[name] = (model, [h["loss"] for h in trainer.state.log_history if "loss" in h])
    (eager, eager_losses), (ours, our_losses) = runs["eager"], runs["swattn"]
    assert len(eager_losses) == 3 and our_losses == pytest.approx(eager_losses, rel=1e-4)
    moved = False
    for (n, p), q in zip(eager.named_parameters(), ours.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), n
        moved |= not torch.equal(p, dict(base.named_parameters())[n])
    assert moved, "training did not change the weights"


def test_the_mask_builder_decides_by_the_mask_function_and_refuses_other_patterns():
    from transformers import masking_utils as mu

    from swattn.integrations.transformers import _positions_mask, mask_pattern

    assert mask_pattern(mu.causal_mask_function) == ("causal", None)
    assert mask_pattern(mu.sliding_window_causal_mask_function(7)) == ("sliding", 7)
    others = {
        "chunked (Llama 4)": mu.chunked_causal_mask_function(4, torch.zeros(2, dtype=torch.long)),
        "bidirectional": mu.bidirectional_mask_function,
        "sliding bidirectional": mu.sliding_window_bidirectional_mask_function(4),
        "causal or a custom function": mu.or_masks(mu.causal_mask_function, lambda b, h, q, k: k == 0),
        "packed sequences": mu.remap_positions_for_packed_sequence(mu.causal_mask_function, torch.zeros(2, 9).long()),
        "image blocks": mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(torch.zeros(2, 9).long())),
    }
    for name, fn in others.items():
        with pytest.raises(ValueError, match="another attn_implementation"):  # allow_is_causal_skip would pass them
            _positions_mask(2, 9, 9, mask_function=fn, allow_is_causal_skip=True)
    # a static cache's decode step (no causal skip allowed) still gets positions, not a boolean mask
    got = _positions_mask(2, 1, 9, q_offset=8, mask_function=mu.sliding_window_causal_mask_function(4),
                          attention_mask=torch.ones(2, 9, dtype=torch.long), allow_is_causal_skip=False)
    assert got is None or got.dtype == torch.int64


def test_bidirectional_layers_and_attention_sinks_are_refused():
    import transformers

    from swattn.integrations.transformers import _attention
    from test_models import TINY

    cfg = transformers.Gemma3TextConfig(**TINY, query_pre_attn_scalar=16, use_bidirectional_attention=True)
    model = transformers.Gemma3ForCausalLM._from_config(cfg, attn_implementation="swattn", dtype=torch.float32)
    with pytest.raises(ValueError, match="another attn_implementation"):
        model(torch.randint(0, 256, (1, 9)))
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="attention sinks"):
        _attention(None, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="is_causal=False"):
        _attention(None, q, k, v, None, is_causal=False)
