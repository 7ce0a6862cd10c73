"""Facts about backbone configs: reading a config.json dict on transformers 4.57 and 5.x, Liquid's
config, its activation fix, and the native layout a backbone's vocabulary implies."""

from __future__ import annotations

from typing import Any

import transformers
from transformers import AutoConfig, GemmaConfig, PretrainedConfig

from medim.layout import NativeLayout

__all__ = ["backbone_config_from_dict", "liquid_backbone_config", "fix_liquid_activation", "native_layout_for"]


def _rope_for_4x(params: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 saves RoPE settings only as `rope_parameters`; 4.x reads `rope_theta` and
    `rope_scaling` and would silently use its defaults, so a 5.x-saved model with another base
    computed differently on 4.57. Copies a flat `rope_parameters` into the 4.x keys."""
    rope = params.get("rope_parameters")
    if int(transformers.__version__.split(".")[0]) >= 5 or not isinstance(rope, dict) or "rope_theta" not in rope:
        return params
    legacy = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {**legacy, **params}


def backbone_config_from_dict(params: dict[str, Any]) -> PretrainedConfig:
    """A decoder's config.json dict (with `model_type`) -> its transformers config, read the same
    on transformers 4.57 and 5.x."""
    params = dict(params)
    return AutoConfig.for_model(params.pop("model_type"), **_rope_for_4x(params))


def liquid_backbone_config(num_layers: int = 10, vocab_size: int = 264192) -> GemmaConfig:
    """Liquid_V1_7B's Gemma config (docs/formats.md) cut to `num_layers` layers."""
    return GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
    )


def fix_liquid_activation(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of a backbone's config.json dict with Gemma's activation made explicit.

    Liquid (like Gemma-7B) says `hidden_act: "gelu"` with `hidden_activation: null` but was trained
    with the tanh-approximate GELU; transformers 5 maps the legacy value itself (with a warning),
    older lines read "gelu" literally. Other families are returned unchanged.

    Example:
        >>> fix_liquid_activation({"model_type": "gemma", "hidden_act": "gelu"})["hidden_act"]
        'gelu_pytorch_tanh'
    """
    params = dict(params)
    if params.get("model_type") == "gemma":
        params["hidden_act"] = params["hidden_activation"] = "gelu_pytorch_tanh"
    return params


def native_layout_for(
    backbone_config: PretrainedConfig,
    image_offset: int | None = 256000,
    image_vocab_size: int = 8192,
    text_len: int = 256,
    image_len: int = 1024,
) -> NativeLayout:
    """The native layout for a backbone. With `image_offset` (Liquid: 256000) the backbone already
    holds image rows at `image_offset + k` and one mask row is appended; with None (a plain LLM)
    `image_vocab_size` image rows and then the mask row are appended after its vocabulary."""
    vocab = backbone_config.vocab_size
    if image_offset is None:
        text_vocab, image_offset, mask_id = vocab, vocab, vocab + image_vocab_size
    else:
        if image_offset + image_vocab_size > vocab:
            raise ValueError(
                f"image_offset + image_vocab_size ({image_offset} + {image_vocab_size}) exceeds the backbone "
                f"vocab_size {vocab}; pass image_offset=None to append image rows"
            )
        text_vocab, mask_id = image_offset, vocab
    pad = backbone_config.pad_token_id
    return NativeLayout(
        text_vocab_size=text_vocab,
        image_offset=image_offset,
        image_vocab_size=image_vocab_size,
        mask_id=mask_id,
        bos_id=_first(backbone_config.bos_token_id),
        eos_id=_first(backbone_config.eos_token_id),
        pad_id=0 if pad is None else pad,
        text_len=text_len,
        image_len=image_len,
    )


def _first(token_id: int | list[int]) -> int:
    return token_id[0] if isinstance(token_id, list) else token_id
