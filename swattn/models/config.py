"""ModelConfig: one description of the Gemma 2 / Gemma 3 / Mistral family, from config.json.

Reads both the old transformers keys (``rope_theta``, ``rope_scaling``,
``sliding_window_pattern``, ``rope_local_base_freq``) and the new ones (``layer_types``,
``rope_parameters``, possibly per layer type); where both are present the new ones win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODEL_TYPES = ("gemma2", "gemma3_text", "mistral")  # and "gemma3": the multimodal wrapper, text model read
LAYER_TYPES = {"sliding_attention", "full_attention"}
ROPE_TYPES = ("default", "linear")
# hidden_act / hidden_activation values (transformers' names) and the activation each one is
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "silu": "silu", "swish": "silu"}
# Gemma3TextConfig's defaults: multimodal Gemma 3 checkpoints (4b, 12b, 27b) write only the
# text_config values that differ from them
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                            rms_norm_eps=1e-6, rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
                            query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                            final_logit_softcapping=None, attn_logit_softcapping=None)


def layer_windows(family: str, n_layers: int, window: int | None, period: int = 6) -> list[int | None]:
    """Per-layer windows (None = global) of the model families, the one definition of their patterns.

    ``gemma2``: local and global alternate, layer 0 local. ``gemma3``: ``period - 1`` local
    layers, then a global one (``sliding_window_pattern``, 6). ``mistral``: every layer local
    (every layer global if ``window`` is None).
    """
    if family == "gemma2":
        return [window if i % 2 == 0 else None for i in range(n_layers)]
    if family in ("gemma3", "gemma3_text"):
        return [None if (i + 1) % period == 0 else window for i in range(n_layers)]
    if family == "mistral":
        return [window] * n_layers
    raise ValueError(f"unknown layer pattern {family!r}; known: gemma2, gemma3, mistral")


def text_config(cfg: dict) -> dict:
    """The language model's settings: ``cfg`` itself, or a multimodal Gemma 3's ``text_config`` with its defaults."""
    if cfg.get("model_type") != "gemma3":
        return cfg
    inner = cfg.get("text_config")
    if not isinstance(inner, dict):
        raise ValueError("config.json: model_type 'gemma3' (multimodal) without a text_config")
    merged = {**GEMMA3_TEXT_DEFAULTS, **inner, "model_type": "gemma3_text"}
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "torch_dtype", "dtype"):
        if merged.get(key) is None and cfg.get(key) is not None:
            merged[key] = cfg[key]
    return merged


def check_supported(cfg: dict) -> None:
    """Refuses settings swattn does not implement, naming the key and value (never silently replaced)."""
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("config.json: use_bidirectional_attention: true is not supported (swattn's attention is "
                         "causal)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"config.json: {key}: true is not supported (swattn's projections have no bias)")
    for t in cfg.get("layer_types") or []:
        if t not in LAYER_TYPES:
            raise ValueError(f"config.json: layer_types entry {t!r} is not supported (swattn implements "
                             f"{', '.join(sorted(LAYER_TYPES))})")
    gemma = cfg.get("model_type") != "mistral"
    act_key = "hidden_activation" if gemma and cfg.get("hidden_activation") is not None else "hidden_act"
    act = cfg.get(act_key)
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"config.json: {act_key} {act!r} is not supported (swattn implements "
                         f"{', '.join(ACTIVATIONS)})")
    ropes = []
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if isinstance(value, dict):
            nested = [v for k, v in value.items() if k in LAYER_TYPES and isinstance(v, dict)]
            ropes += [(key, v) for v in nested] or [(key, value)]
    for key, params in ropes:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"config.json: {key} type {kind!r} is not supported (swattn implements "
                             f"{' and '.join(ROPE_TYPES)} rotary embeddings)")


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
        cfg = text_config(cfg)
        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r} in config.json; swattn knows "
                             f"{', '.join(MODEL_TYPES)} and gemma3 (multimodal: its text model)")
        check_supported(cfg)

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
            activation=_activation(cfg, gemma),
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


def _activation(cfg: dict, gemma: bool) -> str:
    """Gemma reads ``hidden_activation`` (then ``hidden_act``), Mistral ``hidden_act``, as transformers does."""
    act = (cfg.get("hidden_activation") if gemma else None) or cfg.get("hidden_act")
    return ACTIVATIONS[act] if act is not None else ("gelu_tanh" if gemma else "silu")


def _layer_windows(model_type: str, cfg: dict, layers: int, window: int | None) -> list[int | None]:
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != layers:
            raise ValueError(f"config.json: layer_types has {len(types)} entries for {layers} layers")
        return [window if t == "sliding_attention" else None for t in types]
    return layer_windows(model_type, layers, window, cfg.get("sliding_window_pattern") or 6)


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
