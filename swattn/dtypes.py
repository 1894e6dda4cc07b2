"""The one table of dtypes swattn supports, and where.

- ``MODEL``: what models load and run in (``swattn.load``, ``--dtype``).
- ``KERNEL``: what the CPU attention kernel takes (float16 works; CPUs have no fast float16 arithmetic).
- ``ATTENTION``: what the op accepts at all (float64: the oracle's precision, on the blocked path).
- ``KV``: what caches may store keys and values as (``kv_dtype``, ``--kv-dtype``); int8 with a
  float scale per token and head.
"""

from __future__ import annotations

import torch

NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                 "float64": torch.float64}
MODEL = (torch.float32, torch.bfloat16)
KERNEL = (torch.float32, torch.bfloat16, torch.float16)
ATTENTION = (*KERNEL, torch.float64)
MODEL_NAMES = tuple(name for name, dtype in NAMES.items() if dtype in MODEL)


def name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def model_dtype(value: torch.dtype | str) -> torch.dtype:
    """A model dtype from a dtype or its name; ValueError naming the choices otherwise."""
    dtype = NAMES.get(value) if isinstance(value, str) else value
    if dtype not in MODEL:
        raise ValueError(f"dtype must be one of {', '.join(MODEL_NAMES)}, got {value!r}")
    return dtype


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype a checkpoint is stored in (config.json's ``dtype``/``torch_dtype``), as a model dtype.

    bfloat16 and float32 checkpoints run as stored; float16 ones run in float32 (CPUs lack
    fast float16 arithmetic, and bfloat16 would drop three mantissa bits); unknown: float32.
    """
    stored = config.get("dtype") or config.get("torch_dtype")
    if isinstance(stored, str) and NAMES.get(stored) in MODEL:
        return NAMES[stored]
    return torch.float32

# the benchmarks' short names for the model dtypes
SHORT: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

KV: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def kv_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A cache storage dtype from a dtype or its name (fp32, bf16, fp16, int8, or torch's names); None stays None."""
    if value is None:
        return None
    dtype = KV.get(value, NAMES.get(value)) if isinstance(value, str) else value
    if dtype not in KV.values():
        raise ValueError(f"kv_dtype must be one of {', '.join(KV)}, got {value!r}")
    return dtype
