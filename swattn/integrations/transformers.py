"""swattn as an attention implementation inside Hugging Face transformers.

``register_with_transformers()`` registers the name ``"swattn"`` with transformers'
``AttentionInterface``; then ``from_pretrained(..., attn_implementation="swattn")`` (or
``model.set_attn_implementation("swattn")``) runs every attention layer through
:func:`swattn.sliding_window_attention`: local layers with their window, global layers
causal, the layer's soft-cap and scaling, K/V heads never repeated, and a backward. It also
registers a mask builder under the same name, so that layers receive key and query
positions (:func:`_positions_mask`) rather than a (queries x keys) boolean mask.
transformers stays optional: nothing here is imported by ``import swattn``.
"""

from __future__ import annotations

import torch

from swattn.ops.api import sliding_window_attention
from swattn.window import visible

NAME = "swattn"
MIN_VERSION = (5, 0)


def _closure(fn) -> dict:
    """A closure's captured variables by name."""
    cells = getattr(fn, "__closure__", None) or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def mask_pattern(mask_function) -> tuple[str, int | None]:
    """Which pattern transformers' mask function is, by the identity of its parts.

    Gives ``("causal", None)`` for ``causal_mask_function`` and ``("sliding", W)`` for
    ``sliding_window_causal_mask_function(W)`` (an ``and_masks`` of the sliding overlay and
    the causal function): the only two swattn implements.

    Raises:
        ValueError: any other pattern (chunked attention as in Llama 4, bidirectional masks,
            packed sequences, image-token blocks, custom ``and``/``or`` mask functions), named.
    """
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return "causal", None
    code = getattr(mask_function, "__code__", None)
    if code is not None and code is mu.and_masks(mu.causal_mask_function).__code__:
        parts = _closure(mask_function).get("mask_functions", ())
        overlay = parts[0] if len(parts) == 2 and parts[1] is mu.causal_mask_function else None
        if overlay is not None and getattr(overlay, "__code__", None) is mu.sliding_window_overlay(1).__code__:
            return "sliding", int(_closure(overlay)["sliding_window"])
    name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
    raise ValueError(f"swattn attention implements causal and sliding-window masks; this model builds another "
                     f"({name}: chunked, bidirectional, packed-sequence or custom): use another attn_implementation")


def _positions_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                    mask_function=None, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
                    use_vmap: bool = False, device="cpu", **kwargs) -> torch.Tensor | None:
    """transformers' mask-builder signature; gives positions instead of a (q x kv) boolean mask.

    The pattern is read from ``mask_function`` itself (:func:`mask_pattern`): causal or
    sliding window (the window is the layer's, applied by the op); anything else is refused.
    With or without padding, all the op needs is the position of each key (-1 for padding)
    and of each query: ``(batch, kv_length + q_length)`` int64, keys first; ``None`` when
    there is no padding and the queries are the last keys.
    """
    from transformers.masking_utils import prepare_padding_mask

    mask_pattern(mask_function)
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    k_idx = torch.arange(kv_length, device=device) + kv_offset
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    valid = None if padding is None else padding[:, kv_offset : kv_offset + kv_length].bool()
    if (valid is None or bool(valid.all())) and q_offset + q_length == kv_offset + kv_length:
        return None
    k_pos = k_idx.expand(batch_size, -1) if valid is None else torch.where(valid, k_idx, -1)
    q_pos = (torch.arange(q_length, device=device) + q_offset).expand(batch_size, -1)
    return torch.cat([k_pos, q_pos], dim=1)


def _positions_from_bool_mask(mask: torch.Tensor, q_len: int, window: int | None):
    """Positions for a boolean (batch, 1, q, kv) mask, if it is a causal/sliding one with padding."""
    valid = mask.any(dim=2)[:, 0]  # (batch, kv_len): a key no query may see is padding (or unseen anyway)
    k_pos = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, -1, dtype=torch.long))
    q_pos = k_pos[:, -q_len:]
    if not torch.equal(visible(q_pos, k_pos, window), mask[:, 0]):
        raise ValueError("swattn attention takes causal or sliding-window masks with padding; this mask is another "
                         "pattern (packed sequences or a custom mask function): use another attn_implementation")
    return q_pos, k_pos


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, **kwargs):
    """transformers' attention-function signature: (B, H, q, D) in, ((B, q, H, D), None) out.

    ``attention_mask`` is what :func:`_positions_mask` gave: None (the queries are the last
    ``q_len`` of the ``kv_len`` keys, as transformers' dynamic caches hand them over), or the
    keys' and queries' positions; a boolean mask from elsewhere (a caller's own 4-D mask) is
    accepted if it equals a causal or sliding-window one with padding. Attention sinks and
    non-causal layers are refused.
    """
    if dropout:
        raise ValueError("swattn attention has no dropout; set the model's attention_dropout to 0")
    if kwargs.get("s_aux") is not None:
        raise ValueError("swattn attention has no attention sinks (s_aux, as in gpt-oss): use another "
                         "attn_implementation")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError("swattn attention is causal; this layer is not (is_causal=False): use another "
                         "attn_implementation")
    q_len, kv_len = query.shape[2], key.shape[2]
    q_pos = k_pos = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            q_pos, k_pos = _positions_from_bool_mask(attention_mask, q_len, sliding_window)
        elif attention_mask.dtype == torch.int64 and attention_mask.shape[1:] == (kv_len + q_len,):
            k_pos, q_pos = attention_mask[:, :kv_len], attention_mask[:, kv_len:]
        else:
            raise TypeError(f"swattn got an attention mask of dtype {attention_mask.dtype}, shape "
                            f"{tuple(attention_mask.shape)}: load the model with attn_implementation='swattn' so that "
                            "transformers builds the masks swattn expects")
    out = sliding_window_attention(query, key, value, sliding_window, softcap=softcap, scale=scaling,
                                   q_pos=q_pos, k_pos=k_pos)
    return out.transpose(1, 2).contiguous(), None


def register_with_transformers() -> str:
    """Registers swattn with transformers' attention interface; gives the name to use.

    Raises:
        ImportError: transformers missing, or older than 5.0 (naming the version needed).
    """
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("swattn.register_with_transformers needs transformers >= 5.0: pip install 'transformers>=5'") from exc
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_VERSION:
        raise ImportError(f"swattn.register_with_transformers needs transformers >= 5.0, found {transformers.__version__}")
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _positions_mask)
    return NAME


__all__ = ["register_with_transformers", "NAME"]
