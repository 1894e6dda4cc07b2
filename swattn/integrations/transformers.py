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


def _positions_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                    mask_function=None, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
                    use_vmap: bool = False, device="cpu", **kwargs) -> torch.Tensor | None:
    """transformers' mask-builder signature; gives positions instead of a (q x kv) boolean mask.

    For the causal and sliding-window patterns (the window is the layer's, applied by the op),
    with or without padding, everything the op needs is the position of each key (-1 for
    padding) and of each query: ``(batch, kv_length + q_length)`` int64, keys first. ``None``
    when there is no padding and the queries are the last keys. Any other pattern (custom
    ``and``/``or`` mask functions, packed sequences) gets transformers' boolean mask, which
    ``_attention`` accepts only if it is such a pattern after all.
    """
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask

    if use_vmap or not (allow_is_causal_skip or q_length == 1):
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         allow_is_causal_skip=False, use_vmap=use_vmap, device=device, **kwargs)
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
    keys' and queries' positions; a boolean mask from elsewhere is accepted if it is a causal
    or sliding-window one with padding.
    """
    if dropout:
        raise ValueError("swattn attention has no dropout; set the model's attention_dropout to 0")
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
