"""Gemma 2, Gemma 3 and Mistral against transformers: tiny random models, saved and loaded back."""

import json

import pytest
import torch
import transformers
from conftest import needs_prepack

from swattn.models.config import ModelConfig
from swattn.models.layers import Linear, PrepackedLinear
from swattn.models.loading import load
from swattn.models.prepack import unpack
from swattn.models.saving import state_dict_hf
from swattn.profiling import count_ops

WINDOW = 4
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=256)
FAMILIES = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(query_pre_attn_scalar=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
}


def tiny_hf_model(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**TINY, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # they start at 0 (Gemma) or 1: randomise, or parity proves little
                p.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    single = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(single)
    hf._swattn_path = single
    sharded = tmp_path_factory.mktemp(request.param + "_sharded")
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    return request.param, hf, load(single), load(sharded)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_match_transformers_over_several_windows(pair):
    _, hf, ours, ours_sharded = pair
    ids = torch.randint(0, 256, (2, 5 * WINDOW + 1))
    with torch.no_grad():
        want = hf(ids).logits
        assert rel_err(ours(ids), want) < 1e-4
        assert rel_err(ours_sharded(ids), want) < 1e-4


@pytest.mark.parametrize("sizes", [[1] * 21, [3, 5, 4, 9], [21], [WINDOW - 1, WINDOW, WINDOW + 1, 9]])
def test_chunked_prefill_through_caches_gives_the_same_logits(pair, sizes):
    _, _, ours, _ = pair
    ids = torch.randint(0, 256, (2, sum(sizes)))
    pos = torch.arange(ids.shape[1]).expand(2, -1)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(batch=2)
        parts, start = [], 0
        for n in sizes:
            parts.append(ours(ids[:, start : start + n], pos[:, start : start + n], cache))
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers_token_for_token(pair):
    _, hf, ours, _ = pair
    prompt = torch.randint(0, 256, (1, 7))
    new = 3 * WINDOW + 2
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=new, do_sample=False, min_new_tokens=new)[0, 7:].tolist()
        cache = ours.new_cache(batch=1)
        logits = ours(prompt, torch.arange(7).view(1, -1), cache)
        got = []
        for step in range(new):
            token = logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(token))
            logits = ours(token, torch.tensor([[7 + step]]), cache)
    assert got == want


def test_config_reads_old_and_new_keys():
    new = ModelConfig.from_hf_config(tiny_hf_model("gemma3").config.to_dict())
    assert new.windows == (WINDOW,) * 5 + (None,)
    assert (new.rope_local.theta, new.rope_global.theta) == (10000.0, 1000000.0)
    old = dict(model_type="gemma3_text", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=12,
               num_attention_heads=2, num_key_value_heads=1, head_dim=4, sliding_window=16, sliding_window_pattern=6,
               rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"type": "linear", "factor": 8.0})
    cfg = ModelConfig.from_hf_config(old)
    assert cfg.windows == ((16,) * 5 + (None,)) * 2
    assert cfg.rope_global.linear_factor == 8.0 and cfg.rope_local.linear_factor == 1.0
    gemma2_old = dict(old, model_type="gemma2", num_hidden_layers=4)
    assert ModelConfig.from_hf_config(gemma2_old).windows == (16, None, 16, None)


def test_bad_checkpoints_are_named(tmp_path):
    hf = tiny_hf_model("mistral")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.gate_proj.weight in model.safetensors has shape \(128, 64\), expected \(96, 64\)"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=7)))
    with pytest.raises(ValueError, match="lacks tensors: model.layers.6"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=5)))
    with pytest.raises(ValueError, match="unexpected tensors: model.layers.5"):
        load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(tmp_path)


def test_long_inputs_take_the_mlp_in_chunks(pair, monkeypatch):
    from swattn.models.transformer import MLP

    _, hf, ours, _ = pair
    ids = torch.randint(0, 256, (1, 23))
    with torch.no_grad():
        whole = ours(ids)
        monkeypatch.setattr(MLP, "INFERENCE_CHUNK", 5)
        torch.testing.assert_close(ours(ids), whole, atol=1e-5, rtol=1e-5)
    x = torch.randn(1, 23, ours.cfg.hidden_size, requires_grad=True)
    mlp = ours.layers[0].mlp
    whole = mlp(x)
    monkeypatch.setattr(MLP, "CHUNK", 5)
    chunked = mlp(x)
    assert chunked.grad_fn.name() == "CatBackward0" and whole.grad_fn.name() != "CatBackward0"
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_last_only_gives_the_last_positions_logits(pair):
    _, _, ours, _ = pair
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, last_only=True), ours(ids)[:, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_is_as_close_to_fp32_as_transformers_own_bfloat16(family, tmp_path):
    """Loaded in bf16 (the native bf16 attention where the CPU has it), whole and in chunks
    through the caches: no further from the fp32 logits than transformers' eager bf16 is."""
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 6 * WINDOW + 3))
    with torch.no_grad():
        exact = hf(ids).logits.double()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, attn_implementation="eager", dtype=torch.bfloat16)(ids).logits.double()
        ours = load(tmp_path, dtype=torch.bfloat16)
        whole = ours(ids).double()
        cache = ours.new_cache(2)
        chunks = [ours(ids[:, s : s + 10], torch.arange(s, min(s + 10, ids.shape[1])).expand(2, -1), cache)
                  for s in range(0, ids.shape[1], 10)]
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    their_err = (theirs - exact).abs().max().item()
    for got in (whole, torch.cat(chunks, dim=1).double()):
        assert (got - exact).abs().max().item() <= 2 * their_err


def test_loaded_models_are_ready_for_inference(pair):
    _, _, ours, _ = pair
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours(torch.randint(0, 256, (1, 5))).grad_fn is None  # no graph built by a plain call


@needs_prepack
def test_bf16_models_load_prepacked_and_give_the_plain_models_logits(pair, monkeypatch):
    family, hf, _, _ = pair
    path = hf._swattn_path
    packed, plain = load(path, dtype=torch.bfloat16), load(path, dtype=torch.bfloat16, prepack=False)
    linears = [m for m in packed.modules() if isinstance(m, (Linear, PrepackedLinear))]
    assert linears and all(isinstance(m, PrepackedLinear) for m in linears)
    assert (packed.lm_head is None) == (family != "mistral")  # Mistral's untied head is prepacked too
    cfg = packed.cfg
    for block in packed.layers:  # q/k/v and gate/up: one product each
        kv = cfg.num_kv_heads * cfg.head_dim
        assert block.self_attn.qkv_proj.parts == (cfg.num_heads * cfg.head_dim, kv, kv)
        assert block.mlp.gate_up_proj.parts == (cfg.intermediate_size,) * 2
        assert not hasattr(block.self_attn, "q_proj") and not hasattr(block.mlp, "up_proj")
    assert not any(isinstance(m, PrepackedLinear) for m in plain.modules())
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        a, b = packed(ids).double(), plain(ids).double()
    assert (a - b).abs().max().item() <= 0.02 * b.abs().max().item()
    assert state_dict_hf(packed, torch.bfloat16).keys() == state_dict_hf(plain, torch.bfloat16).keys()
    for name, t in state_dict_hf(packed, torch.bfloat16).items():
        assert torch.equal(t, state_dict_hf(plain, torch.bfloat16)[name]), name
    apart = load(path, dtype=torch.bfloat16, fuse=False)  # prepacked, projections kept apart
    assert isinstance(apart.layers[0].self_attn.q_proj, PrepackedLinear) and apart.layers[0].mlp.gate_up_proj is None
    with torch.no_grad():  # (equal here; another oneDNN may block the merged product differently)
        c = apart(ids).double()
    assert (c - a).abs().max().item() <= 0.02 * a.abs().max().item()
    monkeypatch.setenv("SWATTN_PREPACK", "0")
    assert not any(isinstance(m, PrepackedLinear) for m in load(path, dtype=torch.bfloat16).modules())
    monkeypatch.setenv("SWATTN_PREPACK", "yes")
    with pytest.raises(ValueError, match="SWATTN_PREPACK"):
        load(path, dtype=torch.bfloat16)
    monkeypatch.delenv("SWATTN_PREPACK")
    assert not any(isinstance(m, PrepackedLinear) for m in load(path).modules())  # fp32: nothing to prepack
    with pytest.raises(ValueError, match="bf16"):
        load(path, prepack=True)
    with pytest.raises(ValueError, match="prepack must be"):
        load(path, dtype=torch.bfloat16, prepack="yes")


@pytest.mark.parametrize("dtype,weights", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, "q8")],
                         ids=["fp32", "bf16", "q8"])
def test_a_decode_step_dispatches_at_most_40_ops_per_layer(pair, dtype, weights):
    """A lean decode step, counted as a dispatch mode sees the ops: each layer's bookkeeping
    around its products and attention stays small, and so does the step's own (embedding,
    rotary tables, final norm, head)."""
    _, hf, _, _ = pair
    model = load(hf._swattn_path, dtype=dtype, weights=weights)
    ids = torch.randint(0, 256, (2, 10))
    with torch.inference_mode():
        cache = model.new_cache(2, capacity=16)
        model(ids[:, :9], cache=cache, last_only=True)
        ops = count_ops(lambda: model(ids[:, 9:], torch.full((2, 1), 9), cache), model.layers)
    layers = len(model.layers)
    assert ops["within"] <= 40 * layers, ops
    assert ops["total"] - ops["within"] <= 40, ops


COMPILED_CASES = [
    pytest.param(torch.float32, None, False, True, None, id="fp32-apart"),
    pytest.param(torch.bfloat16, None, True, True, None, id="bf16-prepacked", marks=needs_prepack),
    pytest.param(torch.bfloat16, None, False, True, "int8", id="bf16-plain-int8kv"),
    pytest.param(torch.float32, "q8", False, True, "bf16", id="q8-fused-bf16kv"),
    pytest.param(torch.bfloat16, "q4", False, False, None, id="q4-apart"),
]


@pytest.mark.parametrize("dtype,weights,prepack,fuse,kv", COMPILED_CASES)
def test_compiled_decode_step_equals_the_python_layers(pair, monkeypatch, dtype, weights, prepack, fuse, kv):
    """Each layer's decode step as one compiled call gives exactly what the layers' Python forward
    gives (the same kernels in the same order), over rings that wrap, a growing full cache, rows at
    different positions and a padding row; and it runs as one op per layer."""
    from swattn.models import transformer

    _, hf, _, _ = pair
    model = load(hf._swattn_path, dtype=dtype, weights=weights, prepack=prepack, fuse=fuse, kv_dtype=kv)
    if prepack:  # every projection takes the panel kernel on its prepacked memory
        assert all(m.panel_view is not None for m in model.modules() if isinstance(m, PrepackedLinear))
    ids = torch.randint(0, 256, (3, 20))
    runs = {}
    for compiled in (False, True):
        monkeypatch.setattr(transformer, "COMPILED_DECODE", compiled)
        if compiled:
            calls = _count_compiled_calls(monkeypatch)
        with torch.inference_mode():
            cache = model.new_cache(3)  # the full caches grow as needed
            model(ids[:, :7], cache=cache, last_only=True)
            if compiled:
                calls.clear()
            pos = torch.arange(7, 19).expand(3, -1).clone()
            pos[1, 3:] -= 1  # row 1 pads at step 3, then runs one position behind
            pos[1, 3] = -1
            steps = [model(ids[:, 7 + i : 8 + i], pos[:, i : i + 1], cache) for i in range(12)]
        runs[compiled] = steps, [t.clone() for layer in cache.layers for t in layer._buffers()]
    (want, want_cache), (got, got_cache) = runs[False], runs[True]
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(want_cache, got_cache))
    assert calls == [len(model.layers)] * 12  # every step, every layer: one compiled call


def _count_compiled_calls(monkeypatch) -> list[int]:
    """Calls of the compiled layer step, per model step, from here on."""
    from swattn.models import transformer

    calls: list[int] = []
    real_call, real_features = transformer.decode_call, transformer.CausalLM.features

    def features(self, *args, **kwargs):
        calls.append(0)
        return real_features(self, *args, **kwargs)

    def call(op, *args):
        calls[-1] += op is torch.ops.swattn.decode_block
        return real_call(op, *args)

    monkeypatch.setattr(transformer, "decode_call", call)
    monkeypatch.setattr(transformer.CausalLM, "features", features)
    return calls


def test_compiled_decode_step_names_positions_out_of_order(pair):
    _, hf, _, _ = pair
    model = load(hf._swattn_path, weights="q8")
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        cache = model.new_cache(1)
        model(ids[:, :8], cache=cache)
        with pytest.raises(ValueError, match="positions must increase"):
            model(ids[:, 8:], torch.full((1, 1), 3), cache)


@needs_prepack
def test_prepacked_models_refuse_training_until_unpacked(pair):
    _, hf, _, _ = pair
    model = load(hf._swattn_path, dtype=torch.bfloat16).requires_grad_(True)
    plain = load(hf._swattn_path, dtype=torch.bfloat16, prepack=False)
    ids = torch.randint(0, 256, (1, 9))
    with pytest.raises(RuntimeError, match="prepack=False"):
        model(ids)
    assert unpack(model) == sum(isinstance(m, Linear) for m in plain.modules())
    assert not any(isinstance(m, PrepackedLinear) for m in model.modules())
    # merged projections are separate layers again, with the plain model's names and weights
    assert model.state_dict().keys() == plain.state_dict().keys()
    for name, t in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    model.requires_grad_(True)
    model(ids).float().sum().backward()
    assert model.layers[0].mlp.down_proj.weight.grad is not None


@needs_prepack
def test_prepacking_frees_each_plain_weight_as_it_goes(pair, monkeypatch):
    """Peak memory is the model plus one group of weights (q/k/v, gate/up, or a single one, merged
    into one packed layer): when a group is packed, the plain weights packed before it are gone."""
    import weakref

    from swattn.models import layers, prepack
    from swattn.models.transformer import projection_groups

    _, hf, _, _ = pair
    model = load(hf._swattn_path, dtype=torch.bfloat16, prepack=False)
    refs = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, Linear)]
    alive_when_packing = []
    real_init = layers.PrepackedLinear.__init__

    def init(self, weight):
        alive_when_packing.append(sum(r() is not None for r in refs))
        real_init(self, weight)

    monkeypatch.setattr(layers.PrepackedLinear, "__init__", init)
    groups = [len(names) for _, _, names in projection_groups(model)]
    assert groups  # every layer's q/k/v and gate/up are merged
    sizes = groups + [1] * (len(refs) - sum(groups))
    assert prepack.prepack(model) == len(refs)
    # each packed layer sees the plain weights not yet replaced, its own group's included
    assert alive_when_packing == [len(refs) - sum(sizes[:i]) for i in range(len(sizes))]
    assert not any(r() is not None for r in refs)
