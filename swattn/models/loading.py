"""Loading Hugging Face checkpoints: config.json and safetensors (single file or sharded).

Safetensors only: nothing is unpickled and no code from a checkpoint runs. Tensors are
copied one at a time from the memory-mapped files into the model's parameters, so the
weights are never held twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from swattn.models.config import ModelConfig
from swattn.models.transformer import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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


def load(path: str | Path | None = None, dtype: torch.dtype | str | None = None) -> CausalLM:
    """Loads a Gemma 2, Gemma 3 (text) or Mistral checkpoint directory.

    Args:
        path: a directory with ``config.json`` and ``model.safetensors`` (or sharded files
            with ``model.safetensors.index.json``); None: the built-in model (``BUILTIN``).
        dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (or their names).

    Returns:
        The model in eval mode, ready for inference: no parameter requires a gradient, so a
        direct ``model(ids)`` builds no autograd graph (to fine-tune, turn them on:
        ``model.requires_grad_(True)``, as ``swattn train --init`` does). Its config is ``model.cfg``, its tokenizer (from
        ``tokenizer.json``, or None) ``model.tokenizer``, its stop token ids (from
        ``generation_config.json``, else ``config.json``) ``model.stop_tokens``.

    Raises:
        FileNotFoundError: a missing file. ValueError: an unknown model type, a missing,
        unexpected or misshapen tensor, or an unreadable (e.g. truncated) file, named.
    """
    path = BUILTIN if path is None else Path(path)
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) or dtype is None else dtype
    dtype = dtype or torch.float32
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found")
    cfg = ModelConfig.from_hf_config(json.loads(config_file.read_text()))
    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)  # allocated once, filled below
    params = {f"model.{name}" if not name.startswith("lm_head") else name: p for name, p in model.state_dict().items()}
    located = _shards(path)
    missing = sorted(set(params) - set(located))
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(located) - set(params) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if unexpected:
        raise ValueError(f"checkpoint {path} has unexpected tensors: {', '.join(unexpected[:5])}")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(located[name], []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    if tensor.shape != params[name].shape:
                        raise ValueError(
                            f"tensor {name} in {file.name} has shape {tuple(tensor.shape)}, expected {tuple(params[name].shape)}"
                        )
                    with torch.no_grad():
                        params[name].copy_(tensor)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"{file} is not a readable safetensors file (truncated?): {exc}") from exc
    model.requires_grad_(False)
    model.path = path
    model.tokenizer = _tokenizer(path)
    model.stop_tokens = _stop_tokens(path, cfg)
    return model.eval()


def _tokenizer(path: Path):
    """The checkpoint's ``tokenizer.json`` through the ``tokenizers`` package, or None if absent."""
    file = path / "tokenizer.json"
    if not file.exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))


def _stop_tokens(path: Path, cfg: ModelConfig) -> tuple[int, ...]:
    """Stop tokens: ``generation_config.json``'s eos ids (instruction-tuned Gemma adds <end_of_turn>), else config's."""
    file = path / "generation_config.json"
    eos = json.loads(file.read_text()).get("eos_token_id") if file.exists() else None
    if eos is None:
        return cfg.eos_token_ids
    return tuple(eos if isinstance(eos, list) else [eos])
