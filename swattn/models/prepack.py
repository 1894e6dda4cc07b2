"""Prepacking a model's bf16 linear layers for inference, and undoing it.

:func:`prepack` swaps every :class:`~swattn.models.layers.Linear` whose weight can be prepacked
(bf16, on a CPU whose oneDNN has bf16 arithmetic) for a
:class:`~swattn.models.layers.PrepackedLinear` holding the weight in oneDNN's blocked layout:
the same memory, faster products at every row count (decoding, batches, prefill). ``swattn.load``
does it by default for bf16 models (``prepack=``, ``SWATTN_PREPACK=0|1``). The tied output head
stays plain, since the embedding lookup reads the same table. :func:`unpack` turns the layers back
into trainable :class:`Linear` ones.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from swattn.models.layers import Linear, PrepackedLinear
from swattn.ops import linear

ENV = "SWATTN_PREPACK"


def wanted(dtype: torch.dtype, prepack: bool | None) -> bool:
    """Whether a model of ``dtype`` is prepacked: ``prepack`` if given, else ``SWATTN_PREPACK``, else
    whenever it can be (bf16 on a CPU with oneDNN's bf16 arithmetic)."""
    if prepack is not None and not isinstance(prepack, bool):
        raise ValueError(f"prepack must be True, False or None, got {prepack!r}")
    if prepack is None:
        env = os.environ.get(ENV, "auto")
        if env not in ("0", "1", "auto"):
            raise ValueError(f"{ENV} must be 0, 1 or auto; got {env!r}")
        if env != "auto":
            prepack = env == "1"
    possible = linear.can_prepack(torch.empty(1, 1, dtype=dtype))
    if prepack and not possible:
        raise ValueError(f"prepacked weights need a bf16 model on a CPU with oneDNN's bf16 arithmetic (model: {dtype})")
    return possible if prepack is None else prepack


def prepack(model: nn.Module) -> int:
    """Replaces the model's prepackable :class:`Linear` layers in place; gives how many were replaced."""
    # (owner, name) pairs, not the layers themselves: each plain weight is freed as soon as its
    # packed copy replaces it, so memory peaks at the model plus one weight (given that nothing
    # else holds the weights: swattn.load drops its references first)
    targets = [(owner, name) for owner in model.modules() for name, child in owner.named_children()
               if type(child) is Linear and linear.can_prepack(child.weight)]
    for owner, name in targets:
        setattr(owner, name, PrepackedLinear(getattr(owner, name).weight))
    return len(targets)


def unpack(model: nn.Module) -> int:
    """Turns the model's :class:`PrepackedLinear` layers back into :class:`Linear` ones (weights not
    requiring gradients, as ``swattn.load`` gives them); gives how many."""
    count = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if isinstance(child, PrepackedLinear):
                with torch.device("meta"):
                    plain = Linear(child.in_features, child.out_features)
                plain.weight = nn.Parameter(child.dense_weight(), requires_grad=False)
                setattr(owner, name, plain)
                count += 1
    return count
