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
from swattn.models.transformer import MERGED_PARTS, projection_groups
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


def prepack(model: nn.Module, merge: bool = True) -> int:
    """Replaces the model's prepackable :class:`Linear` layers in place; gives how many were replaced.

    ``merge``: each layer's q/k/v and gate/up projections become one prepacked layer each (one
    product per group: a decode step of the benchmark model 5% faster, prefill unchanged). Its
    state dict then names the merged layers; :func:`unpack` and
    :func:`swattn.models.saving.state_dict_hf` give the separate ones back.
    """
    # plain weights are dropped as soon as their packed copy exists, so memory peaks at the
    # model plus one group's weights twice (given that nothing else holds the weights:
    # swattn.load drops its references first)
    count = 0
    for owner, merged, names in list(projection_groups(model)) if merge else []:
        if all(_packable(getattr(owner, n)) for n in names):
            weights = [getattr(owner, n).weight for n in names]
            for n in names:
                delattr(owner, n)
            setattr(owner, merged, PrepackedLinear.fused(weights))
            count += len(weights)
            del weights
    targets = [(owner, name) for owner in model.modules() for name, child in owner.named_children() if _packable(child)]
    for owner, name in targets:
        setattr(owner, name, PrepackedLinear(getattr(owner, name).weight))
    return count + len(targets)


def unpack(model: nn.Module) -> int:
    """Turns the model's :class:`PrepackedLinear` layers back into :class:`Linear` ones (weights not
    requiring gradients, as ``swattn.load`` gives them), merged projections into their separate
    layers again; gives how many :class:`Linear` layers result."""
    count = 0
    for owner in list(model.modules()):
        for name, child in list(owner.named_children()):
            if not isinstance(child, PrepackedLinear):
                continue
            names = MERGED_PARTS[name] if child.parts else (name,)
            for part, weight in zip(names, child.split_weights(), strict=True):
                with torch.device("meta"):
                    plain = Linear(child.in_features, weight.shape[0])
                plain.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
                setattr(owner, part, plain)
                count += 1
            if child.parts:
                setattr(owner, name, None)
    return count


def _packable(layer: nn.Module) -> bool:
    return type(layer) is Linear and linear.can_prepack(layer.weight)
