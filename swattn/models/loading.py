"""Loading Hugging Face checkpoints: config.json and safetensors (single file or sharded).

Safetensors only: nothing is unpickled and no code from a checkpoint runs. Tensors are
copied one at a time from the memory-mapped files into the model's parameters, so the
weights are never held twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from swattn import dtypes
from swattn.models import prepack as prepacking
from swattn.models import quantize
from swattn.models.config import ModelConfig
from swattn.models.layers import QuantLinear
from swattn.models.transformer import CausalLM

# Where multimodal Gemma 3 checkpoints keep the language model: transformers >= 4.52 writes
# model.language_model.*, older ones language_model.model.* (its head: language_model.lm_head)
TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# The built-in model: a small Gemma 2 trained by ``swattn train`` on Python's standard library
BUILTIN = Path(__file__).resolve().parent.parent / "builtin_model"


def _shards(path: Path) -> dict[str, Path]:
    """Maps each tensor name to the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    try:
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as exc:
        raise ValueError(f"{single} is not a readable safetensors file (truncated?): {exc}") from exc


def load(path: str | Path | None = None, dtype: torch.dtype | str | None = None, weights: str | None = None,
         head: str | None = None, fuse: bool = True, kv_dtype: torch.dtype | str | None = None,
         prepack: bool | None = None) -> CausalLM:
    """Loads a Gemma 2, Gemma 3 (text, or the text model of a multimodal one) or Mistral checkpoint directory.

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` (or sharded files
            with ``model.safetensors.index.json``); None: the built-in model (``BUILTIN``).
        dtype: ``torch.float32`` or ``torch.bfloat16`` (or their names); None: the
            checkpoint's own (config.json's ``dtype``/``torch_dtype``; float16 runs as float32).
        weights: ``"q8"`` or ``"q4"``: quantize the linear layers while loading, tensor by
            tensor (see :mod:`swattn.quant`); None: as stored (dense, or a checkpoint written
            by ``swattn quantize``, which loads without quantizing again).
        head: the output head's (and tied embedding's) format under quantized weights:
            ``"q8"`` (default), ``"q4"`` or ``"dense"``.
        fuse: merge each layer's q/k/v and gate/up projections into one product each
            (quantized or prepacked layers; inference only).
        kv_dtype: what the model's caches store keys and values as by default: ``"bf16"``,
            ``"fp16"``, ``"int8"`` (a scale per token and head) or ``"fp32"``; None: its dtype.
        prepack: hold the dense bf16 linear layers in oneDNN's blocked layout
            (:mod:`swattn.models.prepack`: the same memory, faster products, inference only);
            None: ``SWATTN_PREPACK`` (``0``/``1``) if set, else whenever the model is bf16 and the
            CPU's oneDNN has bf16 arithmetic.

    Returns:
        The model in eval mode, ready for inference: no parameter requires a gradient, so a
        direct ``model(ids)`` builds no autograd graph (to fine-tune, turn them on:
        ``model.requires_grad_(True)``, as ``swattn train --init`` does). Its config is
        ``model.cfg``, its tokenizer (from ``tokenizer.json``, or None) ``model.tokenizer``, its
        stop token ids (from ``generation_config.json``, else ``config.json``)
        ``model.stop_tokens``, the tensors it did not load (a multimodal checkpoint's vision
        tower) ``model.skipped_tensors``.

    Raises:
        FileNotFoundError: a missing file. ValueError: an unknown model type, a setting swattn
        does not implement, a missing, unexpected or misshapen tensor, or an unreadable (e.g.
        truncated) file, named.
    """
    path = BUILTIN if path is None else Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    cfg = ModelConfig.from_hf_config(raw)
    dtype = dtypes.checkpoint_dtype(raw) if dtype is None else dtypes.model_dtype(dtype)
    stored = raw.get(quantize.CONFIG_KEY)
    if stored is not None:
        if not isinstance(stored, dict) or stored.get("version") != quantize.VERSION:
            raise ValueError(f"{config_file}: {quantize.CONFIG_KEY} is not one this swattn reads (version "
                             f"{quantize.VERSION})")
        if weights not in (None, stored.get("weights")) or head not in (None, stored.get("head")):
            raise ValueError(f"{path} holds {stored.get('weights')} weights with a {stored.get('head')} head; load it "
                             "as it is (no --weights) or quantize the dense checkpoint instead")
        weights, head = stored.get("weights"), stored.get("head")
    weights, head = quantize.check(weights, head)
    kv_dtype = dtypes.kv_dtype(kv_dtype)
    prepack = prepacking.wanted(dtype, prepack)
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)
        dense_layers = quantize.restructure(model, weights, head) if weights else []
    model = model.to_empty(device="cpu")  # allocated once, filled below
    params = {_our_name(name): p for name, p in model.state_dict().items()}
    # a dense checkpoint's weights that are quantized on the way in, by the checkpoint's name
    to_quantize = {}
    if weights and stored is None:
        for module_name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                params.pop(_our_name(f"{module_name}.qweight"))
                params.pop(_our_name(f"{module_name}.scales"))
                to_quantize[_our_name(f"{module_name}.weight")] = module
    located = _shards(path)
    source = {name: _stored_name(name, located) for name in [*params, *to_quantize]}
    missing = sorted(name for name, stored in source.items() if stored is None)
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    used = set(source.values())
    skipped = sorted(name for name in located if name.startswith(SKIPPED_PREFIXES))
    tied_head = set(HEAD_NAMES) if cfg.tie_embeddings else set()
    unexpected = sorted(set(located) - used - set(skipped) - tied_head)
    if unexpected:
        raise ValueError(f"checkpoint {path} has unexpected tensors: {', '.join(unexpected[:5])}")
    by_file: dict[Path, list[str]] = {}
    for name in source:
        by_file.setdefault(located[source[name]], []).append(name)
    from tqdm import tqdm

    shards = tqdm(by_file.items(), desc="loading shards", unit="shard", leave=False,
                  disable=len(by_file) < 2 or not sys.stderr.isatty())
    for file, names in shards:
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(source[name])
                    if name in to_quantize:
                        to_quantize[name].set_weight(tensor)
                        continue
                    if tensor.shape != params[name].shape:
                        raise ValueError(f"tensor {source[name]} in {file.name} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(params[name].shape)}")
                    with torch.no_grad():
                        params[name].copy_(tensor)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{file} is not a readable safetensors file (truncated?): {exc}") from exc
    model.requires_grad_(False)
    if weights and fuse:
        quantize.fuse_projections(model)
    if prepack:
        del params  # its references would keep every plain weight alive while packed copies are made
        prepacking.prepack(model, merge=fuse)
    model.dense_layers = dense_layers
    model.kv_dtype = kv_dtype
    model.path = path
    model.skipped_tensors = skipped
    model.tokenizer = _tokenizer(path)
    model.stop_tokens = _stop_tokens(path, cfg)
    return model.eval()


def _our_name(name: str) -> str:
    """A state-dict name as checkpoints spell it (``model.`` prefix; ``lm_head.*`` as is)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def _stored_name(name: str, located: dict[str, Path]) -> str | None:
    """The checkpoint's name for our parameter ``name`` (``model.X`` or ``lm_head.weight``), or None."""
    if name == "lm_head.weight":
        return next((n for n in HEAD_NAMES if n in located), None)
    if name.startswith("lm_head"):
        return name if name in located else None
    rest = name.removeprefix("model.")
    return next((prefix + rest for prefix in TEXT_PREFIXES if prefix + rest in located), None)


def _tokenizer(path: Path):
    """The checkpoint's ``tokenizer.json`` through the ``tokenizers`` package, or None if absent."""
    file = path / "tokenizer.json"
    if not file.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises its own Exception type
        raise ValueError(f"{file} is not a readable tokenizer: {exc}") from None


def _stop_tokens(path: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """Stop tokens: ``generation_config.json``'s eos ids (instruction-tuned Gemma adds <end_of_turn>), else config's."""
    file = path / "generation_config.json"
    try:
        eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id") if file.exists() else None
    except ValueError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from None
    if eos is None:
        return cfg.eos_token_ids
    return tuple(eos if isinstance(eos, list) else [eos])
