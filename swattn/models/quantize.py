"""Quantized models: which layers take q8/q4 weights, merging projections, and writing quantized checkpoints.

Policy (measured on the built-in model, see the README's "Quantized weights"): every
projection of every layer takes the chosen format; the output head (in Gemma also the
embedding, the same table) takes q8 under both q8 and q4, as llama.cpp keeps its output at
higher precision, since the head's errors reach every logit directly. ``head="dense"``
keeps it in the model's dtype, ``head="q4"`` saves a little more memory. An untied embedding
(Mistral) is only looked up, never read whole per token, and stays dense.

A quantized checkpoint is a Hugging Face directory whose ``config.json`` carries
``"swattn_quantization": {"weights": ..., "head": ..., "version": 1}`` and whose
``model.safetensors`` holds each quantized layer as ``<name>.qweight`` and ``<name>.scales``
(the panel layout of :mod:`swattn.quant`) instead of ``<name>.weight``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from swattn import quant
from swattn.models.layers import QuantEmbedding, QuantLinear
from swattn.models.transformer import projection_groups

WEIGHTS = quant.FORMATS
HEADS = ("q8", "q4", "dense")
DEFAULT_HEAD = {"q8": "q8", "q4": "q8"}
CONFIG_KEY = "swattn_quantization"
VERSION = 1
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def check(weights: str | None, head: str | None) -> tuple[str | None, str | None]:
    """Validates a (weights, head) choice and fills the default head; gives ``(weights, head)``."""
    if weights is None:
        if head is not None:
            raise ValueError("head= applies to quantized weights only (give weights='q8' or 'q4')")
        return None, None
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    head = DEFAULT_HEAD[weights] if head is None else head
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    return weights, head


def restructure(model: nn.Module, weights: str, head: str) -> list[str]:
    """Replaces the model's dense linear layers (and head) by empty quantized ones; gives the names left dense.

    Run on a model built on the meta device, before its storage is allocated.
    """
    dense: list[str] = []
    for i, block in enumerate(model.layers):
        for part, names in PROJECTIONS.items():
            owner = getattr(block, part)
            for name in names:
                layer = getattr(owner, name)
                if quant.supports((layer.out_features, layer.in_features)):
                    setattr(owner, name, QuantLinear(layer.in_features, layer.out_features, weights))
                else:
                    dense.append(f"layers.{i}.{part}.{name}")
    cfg = model.cfg
    if head != "dense":
        if not quant.supports((cfg.vocab_size, cfg.hidden_size)):
            dense.append("lm_head")
        elif model.lm_head is None:
            model.embed_tokens = QuantEmbedding(cfg.vocab_size, cfg.hidden_size, head, model.embed_tokens.weight.dtype)
        else:
            model.lm_head = QuantLinear(cfg.hidden_size, cfg.vocab_size, head)
    model.weights = weights
    return dense


def fuse_projections(model: nn.Module) -> None:
    """Merges each layer's quantized q/k/v and gate/up projections into one product each (inference).

    One pass over the input and one call instead of three (two); the separate modules are
    dropped, so the model's state dict then names the merged ones.
    """
    for owner, merged, names in list(projection_groups(model)):
        parts = [getattr(owner, n) for n in names]
        if all(isinstance(p, QuantLinear) and p.out_features % quant.LANES == 0 for p in parts):
            setattr(owner, merged, QuantLinear.fused(parts))
            for n in names:
                delattr(owner, n)


def write_checkpoint(src: str | Path, out: str | Path, weights: str, head: str | None = None,
                     dtype: torch.dtype | str | None = None, progress: bool = False) -> dict:
    """Writes a quantized copy of checkpoint ``src`` into directory ``out``; gives a summary.

    Tensors are read, quantized and released one at a time from the memory-mapped source, so
    memory holds about the quantized model plus one tensor. Tokenizer, generation config and
    chat template files are copied as they are.

    Returns:
        ``{"tensors": quantized count, "dense": names left dense, "bytes": size written,
        "source_bytes": size of the source's tensors}``.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from swattn.models.loading import load

    weights, head = check(weights, head)
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must differ from --model (the source is read while the copy is written)")
    model = load(src, dtype=dtype, weights=weights, head=head, fuse=False, prepack=False)
    tensors: dict[str, torch.Tensor] = {}
    count = 0
    items = list(model.state_dict().items())
    for name, t in tqdm(items, desc="writing", unit="tensor", disable=not progress, leave=False):
        key = name if name.startswith("lm_head") else f"model.{name}"
        tensors[key] = t.contiguous()
        count += name.endswith(".qweight")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text(encoding="utf-8"))
    raw[CONFIG_KEY] = {"weights": weights, "head": head, "version": VERSION}
    raw["torch_dtype"] = raw["dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    for file in src.iterdir():
        if file.is_file() and file.name not in ("config.json", "model.safetensors", "model.safetensors.index.json") \
                and not file.name.endswith(".safetensors"):
            shutil.copy2(file, out / file.name)
    source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return {"tensors": count, "dense": model.dense_layers, "bytes": (out / "model.safetensors").stat().st_size,
            "source_bytes": source_bytes}
