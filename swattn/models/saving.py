"""Writing a model as a Hugging Face checkpoint directory that swattn and transformers load.

``config.json``, ``model.safetensors`` (tensor names as in the published checkpoints),
``generation_config.json``, and the tokenizer's files. Only safetensors: nothing pickled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from swattn.models.config import ModelConfig
from swattn.models.layers import PrepackedLinear
from swattn.models.transformer import MERGED_PARTS

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def gemma2_config(cfg: ModelConfig, max_position_embeddings: int) -> dict:
    """``config.json`` contents of a Gemma 2 model described by ``cfg`` (the keys transformers reads)."""
    window = next((w for w in cfg.windows if w is not None), None)
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "sliding_window": window,
        "layer_types": ["sliding_attention" if w is not None else "full_attention" for w in cfg.windows],
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.final_softcap,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_global.theta,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_act": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids),
        "use_cache": True,
    }


def state_dict_hf(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors under the checkpoints' names (``model.`` prefix, ``lm_head`` as is), in ``dtype``.

    Merged prepacked projections (:func:`swattn.models.prepack.prepack`) are given as their parts.
    """
    modules = dict(model.named_modules())
    out = {}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        layer = modules.get(owner)
        if isinstance(layer, PrepackedLinear) and layer.parts:
            base, _, merged = owner.rpartition(".")
            pieces = {f"{base}.{part}.{leaf}": w for part, w in zip(MERGED_PARTS[merged], t.split(layer.parts))}
        else:
            pieces = {name: t}
        for piece, tensor in pieces.items():
            key = piece if piece.startswith("lm_head") else f"model.{piece}"
            out[key] = tensor.detach().to(dtype).contiguous()
    return out


def save_checkpoint(model: torch.nn.Module, out: Path, *, config: dict, dtype: torch.dtype = torch.bfloat16,
                    tokenizer=None, tokenizer_from: Path | None = None, generation: dict | None = None) -> None:
    """Writes ``model`` as a checkpoint directory ``out`` (created if needed).

    Args:
        model: a :class:`swattn.models.transformer.CausalLM`.
        config: the ``config.json`` contents (its dtype entries are set to ``dtype``).
        dtype: of the stored weights.
        tokenizer: a ``tokenizers.Tokenizer`` to write as ``tokenizer.json`` (with a
            ``tokenizer_config.json`` naming its special tokens), or
        tokenizer_from: a checkpoint directory whose tokenizer files are copied.
        generation: ``generation_config.json`` contents (default: the config's token ids).
    """
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config, torch_dtype=DTYPE_NAMES[dtype], dtype=DTYPE_NAMES[dtype])
    save_file(state_dict_hf(model, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation is None:
        generation = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).exists() and (tokenizer_from / name).resolve() != (out / name).resolve():
                shutil.copyfile(tokenizer_from / name, out / name)
    elif tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
        specials = {f"{k}_token": f"<{k}>" for k in ("bos", "eos", "pad", "unk") if tokenizer.token_to_id(f"<{k}>") is not None}
        (out / "tokenizer_config.json").write_text(json.dumps(
            dict(specials, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True, add_eos_token=False,
                 model_max_length=config.get("max_position_embeddings")), indent=2) + "\n")
