"""The model's linear layers: dense (``Linear``), prepacked (``PrepackedLinear``) or block-quantized
(``QuantLinear``), and a quantized tied embedding.

All go through :mod:`swattn.ops.linear`, which picks the few-row kernels for decoding and
PyTorch's product for prefill and training. The quantized modules hold their weight in the
panel layout of :mod:`swattn.quant` (buffers ``qweight`` and ``scales``), the prepacked ones in
oneDNN's blocked layout; both are for inference only.
"""

from __future__ import annotations

import torch
from torch import nn

from swattn import quant
from swattn.ops import linear

QUANT_CHUNK = 4096  # rows quantized at a time while loading: bounds the float32 working copy


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose few-row inference products use swattn's streaming kernel."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear.dense(x, self.weight)

    def row_product(self, rows: int, x: torch.Tensor) -> tuple[int, torch.Tensor, None, int]:
        """How :meth:`forward` multiplies ``rows`` rows like ``x``, for the compiled decode step:
        ``(kind, weight, scales, out_features)`` (kinds: :mod:`swattn.ops.linear`)."""
        return linear.dense_kind(rows, x, self.weight), self.weight, None, self.out_features


class PrepackedLinear(nn.Module):
    """A bias-free bf16 linear layer for inference whose weight lives in oneDNN's blocked layout.

    It replaces a :class:`Linear` (the same bytes: the plain weight is not kept) and multiplies
    faster at every row count (see :mod:`swattn.ops.linear`). ``forward(x)``: ``x``
    ``(..., in_features)`` bf16 gives ``(..., out_features)``. ``state_dict()`` holds the plain
    ``weight`` (so saving and ``load_state_dict`` work as for :class:`Linear`); copies and pickles
    go through it too. No autograd: a forward that needs gradients raises.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._pack(weight)
        self.parts: tuple[int, ...] | None = None  # out_features of the layers a fused one stands for

    @classmethod
    def fused(cls, weights: list[torch.Tensor]) -> PrepackedLinear:
        """One layer computing several weights ``(n_i, K)`` side by side: one product, output ``(..., sum n_i)``.

        :meth:`split_weights` gives the parts back (for unpacking and saving).
        """
        out = cls(torch.cat(weights))
        out.parts = tuple(w.shape[0] for w in weights)
        return out

    def split_weights(self) -> list[torch.Tensor]:
        """Plain copies of the weights this layer computes side by side (one if it is not fused)."""
        weight = self.dense_weight()
        return list(weight.split(self.parts)) if self.parts else [weight]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked bf16"

    def dense_weight(self) -> torch.Tensor:
        """A plain copy of the weight ``(out_features, in_features)``."""
        return self.packed.to_dense()

    def _pack(self, weight: torch.Tensor) -> None:
        # the panel view aliases the packed tensor's memory: the two are only ever set together
        self.packed = linear.prepack(weight)
        self.panel_view = linear.panels(self.packed, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("this layer's weight is prepacked for inference and has no gradient; load the model "
                               "with prepack=False (or call swattn.models.prepack.unpack(model)) to train it")
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            raise ValueError(f"a prepacked layer takes bf16 input on the CPU, got {x.dtype} on {x.device}")
        return linear.prepacked(x, self.packed, self.panel_view)

    def row_product(self, rows: int, x: torch.Tensor) -> tuple[int, torch.Tensor, None, int] | None:
        """As :meth:`Linear.row_product` (None: ``x`` is no input this layer takes)."""
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return None
        if linear.panel_kind(rows, x, self.panel_view) == linear.PANEL_KERNEL:
            return linear.PANEL_KERNEL, self.panel_view, None, self.out_features
        return linear.ONEDNN, self.packed, None, self.out_features

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dense_weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        elif tuple(state_dict[key].shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}, "
                              f"the shape in current model is {(self.out_features, self.in_features)}.")
        else:
            self._pack(state_dict[key].to(torch.bfloat16))

    def _apply(self, fn, recurse=True):
        # .to(), .float() and friends: the opaque tensor is no parameter, so convert it here;
        # anything but bf16 on the CPU has no prepacked form
        weight = fn(self.dense_weight())
        if not linear.can_prepack(weight):
            raise ValueError(f"prepacked weights stay bf16 on the CPU (asked for {weight.dtype} on {weight.device}); "
                             "call swattn.models.prepack.unpack(model) first")
        self._pack(weight)
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state["packed"] = self.dense_weight()  # the opaque tensor has no storage to copy or pickle
        state["panel_view"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._pack(self.packed)


class QuantLinear(nn.Module):
    """A bias-free linear layer with a q8 or q4 weight ``(out_features, in_features)`` (see :mod:`swattn.quant`).

    ``forward(x)``: ``x`` ``(..., in_features)`` float32 or bfloat16 gives ``(..., out_features)``
    in x's dtype. Several layers that read the same input can be merged into one product
    (:meth:`fused`), whose output holds theirs side by side.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str):
        super().__init__()
        if fmt not in quant.FORMATS:
            raise ValueError(f"weights must be one of {', '.join(quant.FORMATS)}, got {fmt!r}")
        if not quant.supports((out_features, in_features)):
            raise ValueError(f"cannot quantize a ({out_features}, {in_features}) weight: in_features must be a "
                             f"multiple of {quant.GROUP}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        panels = -(-out_features // quant.LANES)
        self.register_buffer("qweight", torch.zeros(panels, in_features * quant.LANES * quant.BITS[fmt] // 8,
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(panels, in_features // 2, dtype=torch.float16))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.fmt}"

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantizes a dense ``weight`` ``(out_features, in_features)`` into this layer, a few thousand rows at a time."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        for start in range(0, self.out_features, QUANT_CHUNK):
            q, s = quant.quantize(weight[start : start + QUANT_CHUNK], self.fmt)
            first = start // quant.LANES
            self.qweight[first : first + q.shape[0]] = q
            self.scales[first : first + s.shape[0]] = s

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight this layer stands for, ``(out_features, in_features)``."""
        return quant.dequantize(self.qweight, self.scales, self.fmt, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear.quantized(x, self.qweight, self.scales, self.fmt, self.out_features)

    def row_product(self, rows: int, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, int] | None:
        """As :meth:`Linear.row_product` (None: more rows than the quantized kernel takes)."""
        if not linear.few_rows(rows, x):
            return None
        return quant.BITS[self.fmt], self.qweight, self.scales, self.out_features

    def expanded(self, like: torch.Tensor):
        """This layer with its weight dequantized (to ``like``'s dtype) once, for many inputs: a
        function ``x`` ``(..., in_features)`` -> ``(..., out_features)`` that holds the dense weight."""
        panels = linear.expand_quantized(self.qweight, self.scales, self.fmt, self.out_features, like)
        return lambda x: linear.expanded_product(x, panels, self.out_features)

    @classmethod
    def fused(cls, parts: list[QuantLinear]) -> QuantLinear:
        """One layer computing ``parts`` side by side (each's out_features a multiple of 16, one format and input)."""
        first = parts[0]
        if any(p.fmt != first.fmt or p.in_features != first.in_features or p.out_features % quant.LANES
               for p in parts):
            raise ValueError("fused layers need one format, one input size and out_features multiples of 16")
        with torch.device("meta"):
            out = cls(first.in_features, sum(p.out_features for p in parts), first.fmt)
        out.qweight = torch.cat([p.qweight for p in parts])
        out.scales = torch.cat([p.scales for p in parts])
        return out


class QuantEmbedding(QuantLinear):
    """A tied embedding and output head in one quantized table ``(vocab_size, hidden_size)``.

    ``forward(ids)`` looks rows up (dequantized to ``dtype``); :meth:`project` is the head.
    """

    def __init__(self, vocab_size: int, hidden_size: int, fmt: str, dtype: torch.dtype):
        super().__init__(hidden_size, vocab_size, fmt)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() <= linear.SMALL_ROWS and flat.device.type == "cpu" and linear.kernels():
            return self._few(flat).view(*ids.shape, self.in_features)
        outside = (flat < 0) | (flat >= self.out_features)
        if bool(outside.any()):  # indexing the panels would wrap a negative id around to another token's row
            raise self._out_of_range(int(flat[outside][0]))
        panel, lane = flat // quant.LANES, flat % quant.LANES
        blocks = self.in_features // quant.BLOCK
        # only the ids' own bytes: (panels, block, vector, lane, 4) indexed at (panel, lane)
        raw = self.qweight.view(self.qweight.shape[0], blocks, -1, quant.LANES, 4)[panel, :, :, lane]
        raw = raw.to(torch.int16)  # (tokens, block, vectors, 4)
        values = raw - 128 if self.fmt == "q8" else torch.cat([raw & 0x0F, raw >> 4], dim=2) - 8
        scale = self.scales.view(-1, blocks, quant.LANES)[panel, :, lane].float()  # (tokens, block)
        rows = values.reshape(flat.numel(), blocks, quant.BLOCK).float() * scale.unsqueeze(-1)
        return rows.to(self.dtype).view(*ids.shape, self.in_features)

    def _few(self, flat: torch.Tensor) -> torch.Tensor:
        """A decode step's few rows ``(n, hidden)``, dequantized by the compiled kernel in one call
        (the same values; the indexing above costs 0.2 ms per step at a 256k vocabulary, and a
        call per id 58 us for 8 ids)."""
        for i in flat.tolist():
            if not 0 <= i < self.out_features:
                raise self._out_of_range(i)
        like = torch.empty(0, dtype=self.dtype)
        ids = flat.contiguous() if flat.dtype == torch.int64 else flat.long()
        return torch.ops.swattn.dequantize_rows(self.qweight, self.scales, quant.BITS[self.fmt], ids,
                                                self.out_features, like)

    def _out_of_range(self, i: int) -> IndexError:
        return IndexError(f"index {i} is out of range for an embedding of {self.out_features} rows")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The head: ``x`` ``(..., hidden_size)`` gives ``(..., vocab_size)``."""
        return super().forward(x)
