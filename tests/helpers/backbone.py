"""Tiny backbones and checkpoints written in the exact upstream file formats (docs/formats.md, sections 1 and 4).

Reusable by any test: nothing here touches the network.
- `tiny_gemma_config()` / `tiny_llama_config()`: small transformers configs.
- `write_tiny_liquid(dir, num_layers=6, shards=3)`: a Liquid_V1_7B-format sharded checkpoint
  (GemmaForCausalLM keys, model.safetensors.index.json, Liquid's config.json quirks); returns the
  GemmaForCausalLM it was written from.
- `write_tiny_release_checkpoint(dir, ...)`: the released accelerate checkpoint
  (`checkpoint_<step>/model.safetensors`, `model.`-prefixed keys incl. time embedder and AdaLN);
  returns the tensors written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig

# Tiny Liquid: 200 "text" ids + 64 image codes at offset 200 (Liquid: 256000 + 8192).
TINY_TEXT_VOCAB = 200
TINY_IMAGE_VOCAB = 64
# Tiny release: "Llama-2" of 120 ids, then <boi> <eoi> <eos> mask and 64 image codes.
TINY_BASE_VOCAB = 120


def tiny_gemma_config(vocab_size: int = TINY_TEXT_VOCAB + TINY_IMAGE_VOCAB, num_layers: int = 2,
                      **overrides) -> GemmaConfig:
    params = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=True,
    )
    params.update(overrides)
    return GemmaConfig(**params)


def tiny_llama_config(vocab_size: int = 300, num_layers: int = 2, **overrides) -> LlamaConfig:
    params = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random values in every parameter (norm weights included, so (1 + w) vs w conventions show)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def write_tiny_liquid(directory: str | Path, num_layers: int = 6, shards: int = 3, seed: int = 0) -> GemmaForCausalLM:
    """Write a sharded Liquid-format checkpoint; layers are split evenly over `shards` files, the
    embedding goes in the first and the final norm in the last (as in the real 4-shard release)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_gemma_config(num_layers=num_layers)
    model = randomize_(GemmaForCausalLM(config).eval(), seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    per_shard = -(-num_layers // shards)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]

    def shard_of(key: str) -> int:
        if key.startswith("model.layers."):
            return int(key.split(".")[2]) // per_shard
        return 0 if "embed_tokens" in key else shards - 1

    weight_map = {k: names[shard_of(k)] for k in state}
    for i, name in enumerate(names):
        part = {k: v.to(torch.bfloat16) for k, v in state.items() if shard_of(k) == i}
        save_file(part, str(directory / name), metadata={"format": "pt"})
    total = sum(v.numel() * 2 for v in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    # Liquid's config.json: legacy "gelu" with a null hidden_activation, no tie_word_embeddings.
    cfg = config.to_dict()
    cfg.update(architectures=["GemmaForCausalLM"], hidden_act="gelu", hidden_activation=None, torch_dtype="bfloat16")
    cfg.pop("tie_word_embeddings", None)
    cfg.pop("dtype", None)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    # The reference model in the precision the files hold.
    model.load_state_dict({**{k: v.to(torch.bfloat16).float() for k, v in state.items()}}, strict=False)
    model.tie_weights()
    return model


def release_state_dict(
    num_layers: int = 2, hidden_size: int = 32, intermediate: int = 64, heads: int = 4, kv_heads: int = 2,
    head_dim: int = 8, base_vocab: int = TINY_BASE_VOCAB, image_vocab: int = TINY_IMAGE_VOCAB, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random tensors under the released key names and shapes (docs/formats.md, section 4)."""
    gen = torch.Generator().manual_seed(seed)
    H = hidden_size
    shapes = {
        "model.embed_tokens.weight": (base_vocab + 4 + image_vocab, H),
        "model.time_embedder.mlp.0.weight": (H, 256),
        "model.time_embedder.mlp.0.bias": (H,),
        "model.time_embedder.mlp.2.weight": (H, H),
        "model.time_embedder.mlp.2.bias": (H,),
        "model.norm.weight": (H,),
    }
    for n in range(num_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * head_dim, H),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, H),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, H),
            p + "self_attn.o_proj.weight": (H, heads * head_dim),
            p + "mlp.gate_proj.weight": (intermediate, H),
            p + "mlp.up_proj.weight": (intermediate, H),
            p + "mlp.down_proj.weight": (H, intermediate),
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "adaLN_modulation.weight": (6 * H, H),
            p + "adaLN_modulation.bias": (6 * H,),
        })
    return {k: torch.randn(s, generator=gen) * 0.2 for k, s in shapes.items()}


def write_tiny_release_checkpoint(
    directory: str | Path, step: int = 200, with_lm_head: bool = True, **shape_kwargs
) -> dict[str, torch.Tensor]:
    """Write `checkpoint_<step>/model.safetensors` (plus an older checkpoint and one without a
    model file, like an interrupted save) and return the tensors of the newest one."""
    directory = Path(directory)
    state = release_state_dict(**shape_kwargs)
    if with_lm_head:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for s, tensors in ((step // 2, release_state_dict(**{**shape_kwargs, "seed": 1})), (step, state)):
        (directory / f"checkpoint_{s}").mkdir(parents=True, exist_ok=True)
        save_file({k: v.clone().contiguous() for k, v in tensors.items()},
                  str(directory / f"checkpoint_{s}" / "model.safetensors"))
    (directory / f"checkpoint_{step * 2}").mkdir()
    (directory / f"checkpoint_{step * 2}" / "optimizer.bin").write_bytes(b"")
    return state


def tiny_tokenizer(vocab_size: int = TINY_BASE_VOCAB, bos_id: int = 1, eos_id: int = 2):
    """A word-level fast tokenizer (punctuation and single digits split off, like Llama's) with `<unk>`=0 and a
    BOS added by default, `vocab_size` ids in all; words it does not know become `<unk>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"]
    words[bos_id], words[eos_id] = "<s>", "</s>"
    words += list("0123456789")
    words += "Image Size : Width is tensor ( [ ] ) Height . , the a chest lung heart no normal".split()
    words += ["z" + a + b for a in "abcdefghij" for b in "abcdefghij"][: vocab_size - len(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
