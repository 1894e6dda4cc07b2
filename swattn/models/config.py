"""ModelConfig: one description of the Gemma 2 / Gemma 3 / Mistral family, from config.json.

Reads both the old transformers keys (``rope_theta``, ``rope_scaling``,
``sliding_window_pattern``, ``rope_local_base_freq``) and the new ones (``layer_types``,
``rope_parameters``, possibly per layer type); where both are present the new ones win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODEL_TYPES = ("gemma2", "gemma3_text", "mistral")


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: base, and linear position scaling (1 = none)."""

    theta: float = 10000.0
    linear_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model needs; per-layer attention types drive the layer differences."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]  # per layer: its window, or None for global attention
    rope_local: Rope = field(default_factory=Rope)
    rope_global: Rope = field(default_factory=Rope)
    rms_norm_eps: float = 1e-6
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # scores scaled by its -0.5 power (else head_dim's)
    tie_embeddings: bool = True
    activation: str = "gelu_tanh"  # or "silu"
    gemma_norms: bool = True  # (1 + w) RMSNorm gains, four norms per layer, scaled embeddings
    qk_norm: bool = False  # Gemma 3
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    max_position_embeddings: int | None = None  # the positions the checkpoint was made for

    @property
    def scale(self) -> float:
        """The attention score scale."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size) if self.gemma_norms else 1.0

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelConfig:
        """Builds the config from a checkpoint's ``config.json`` contents.

        Raises:
            ValueError: an unknown ``model_type`` or a missing field, naming it.
        """
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r} in config.json; swattn knows {', '.join(MODEL_TYPES)}")

        def need(key: str):
            if cfg.get(key) is None:
                raise ValueError(f"config.json for {model_type} lacks {key!r}")
            return cfg[key]

        layers = need("num_hidden_layers")
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        window = cfg.get("sliding_window")
        gemma = model_type != "mistral"
        eos = cfg.get("eos_token_id")
        common = dict(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            windows=tuple(_layer_windows(model_type, cfg, layers, window)),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_embeddings=cfg.get("tie_word_embeddings", gemma),
            activation="silu" if cfg.get("hidden_act", cfg.get("hidden_activation")) == "silu" else "gelu_tanh",
            gemma_norms=gemma,
            pad_token_id=cfg.get("pad_token_id"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            max_position_embeddings=cfg.get("max_position_embeddings"),
        )
        rope_local, rope_global = _ropes(model_type, cfg)
        if gemma:
            common.update(
                attn_softcap=cfg.get("attn_logit_softcapping"),
                final_softcap=cfg.get("final_logit_softcapping"),
                query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                qk_norm=model_type == "gemma3_text",
            )
        return cls(rope_local=rope_local, rope_global=rope_global, **common)


def _layer_windows(model_type: str, cfg: dict, layers: int, window: int | None) -> list[int | None]:
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != layers:
            raise ValueError(f"config.json: layer_types has {len(types)} entries for {layers} layers")
        return [window if t == "sliding_attention" else None for t in types]
    if model_type == "gemma2":
        return [window if i % 2 == 0 else None for i in range(layers)]
    if model_type == "gemma3_text":
        period = cfg.get("sliding_window_pattern", 6)
        return [None if (i + 1) % period == 0 else window for i in range(layers)]
    return [window] * layers  # mistral: every layer local (global if sliding_window is null)


def _rope(params: dict | None, default_theta: float) -> Rope:
    params = params or {}
    kind = params.get("rope_type", params.get("type", "default"))  # old configs say "type"
    factor = params.get("factor", 1.0) if kind == "linear" else 1.0
    return Rope(theta=float(params.get("rope_theta", default_theta)), linear_factor=float(factor))


def _ropes(model_type: str, cfg: dict) -> tuple[Rope, Rope]:
    """(local, global) rotary settings from new ``rope_parameters`` or old keys."""
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta", 10000.0)
    if params and ("full_attention" in params or "sliding_attention" in params):
        local = _rope(params.get("sliding_attention"), cfg.get("rope_local_base_freq", 10000.0))
        return local, _rope(params.get("full_attention"), theta)
    if params:
        glob = _rope(params, theta)
    else:
        glob = _rope(dict(cfg.get("rope_scaling") or {}, rope_theta=theta), theta)
    if model_type == "gemma3_text":  # old keys: local layers have their own base and no scaling
        return Rope(theta=float(cfg.get("rope_local_base_freq", 10000.0))), glob
    return glob, glob
