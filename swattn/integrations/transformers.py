"""swattn as an attention implementation inside Hugging Face transformers.

``register_with_transformers()`` registers the name ``"swattn"`` with transformers'
``AttentionInterface``; then ``from_pretrained(..., attn_implementation="swattn")`` (or
``model.set_attn_implementation("swattn")``) runs every attention layer through
:func:`swattn.sliding_window_attention`: local layers with their window, global layers
causal, the layer's soft-cap and scaling, K/V heads never repeated, and a backward.
transformers stays optional: nothing here is imported by ``import swattn``.
"""

from __future__ import annotations

import torch

from swattn.ops.api import sliding_window_attention

NAME = "swattn"
MIN_VERSION = (5, 0)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, **kwargs):
    """transformers' attention-function signature: (B, H, q, D) in, ((B, q, H, D), None) out.

    The queries are the last ``q_len`` of the ``kv_len`` keys (transformers' caches hand over
    the cached keys in order, then the new ones), so no positions are needed.
    """
    if dropout:
        raise ValueError("swattn attention has no dropout; set the model's attention_dropout to 0")
    q_pos = k_pos = None
    if attention_mask is not None:
        # transformers' boolean mask (batch, 1, q_len, kv_len), built only when the batch has
        # padding. A key no query may see is padding (or out of every window: equally unseen);
        # numbering the others in order gives positions whose differences are the true ones.
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"swattn expects a boolean attention mask, got {attention_mask.dtype}")
        valid = attention_mask.any(dim=2)[:, 0]  # (batch, kv_len)
        k_pos = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, -1, dtype=torch.long))
        q_pos = k_pos[:, -query.shape[2]:]
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
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    transformers.AttentionInterface.register(NAME, _attention)
    # transformers' own boolean mask builder: it gives a mask only when there is padding
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


__all__ = ["register_with_transformers", "NAME"]
