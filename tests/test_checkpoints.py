"""The checkpoints people have: published configs parsed right, multimodal Gemma 3's text model, refusals."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from swattn.models.config import ModelConfig
from swattn.models.loading import load

# config.json of published checkpoints, as their model repositories give them
GEMMA2_COMMON = dict(architectures=["Gemma2ForCausalLM"], attention_bias=False, attention_dropout=0.0,
                     attn_logit_softcapping=50.0, bos_token_id=2, cache_implementation="hybrid", eos_token_id=[1, 107],
                     final_logit_softcapping=30.0, head_dim=256, hidden_act="gelu_pytorch_tanh",
                     hidden_activation="gelu_pytorch_tanh", initializer_range=0.02, max_position_embeddings=8192,
                     model_type="gemma2", pad_token_id=0, query_pre_attn_scalar=256, rms_norm_eps=1e-06,
                     rope_theta=10000.0, sliding_window=4096, transformers_version="4.42.4", use_cache=True,
                     vocab_size=256000)
PUBLISHED = {
    "gemma-2-2b-it": dict(GEMMA2_COMMON, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                          num_hidden_layers=26, num_key_value_heads=4, torch_dtype="float32"),
    "gemma-2-9b-it": dict(GEMMA2_COMMON, hidden_size=3584, intermediate_size=14336, num_attention_heads=16,
                          num_hidden_layers=42, num_key_value_heads=8, sliding_window_size=4096, torch_dtype="bfloat16"),
    "gemma-3-1b-it": dict(architectures=["Gemma3ForCausalLM"], attention_bias=False, attention_dropout=0.0,
                          attn_logit_softcapping=None, bos_token_id=2, cache_implementation="hybrid",
                          eos_token_id=[1, 106], final_logit_softcapping=None, head_dim=256,
                          hidden_activation="gelu_pytorch_tanh", hidden_size=1152, initializer_range=0.02,
                          intermediate_size=6912, max_position_embeddings=32768, model_type="gemma3_text",
                          num_attention_heads=4, num_hidden_layers=26, num_key_value_heads=1, pad_token_id=0,
                          query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_local_base_freq=10000, rope_scaling=None,
                          rope_theta=1000000, sliding_window=512, sliding_window_pattern=6, torch_dtype="bfloat16",
                          transformers_version="4.50.0.dev0", use_cache=True, vocab_size=262144),
    "gemma-3-4b-it": dict(architectures=["Gemma3ForConditionalGeneration"], boi_token_index=255999,
                          eoi_token_index=256000, eos_token_id=[1, 106], image_token_index=262144,
                          initializer_range=0.02, mm_tokens_per_image=256, model_type="gemma3",
                          text_config=dict(head_dim=256, hidden_size=2560, intermediate_size=10240,
                                           model_type="gemma3_text", num_attention_heads=8, num_hidden_layers=34,
                                           num_key_value_heads=4, query_pre_attn_scalar=256,
                                           rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024),
                          torch_dtype="bfloat16", transformers_version="4.50.0.dev0",
                          vision_config=dict(hidden_size=1152, image_size=896, intermediate_size=4304,
                                             model_type="siglip_vision_model", num_attention_heads=16,
                                             num_hidden_layers=27, patch_size=14, vision_use_head=False)),
    "Mistral-7B-Instruct-v0.3": dict(architectures=["MistralForCausalLM"], attention_dropout=0.0, bos_token_id=1,
                                     eos_token_id=2, hidden_act="silu", hidden_size=4096, initializer_range=0.02,
                                     intermediate_size=14336, max_position_embeddings=32768, model_type="mistral",
                                     num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8,
                                     rms_norm_eps=1e-05, rope_theta=1000000.0, sliding_window=None,
                                     tie_word_embeddings=False, torch_dtype="bfloat16",
                                     transformers_version="4.42.0.dev0", use_cache=True, vocab_size=32768),
}
# (layers, local window, global layers, local rope base, global rope base, global linear factor, caps, heads, dtype)
EXPECTED = {
    "gemma-2-2b-it": (26, 4096, list(range(1, 26, 2)), 1e4, 1e4, 1.0, (50.0, 30.0), (8, 4, 256), "float32"),
    "gemma-2-9b-it": (42, 4096, list(range(1, 42, 2)), 1e4, 1e4, 1.0, (50.0, 30.0), (16, 8, 256), "bfloat16"),
    "gemma-3-1b-it": (26, 512, [5, 11, 17, 23], 1e4, 1e6, 1.0, (None, None), (4, 1, 256), "bfloat16"),
    "gemma-3-4b-it": (34, 1024, [5, 11, 17, 23, 29], 1e4, 1e6, 8.0, (None, None), (8, 4, 256), "bfloat16"),
    "Mistral-7B-Instruct-v0.3": (32, None, list(range(32)), 1e6, 1e6, 1.0, (None, None), (32, 8, 128), "bfloat16"),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_parse_into_the_right_layers(name):
    from swattn import dtypes

    cfg = ModelConfig.from_hf_config(PUBLISHED[name])
    layers, window, global_layers, local_base, global_base, factor, caps, heads, dtype = EXPECTED[name]
    assert cfg.num_layers == len(cfg.windows) == layers
    assert [i for i, w in enumerate(cfg.windows) if w is None] == global_layers
    assert {w for w in cfg.windows if w is not None} == ({window} if window and len(global_layers) < layers else set())
    assert (cfg.rope_local.theta, cfg.rope_global.theta, cfg.rope_global.linear_factor) == (local_base, global_base, factor)
    assert cfg.rope_local.linear_factor == 1.0  # Gemma 3 scales only the global layers' rotation
    assert (cfg.attn_softcap, cfg.final_softcap) == caps
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == heads
    assert dtypes.name(dtypes.checkpoint_dtype(PUBLISHED[name])) == dtype
    assert cfg.activation == ("silu" if name.startswith("Mistral") else "gelu_tanh")


@pytest.mark.parametrize("key,value,words", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, ["rope_scaling", "yarn"]),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, ["dynamic"]),
    ("rope_parameters", {"full_attention": {"rope_type": "llama3", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, ["rope_parameters", "llama3"]),
    ("layer_types", ["sliding_attention"] * 25 + ["chunked_attention"], ["layer_types", "chunked_attention"]),
    ("hidden_activation", "gelu", ["hidden_activation", "'gelu'"]),
    ("use_bidirectional_attention", True, ["use_bidirectional_attention"]),
])
def test_settings_swattn_does_not_implement_are_refused_by_name(key, value, words):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_hf_config({**PUBLISHED["gemma-3-1b-it"], key: value})
    assert all(w in str(err.value) for w in words)


def tiny_multimodal_gemma3():
    text = transformers.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                         max_position_embeddings=256, query_pre_attn_scalar=16)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    boi_token_index=290, eoi_token_index=291, image_token_index=292)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.parametrize("layout", ["as saved", "model.language_model"])
def test_multimodal_gemma3_loads_its_text_model(tmp_path, layout):
    hf = tiny_multimodal_gemma3()
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("vision_tower.") for k in tensors)
    if layout == "model.language_model":  # what newer transformers versions write
        renamed = {k.replace("language_model.model.", "model.language_model.").replace("vision_tower.", "model.vision_tower.")
                   : v for k, v in tensors.items()}
        assert renamed.keys() != tensors.keys()
        save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load(tmp_path)
    assert model.cfg.model_type == "gemma3_text" and model.cfg.qk_norm
    assert model.skipped_tensors and all("vision_tower" in n or "multi_modal" in n for n in model.skipped_tensors)
    ids = torch.randint(0, 289, (1, 23))
    with torch.no_grad():
        ours = model(ids)
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-4
