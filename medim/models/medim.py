"""MeDiM: a transformers decoder (Gemma, Llama, ...) turned into a masked-diffusion denoiser.

Three changes to the backbone, nothing else: attention is bidirectional, a timestep embedder turns
the noise level sigma into a vector, and every block is modulated by it (AdaLN, released form):

    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = adaLN_modulation(temb).chunk(6)
    h   = x + gate_a * Attn(norm1(x) * (1 + scale_a) + shift_a)
    out = h + gate_m * MLP(norm2(h) * (1 + scale_m) + shift_m)

The attention, MLP, norms, rotary embedding and embedding table are the backbone family's own
transformers modules (weights keep their names: `embed_tokens.weight`, `layers.N.self_attn.q_proj.weight`,
`norm.weight`), so any family whose decoder layer is (input_layernorm, self_attn,
post_attention_layernorm, mlp) works. Where tokens sit is the layout's business (medim/layout.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from medim.layout import BackboneInputs, SequenceLayout
from medim.models import convert
from medim.models.backbone import backbone_config_from_dict
from medim.models.cache import ContextCache, KVStore, cache_argument, cached_step, refresh
from medim.utils.hub import HubOptions, atomic_directory

__all__ = ["MeDiMConfig", "MeDiMModel", "MeDiMModelOutput", "TimestepEmbedder", "AdaLNModulation"]

# The sub-modules our block drives; a family whose layers hold anything else (e.g. Gemma-2's extra
# feed-forward norms) computes something our block would silently skip, so it is refused.
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
# transformers < 5 scaled Gemma embeddings inside the model's forward, not in the embedding module.
_SCALED_EMBEDDING_FAMILIES = {"gemma", "gemma3_text"}


class MeDiMConfig(PretrainedConfig):
    """Configuration of a MeDiM denoiser.

    Args:
        backbone_config: the decoder's config (a `PretrainedConfig` or its `to_dict()`, which must
            hold `model_type`); `num_hidden_layers` and `vocab_size` are those of the MeDiM model.
        layout: the sequence layout as `SequenceLayout.to_dict()`.
        frequency_embedding_size: size of the sinusoidal sigma features (256 in the release).
        max_period: the sinusoid's longest period (10000 in the release).
        causal: test-only switch that puts the causal mask back (for parity with the backbone).

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = MeDiMConfig(LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=300,
        ...     num_attention_heads=4, intermediate_size=128),
        ...     layout={"name": "native", "text_vocab_size": 100, "image_offset": 100,
        ...             "image_vocab_size": 64, "mask_id": 164, "text_len": 8, "image_len": 16})
    """

    model_type = "medim"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        layout: dict[str, Any] | SequenceLayout | None = None,
        frequency_embedding_size: int = 256,
        max_period: float = 10000.0,
        causal: bool = False,
        **kwargs: Any,
    ):
        if isinstance(backbone_config, dict):
            if "model_type" not in backbone_config:
                raise ValueError("backbone_config dict must hold 'model_type' (e.g. 'gemma', 'llama')")
            backbone_config = backbone_config_from_dict(backbone_config)
        if backbone_config is not None and not isinstance(backbone_config, PretrainedConfig):
            raise ValueError("backbone_config must be a PretrainedConfig or dict, "
                             f"got {type(backbone_config).__name__}")
        if isinstance(layout, SequenceLayout):
            layout = layout.to_dict()
        if layout is not None:
            parsed = SequenceLayout.from_dict(layout)
            vocab = getattr(backbone_config, "vocab_size", None)
            if vocab is not None and parsed.min_vocab_size > vocab:
                raise ValueError(
                    f"layout {parsed.name!r} needs {parsed.min_vocab_size} embedding rows but "
                    f"backbone_config.vocab_size is {vocab}"
                )
        if frequency_embedding_size < 2 or frequency_embedding_size % 2:
            raise ValueError(f"frequency_embedding_size must be an even int >= 2, got {frequency_embedding_size}")
        self.backbone_config = backbone_config
        self.layout = layout
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.causal = causal
        if backbone_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(backbone_config, "tie_word_embeddings", True))
            kwargs.setdefault("initializer_range", getattr(backbone_config, "initializer_range", 0.02))
        super().__init__(**kwargs)


class TimestepEmbedder(nn.Module):
    """sigma [B] -> [B, hidden]: a [cos | sin] sinusoid (computed in float32), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        steps = torch.arange(half, dtype=torch.float32, device=sigma.device)
        freqs = torch.exp(-math.log(self.max_period) * steps / half)
        args = sigma.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class AdaLNModulation(nn.Linear):
    """temb -> (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m), each [B, 1, hidden]."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 6 * hidden_size, bias=True)

    @torch.no_grad()
    def reset_to_identity(self) -> None:
        """Zero shift/scale and unit gates whatever temb is, so the block equals the pretrained one
        (the release instead zeroed the gates, which switched the MLLM prior off at step 0)."""
        hidden = self.in_features
        self.weight.zero_()
        self.bias.zero_()
        self.bias[2 * hidden : 3 * hidden] = 1.0
        self.bias[5 * hidden :] = 1.0

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(temb)[:, None].chunk(6, dim=-1)


@dataclass
class MeDiMModelOutput:
    """Per segment name, float32 [B, K, V_segment] over the segment's own vocabulary:
    `logprobs` (log-softmax; the default) or, with `return_logits=True`, `logits` (raw). The other
    field is None. A plain dataclass: transformers' ModelOutput would unpack a dict first field
    into its own keys."""

    logprobs: dict[str, torch.Tensor] | None = None
    logits: dict[str, torch.Tensor] | None = None


class MeDiMModel(PreTrainedModel):
    """The MeDiM denoiser: `model(x, sigma, positions=None, return_logits=False, **condition)`.

    Example:
        >>> model = MeDiMModel(cfg)                       # cfg: a MeDiMConfig
        >>> x = torch.full((2, model.layout.state_len), model.layout.mask_id)
        >>> out = model(x, torch.tensor([1.0, 0.5]), positions={"image": torch.arange(4) + model.layout.text_len})
        >>> out.logprobs["image"].shape                  # [2, 4, image_vocab_size]; no "text" entry
    """

    config_class = MeDiMConfig
    config: MeDiMConfig
    base_model_prefix = "medim"
    main_input_name = "x"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: MeDiMConfig):
        super().__init__(config)
        if config.backbone_config is None or config.layout is None:
            raise ValueError("MeDiMConfig needs both backbone_config and layout to build a model")
        self.layout = SequenceLayout.from_dict(config.layout)
        bcfg = config.backbone_config
        if type(bcfg) not in MODEL_MAPPING:
            raise ValueError(f"backbone model_type {bcfg.model_type!r} has no transformers base model")
        # Build the family's own base model and adopt its parts, so the modules (and their weight
        # names) are exactly the backbone's. Its `_init_weights` knows the family's conventions
        # (e.g. Gemma's (1 + w) norms start at 0), so we keep it for our backbone parts.
        base = MODEL_MAPPING[type(bcfg)](bcfg)
        self._backbone_init_weights = base._init_weights
        self.embed_tokens, self.layers = base.embed_tokens, base.layers
        self.norm, self.rotary_emb = base.norm, base.rotary_emb
        for layer in self.layers:
            parts = {name for name, _ in layer.named_children()}
            if parts != _LAYER_PARTS:
                raise ValueError(
                    f"{type(layer).__name__} has parts {sorted(parts)}; MeDiM blocks need exactly "
                    f"{sorted(_LAYER_PARTS)} (Llama/Gemma/Mistral/Qwen2-style decoders)"
                )
            layer.self_attn.is_causal = config.causal
            layer.adaLN_modulation = AdaLNModulation(bcfg.hidden_size)
        self.time_embedder = TimestepEmbedder(bcfg.hidden_size, config.frequency_embedding_size, config.max_period)
        self.lm_head = nn.Linear(bcfg.hidden_size, bcfg.vocab_size, bias=False)
        scaled = bcfg.model_type in _SCALED_EMBEDDING_FAMILIES and not hasattr(self.embed_tokens, "embed_scale")
        self._embed_scale = bcfg.hidden_size**0.5 if scaled else None
        self.gradient_checkpointing = False
        self._no_split_modules = [type(self.layers[0]).__name__] if len(self.layers) else []
        self.post_init()

    # ---- transformers plumbing ----------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, one more forward).

        Goes through transformers' `activation_checkpointing_enable` / `_disable` (5.x), or the
        `gradient_checkpointing_*` names they replace (4.57; deprecated in 5.x, gone in v6). Always
        non-reentrant (5.x's default; 4.57 defaults to reentrant, which needs an input that requires
        grad: with LoRA the frozen embedding's output does not, and nothing would train).
        """
        if not enabled:
            (getattr(self, "activation_checkpointing_disable", None) or self.gradient_checkpointing_disable)()
        elif hasattr(self, "activation_checkpointing_enable"):
            self.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, AdaLNModulation):
            module.reset_to_identity()
        else:
            self._backbone_init_weights(module)

    # ---- the network --------------------------------------------------------------------------
    def _attention_mask(self, key_mask: torch.Tensor | None, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """None when every key may be attended (fused kernels); else a [B, 1, 1 or L, L] mask in the
        form the attention implementation expects (bool for sdpa, additive for eager)."""
        causal = self.config.causal
        if key_mask is None and not causal:
            return None
        impl = self.config.backbone_config._attn_implementation
        if impl not in ("eager", "sdpa"):
            if key_mask is None:
                return None  # causal via the modules' is_causal flag
            raise ValueError(f"padded keys need attn_implementation 'eager' or 'sdpa', not {impl!r}")
        device = self.embed_tokens.weight.device
        if key_mask is not None:
            allowed = key_mask[:, None, None, :]
        else:
            allowed = torch.ones(1, 1, 1, length, dtype=torch.bool, device=device)
        if causal:
            allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _block(self, layer: nn.Module, h: torch.Tensor, temb: torch.Tensor, rope: tuple, mask: torch.Tensor | None,
               cache: KVStore | None = None) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = layer.adaLN_modulation(temb)
        a = layer.input_layernorm(h) * (1 + scale_a) + shift_a
        # A context cache takes the keys/values through transformers' cache protocol (models/cache.py).
        extra = {} if cache is None else {cache_argument(layer.self_attn): cache}
        a = layer.self_attn(hidden_states=a, position_embeddings=rope, attention_mask=mask,
                            is_causal=self.config.causal, **extra)[0]
        h = h + gate_a * a
        m = layer.post_attention_layernorm(h) * (1 + scale_m) + shift_m
        return h + gate_m * layer.mlp(m)

    def backbone_hidden_states(
        self,
        input_ids: torch.LongTensor,
        sigma: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: KVStore | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, L, hidden] of the backbone on `input_ids` [B, L] (`cache`: models/cache.py)."""
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        h = self.embed_tokens(input_ids)
        if self._embed_scale is not None:
            h = h * torch.tensor(self._embed_scale, dtype=h.dtype)
        temb = self.time_embedder(sigma.to(h.device))
        rope = self.rotary_emb(h, position_ids)
        mask = self._attention_mask(key_mask, L, h.dtype)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = self._gradient_checkpointing_func(self._block, layer, h, temb, rope, mask)
            else:
                h = self._block(layer, h, temb, rope, mask, cache)
        return self.norm(h)

    def backbone_logits(
        self,
        input_ids: torch.LongTensor,
        sigma: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw float32 logits over the whole vocabulary [B, L, V] (for parity checks and debugging)."""
        hidden = self.backbone_hidden_states(input_ids, sigma, position_ids, key_mask)
        return hidden.float() @ self.lm_head.weight.float().T

    def _check_inputs(self, x: torch.Tensor, sigma: torch.Tensor, positions: dict | None) -> None:
        n = self.layout.state_len
        if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != 2 or x.shape[1] != n:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a LongTensor [B, {n}] of backbone ids, got {got}")
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (x.shape[0],) or not sigma.is_floating_point():
            got = f"{sigma.dtype} {tuple(sigma.shape)}" if isinstance(sigma, torch.Tensor) else type(sigma).__name__
            raise ValueError(f"sigma must be a float tensor [B={x.shape[0]}], got {got}")
        if positions is None:
            return
        names = {s.name: s for s in self.layout.segments}
        if not isinstance(positions, dict) or not set(positions) <= set(names):
            raise ValueError(f"positions must be a dict with keys among {sorted(names)}, got {positions!r}")
        for name, pos in positions.items():
            seg = names[name]
            if not isinstance(pos, torch.Tensor) or pos.dtype != torch.long or pos.dim() != 1:
                raise ValueError(f"positions[{name!r}] must be a 1-D LongTensor of state positions")
            # Only on host tensors (on device it would sync every step), never under compile (graph break).
            if (pos.device.type == "cpu" and pos.numel() and not torch.compiler.is_compiling()
                    and (pos.min() < seg.start or pos.max() >= seg.stop)):
                raise ValueError(f"positions[{name!r}] must lie in [{seg.start}, {seg.stop}) "
                                 f"(the {name} state positions)")

    def forward(
        self,
        x: torch.LongTensor,
        sigma: torch.Tensor,
        positions: dict[str, torch.LongTensor] | None = None,
        return_logits: bool = False,
        **condition: torch.Tensor,
    ) -> MeDiMModelOutput:
        """Denoise: per-segment log-probabilities of the clean tokens.

        Args:
            x: [B, state_len] backbone ids, `layout.mask_id` where unknown.
            sigma: [B] noise levels fed to the timestep embedder.
            positions: optional `{segment name: LongTensor [K]}` of state positions (inside that
                segment's [start, stop)) shared by all rows; absent segments are not computed.
                None computes every position of every segment.
            return_logits: raw float32 logits instead of log-softmax.
            **condition: per-row layout inputs (medim-v1: `cond_ids`, `cond_mask`).
        """
        self._check_inputs(x, sigma, positions)
        inputs: BackboneInputs = self.layout.backbone_inputs(x, **condition)
        hidden = self.backbone_hidden_states(inputs.input_ids, sigma, inputs.position_ids, inputs.key_mask)
        return self.read_out(hidden, inputs.out_index, positions, return_logits)

    @torch.no_grad()
    def forward_cached(self, x: torch.LongTensor, sigma: torch.Tensor, positions: dict[str, torch.LongTensor],
                       cache: ContextCache | None = None, return_logits: bool = False,
                       **condition: torch.Tensor) -> tuple[MeDiMModelOutput, ContextCache]:
        """`forward` with context caching (medim/models/cache.py): without `cache` a whole forward that also
        returns a cache serving `positions`; with one, only what can change runs, over the cached (stale)
        keys/values of the rest. Between refreshes only tokens at `positions` may change.
        Example:
            >>> out, cache = model.forward_cached(x, sigma, positions)             # refresh
            >>> out, cache = model.forward_cached(x2, sigma2, positions, cache)    # cached step
        """
        self._check_inputs(x, sigma, positions)
        if cache is None:
            return refresh(self, x, sigma, positions, return_logits, condition)
        return cached_step(self, cache, x, sigma, positions, return_logits, condition=condition), cache

    def read_out(self, hidden: torch.Tensor, out_index: torch.LongTensor, positions: dict | None,
                 return_logits: bool) -> MeDiMModelOutput:
        """The head's float32 logits (or log-probs) per segment at state `positions`, state position n
        read from final hidden states [B, L, hidden] at `hidden[:, out_index[:, n]]`."""
        out: dict[str, torch.Tensor] = {}
        for seg in self.layout.segments:
            if positions is not None and seg.name not in positions:
                continue
            if positions is None:
                pos = torch.arange(seg.start, seg.stop, device=hidden.device)
            else:
                pos = positions[seg.name].to(hidden.device)
            # Gather the hidden states first so the head only runs where outputs are wanted.
            index = out_index[:, pos]
            h = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            weight = self.lm_head.weight[seg.vocab_start : seg.vocab_stop]
            logits = h.float() @ weight.float().T
            if not return_logits:
                # In place when no gradient is needed: on CPU a second [B, K, V] allocation cost
                # more than the log-softmax itself.
                logits = logits.log_softmax(-1) if logits.requires_grad else torch.log_softmax(logits, -1, out=logits)
            out[seg.name] = logits
        return MeDiMModelOutput(logits=out) if return_logits else MeDiMModelOutput(logprobs=out)

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False, **kwargs: Any) -> None:
        """transformers' `save_pretrained` (sharded safetensors + config.json), written into a
        temporary folder that replaces `save_directory` only when complete (`overwrite=True` to
        replace a non-empty one)."""
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            super().save_pretrained(tmp, **kwargs)

    # ---- loaders (medim/models/convert.py) ----------------------------------------------------
    @classmethod
    def from_liquid(
        cls,
        repo_or_dir: str | os.PathLike,
        num_layers: int = 10,
        layout: str | dict[str, Any] | SequenceLayout = "native",
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        image_offset: int | None = 256000,
        image_vocab_size: int = 8192,
        text_len: int = 256,
        image_len: int = 1024,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> MeDiMModel:
        """A fresh MeDiM from the first `num_layers` layers of Liquid (or any Gemma/Llama-style
        causal LM checkpoint in the transformers format), in the native layout.

        Only the kept tensors are read, straight into `dtype` on `device`. `image_offset` is the
        backbone row of image code 0 (Liquid: 256000; None appends `image_vocab_size` image rows to
        a plain LLM); `text_len` / `image_len` size the state. Details: `medim.models.convert.load_liquid`.

        Example:
            >>> model = MeDiMModel.from_liquid("Junfeng5/Liquid_V1_7B", num_layers=10, dtype=torch.bfloat16)
        """
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        return convert.load_liquid(cls, repo_or_dir, num_layers=num_layers, layout=layout, dtype=dtype, device=device,
                                   image_offset=image_offset, image_vocab_size=image_vocab_size, text_len=text_len,
                                   image_len=image_len, hub=hub)

    @classmethod
    def from_original(
        cls,
        repo_or_dir: str | os.PathLike = "JiaMao/medim_ckpts",
        *,
        backbone_config: PretrainedConfig | None = None,
        layout: dict[str, Any] | SequenceLayout | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> MeDiMModel:
        """The released MeDiM checkpoint (medim-v1 layout): a repo or folder with `model.safetensors`
        at the top or under the newest `checkpoint_<step>/`. `backbone_config` defaults to Liquid's
        Gemma config cut to 10 layers; every tensor is checked by name and shape.

        Example:
            >>> model = MeDiMModel.from_original("JiaMao/medim_ckpts", dtype=torch.bfloat16, device="cuda")
        """
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        return convert.load_original(cls, repo_or_dir, backbone_config=backbone_config, layout=layout, dtype=dtype,
                                     device=device, hub=hub)


AutoConfig.register("medim", MeDiMConfig)
AutoModel.register(MeDiMConfig, MeDiMModel)
