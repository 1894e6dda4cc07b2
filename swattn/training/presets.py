"""Model presets for ``swattn train``: Gemma 2 architecture at sizes a CPU trains."""

from __future__ import annotations

from dataclasses import dataclass

from swattn.models.config import ModelConfig, Rope, layer_windows


@dataclass(frozen=True)
class Preset:
    """A model shape and the training settings that suit it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int
    context: int
    batch_tokens: int  # tokens per optimizer step
    lr: float
    warmup: int


PRESETS = {
    # for tests and quick trials: trains in seconds
    "tiny": Preset(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=16, window=32, context=128, batch_tokens=1024, lr=3e-3, warmup=10),
    # the built-in model: about 7M parameters, 14 MB in bf16
    "small": Preset(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=6, num_heads=4,
                    num_kv_heads=2, head_dim=64, window=256, context=2048, batch_tokens=16384, lr=2e-3, warmup=50),
}


def gemma2_model_config(p: Preset, window: int, special: dict[str, int | None]) -> ModelConfig:
    """A Gemma 2 :class:`ModelConfig` of preset ``p``: local and global layers alternate (local first),
    soft-caps 50 (attention) and 30 (final), GQA, tied embeddings."""
    return ModelConfig(
        model_type="gemma2", vocab_size=p.vocab_size, hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size, num_layers=p.num_layers, num_heads=p.num_heads,
        num_kv_heads=p.num_kv_heads, head_dim=p.head_dim,
        windows=tuple(layer_windows("gemma2", p.num_layers, window)),
        rope_local=Rope(10000.0), rope_global=Rope(10000.0), rms_norm_eps=1e-6, attn_softcap=50.0,
        final_softcap=30.0, query_pre_attn_scalar=p.head_dim, tie_embeddings=True, activation="gelu_tanh",
        gemma_norms=True, pad_token_id=special["pad"], bos_token_id=special["bos"],
        eos_token_ids=(special["eos"],) if special["eos"] is not None else (),
    )
