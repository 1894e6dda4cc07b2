"""Block-quantized weight formats: q8 (llama.cpp's Q8_0 arithmetic) and q4 (Q4_0's), in plain PyTorch.

A weight ``W`` ``(out_features N, in_features K)`` is cut along ``K`` into blocks of 32
values, each stored as small integers and one float16 scale:

- **q8**: ``q`` in -127..127, ``w = scale * q``, ``scale = max|w| / 127`` per block
  (8.5 bits per weight, as Q8_0).
- **q4**: ``q`` in 0..15, ``w = scale * (q - 8)``, ``scale = -m / 8`` where ``m`` is the
  block's value of largest magnitude, which so maps exactly to -8 (4.5 bits per weight, as
  Q4_0).

Storage is laid out for the kernels (``ops/csrc/swattn_linear.cpp``): the output features
are taken in panels of 16 (the last padded with zero rows), and within a panel the bytes of
block ``b`` come as 64-byte vectors, each holding 4 consecutive values of all 16 features:

- q8: ``qweight[P, ((b*8 + j)*16 + l)*4 + t] = q[16P + l, 32b + 4j + t] + 128`` (uint8);
- q4: ``qweight[P, ((b*4 + j)*16 + l)*4 + t] = q[.., 32b + 4j + t] | q[.., 32b + 4(j+4) + t] << 4``;
- ``scales[P, b*16 + l]`` is the scale of feature ``16P + l``'s block ``b``.

So ``qweight`` is uint8 ``(ceil(N/16), 16 K bits/8)`` and ``scales`` float16
``(ceil(N/16), K/2)``. ``K`` must be a multiple of 64 (true of every Gemma and Mistral
projection); :func:`supports` says whether a shape is. These functions are the formats'
definition, against which the kernels are tested.
"""

from __future__ import annotations

import torch

FORMATS = ("q8", "q4")
BITS = {"q8": 8, "q4": 4}
BLOCK = 32
GROUP = 64  # in_features must be a multiple of this
LANES = 16  # output features per panel


def supports(shape: tuple[int, ...]) -> bool:
    """Whether a 2-D weight of this shape can be quantized (``in_features`` a multiple of 64)."""
    return len(shape) == 2 and shape[1] % GROUP == 0 and shape[1] > 0


def _blocks(w: torch.Tensor) -> torch.Tensor:
    if not supports(tuple(w.shape)):
        raise ValueError(f"cannot quantize a weight of shape {tuple(w.shape)}: in_features must be a multiple of {GROUP}")
    return w.detach().float().reshape(w.shape[0], -1, BLOCK)  # (N, K/32, 32)


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives ``(qweight, scales)`` of weight ``w`` ``(N, K)`` in format ``fmt`` ("q8" or "q4"), laid out in panels."""
    q, scale = quantize_values(w, fmt)
    return interleave(q, fmt), interleave_scales(scale)


def quantize_values(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers ``q`` ``(N, K)`` int16 (q8: -127..127; q4: 0..15) and scales ``(N, K/32)`` float16."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose from {', '.join(FORMATS)}")
    blocks = _blocks(w)
    if fmt == "q8":
        # the values are rounded against the scale as stored (float16)
        scale = (blocks.abs().amax(-1) / 127).half()
        inv = torch.where(scale > 0, 1.0 / scale.float(), torch.zeros((), dtype=torch.float32))
        q = torch.round(blocks * inv.unsqueeze(-1)).clamp_(-127, 127)
    else:
        idx = blocks.abs().argmax(-1, keepdim=True)
        extreme = blocks.gather(-1, idx).squeeze(-1)  # the signed value of largest magnitude
        scale = (extreme / -8).half()
        inv = torch.where(scale != 0, 1.0 / scale.float(), torch.zeros((), dtype=torch.float32))
        q = (torch.round(blocks * inv.unsqueeze(-1)) + 8).clamp_(0, 15)
    return q.to(torch.int16).reshape(w.shape), scale


def _panels(t: torch.Tensor) -> torch.Tensor:
    """Pads the rows of ``t`` ``(N, ...)`` with zeros to a multiple of 16."""
    pad = -t.shape[0] % LANES
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


def interleave(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """Integers ``(N, K)`` (as from :func:`quantize_values`) in the kernels' panel layout (uint8)."""
    q = _panels(q + 128 if fmt == "q8" else q)
    panels, k = q.shape[0] // LANES, q.shape[1]
    v = q.reshape(panels, LANES, k // BLOCK, 8, 4).permute(0, 2, 3, 1, 4)  # (P, b, j, l, t)
    if fmt == "q4":
        v = v[:, :, :4] | (v[:, :, 4:] << 4)
    return v.to(torch.uint8).reshape(panels, -1).contiguous()


def interleave_scales(scale: torch.Tensor) -> torch.Tensor:
    """Scales ``(N, K/32)`` in the panel layout ``(ceil(N/16), K/2)``."""
    s = _panels(scale)
    return s.reshape(-1, LANES, s.shape[1]).transpose(1, 2).reshape(s.shape[0] // LANES, -1).contiguous()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, fmt: str, n: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight ``(n, K)`` in ``dtype`` that ``(qweight, scales)`` stand for."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}")
    panels = qweight.shape[0]
    k = qweight.shape[1] * 8 // (LANES * BITS[fmt])
    v = qweight.reshape(panels, k // BLOCK, -1, LANES, 4).to(torch.int16)  # (P, b, j, l, t)
    if fmt == "q4":
        v = torch.cat([v & 0x0F, v >> 4], dim=2) - 8
    else:
        v = v - 128
    q = v.permute(0, 3, 1, 2, 4).reshape(panels * LANES, k)  # (N padded, K)
    s = scales.reshape(panels, k // BLOCK, LANES).transpose(1, 2).reshape(panels * LANES, k // BLOCK)
    w = q.float().reshape(panels * LANES, -1, BLOCK) * s.float().unsqueeze(-1)
    return w.reshape(panels * LANES, k)[:n].to(dtype)


def bytes_per_weight(fmt: str) -> float:
    """Bytes stored per weight value (values and scales)."""
    return {"q8": 34 / 32, "q4": 18 / 32}[fmt]
