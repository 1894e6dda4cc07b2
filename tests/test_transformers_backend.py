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
