import pytest
import torch
from transformers import GemmaForCausalLM, LlamaForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm, GemmaRotaryEmbedding

from medim import MeDiMConfig, MeDiMModel
from medim.layout import MeDiMV1Layout, NativeLayout
from medim.models.backbone import liquid_backbone_config
from tests.helpers.backbone import (
    TINY_BASE_VOCAB,
    TINY_IMAGE_VOCAB,
    randomize_,
    tiny_gemma_config,
    tiny_llama_config,
    tiny_tokenizer,
    write_tiny_release_checkpoint,
)

NATIVE = {"name": "native", "text_vocab_size": 100, "image_offset": 100, "image_vocab_size": 64, "mask_id": 164,
          "text_len": 8, "image_len": 16}


def native_model(backbone, attn="sdpa", **config_kwargs):
    model = MeDiMModel(MeDiMConfig(backbone, layout=NATIVE, **config_kwargs))
    model.set_attn_implementation(attn)
    return model.eval()


def native_state(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 100, (batch, 8), generator=gen)
    return torch.cat([text, torch.randint(100, 164, (batch, 16), generator=gen)], 1)


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_causal_parity_with_transformers(family):
    """Identity modulation + causal switch on: medim's full-vocab logits are the backbone's."""
    make, cls = (tiny_gemma_config, GemmaForCausalLM) if family == "gemma" else (tiny_llama_config, LlamaForCausalLM)
    ref = randomize_(cls(make()).eval())
    model = native_model(make(), causal=True)
    state = {k.removeprefix("model."): v for k, v in ref.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("adaLN" in k or "time_embedder" in k for k in missing)
    ids = torch.randint(0, 164, (2, 20))
    with torch.no_grad():
        diff = (model.backbone_logits(ids, torch.tensor([0.2, 3.0])) - ref(ids).logits).abs().max()
    assert diff < 1e-4
    # Leaving out Gemma's sqrt(hidden) embedding scale or the (1 + w) norm would break this.
    assert model.lm_head.weight is model.embed_tokens.weight or family == "llama"


def test_fresh_model_is_identity_adaln():
    model = native_model(tiny_gemma_config())
    for layer in model.layers:
        w, b = layer.adaLN_modulation.weight, layer.adaLN_modulation.bias.view(6, -1)
        assert not w.any() and not b[[0, 1, 3, 4]].any() and bool((b[[2, 5]] == 1).all())
    assert not model.layers[0].input_layernorm.weight.any()  # Gemma's (1 + w) norm keeps its own init
    x = native_state()
    with torch.no_grad():
        a = model(x, torch.tensor([0.1, 0.1])).logprobs["image"]
        b = model(x, torch.tensor([5.0, 5.0])).logprobs["image"]
    assert torch.equal(a, b)  # identity modulation: sigma has no effect yet


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_is_bidirectional_and_padded_keys_are_ignored(attn):
    model = randomize_(native_model(tiny_gemma_config(), attn))
    assert all(layer.self_attn.is_causal is False for layer in model.layers)
    ids = torch.randint(0, 164, (1, 12))
    sigma = torch.tensor([1.0])
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 164
    with torch.no_grad():
        h, h2 = model.backbone_hidden_states(ids, sigma), model.backbone_hidden_states(changed, sigma)
        assert (h[0, 0] - h2[0, 0]).abs().max() > 1e-4
        key_mask = torch.ones(1, 12, dtype=torch.bool)
        key_mask[0, [3, 7]] = False
        other = ids.clone()
        other[0, [3, 7]] = (ids[0, [3, 7]] + 5) % 164
        m1 = model.backbone_hidden_states(ids, sigma, key_mask=key_mask)
        m2 = model.backbone_hidden_states(other, sigma, key_mask=key_mask)
        keep = key_mask[0]
        assert (m1[0, keep] - m2[0, keep]).abs().max() < 1e-5
        assert (m1 - h).abs().max() > 1e-4


def test_eager_and_sdpa_agree():
    eager = randomize_(native_model(tiny_gemma_config(), "eager"))
    sdpa = native_model(tiny_gemma_config(), "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    key_mask = torch.rand(2, 15) > 0.3
    ids = torch.randint(0, 164, (2, 15))
    with torch.no_grad():
        d = (eager.backbone_logits(ids, torch.ones(2), key_mask=key_mask)
             - sdpa.backbone_logits(ids, torch.ones(2), key_mask=key_mask))
    assert d.abs().max() < 1e-4


def test_positions_logits_and_bad_inputs():
    model = randomize_(native_model(tiny_gemma_config()))
    x, sigma = native_state(), torch.tensor([0.5, 1.5])
    with torch.no_grad():
        full = model(x, sigma).logprobs
        part = model(x, sigma, positions={"image": torch.tensor([8, 20])}, return_logits=True).logits
    assert full["text"].shape == (2, 8, 100) and full["image"].shape == (2, 16, 64)
    assert full["image"].dtype == torch.float32
    assert torch.allclose(full["image"].exp().sum(-1), torch.ones(2, 16))
    assert set(part) == {"image"}
    assert torch.allclose(part["image"].log_softmax(-1), full["image"][:, [0, 12]], atol=1e-5)
    with pytest.raises(ValueError, match="x must be a LongTensor"):
        model(x[:, :5], sigma)
    with pytest.raises(ValueError, match="sigma must be a float tensor"):
        model(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"positions\['image'\] must lie in \[8, 24\)"):
        model(x, sigma, positions={"image": torch.tensor([3])})
    with pytest.raises(ValueError, match="keys among"):
        model(x, sigma, positions={"audio": torch.tensor([3])})


def test_gradient_checkpointing_same_gradients():
    model = randomize_(native_model(tiny_gemma_config()))
    model.train()
    x, sigma = native_state(), torch.tensor([0.5, 1.5])

    def grads():
        model.zero_grad()
        model(x, sigma).logprobs["image"].sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_activation_checkpointing(True)
    assert model.gradient_checkpointing
    for a, b in zip(plain, grads()):
        assert torch.allclose(a, b, atol=1e-5)
    model.set_activation_checkpointing(False)
    assert not model.gradient_checkpointing


def test_save_load_round_trip_sharded(tmp_path):
    model = randomize_(native_model(tiny_llama_config(vocab_size=165)), seed=3)
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 2
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(tmp_path / "m")
    loaded = MeDiMModel.from_pretrained(tmp_path / "m").eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert loaded.layout == model.layout and loaded.config.backbone_config.model_type == "llama"
    x = native_state()
    with torch.no_grad():
        assert torch.equal(model(x, torch.ones(2)).logprobs["text"], loaded(x, torch.ones(2)).logprobs["text"])
    bf16 = MeDiMModel.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16


def test_liquid_shaped_model_size_on_meta():
    layout = {"name": "native"}  # Liquid's ids: mask 264192 is one appended row
    with torch.device("meta"):
        model = MeDiMModel(MeDiMConfig(liquid_backbone_config(10, 264193), layout=layout))
    backbone = sum(p.numel() for n, p in model.named_parameters() if "adaLN" not in n and "time_embedder" not in n)
    extra = sum(p.numel() for n, p in model.named_parameters() if "adaLN" in n or "time_embedder" in n)
    print(f"\nLiquid_V1_7B @10 layers: backbone {backbone / 1e9:.3f} B + time/AdaLN {extra / 1e9:.3f} B "
          f"= {(backbone + extra) / 1e9:.3f} B parameters")
    assert round(backbone / 1e9, 2) == 3.58
    assert extra == (256 * 3072 + 3072) + (3072 * 3072 + 3072) + 10 * (3072 * 6 * 3072 + 6 * 3072)


# ---- the released model (docs/formats.md, section 4) -------------------------------------------------------


def release_reference(state, config, layout, x, sigma, cond_ids):
    """The release's computation for ONE row, driving transformers' own Gemma modules in a loop."""
    sd = {k.removeprefix("model."): v for k, v in state.items()}
    T, I = layout.text_len, layout.image_len  # noqa: E741
    text, image = x[:T], x[T:]
    ids = torch.cat([torch.tensor([layout.boi_id]), image, torch.tensor([layout.eoi_id]), cond_ids, text,
                     torch.tensor([layout.eos_id])])[None]
    L = ids.shape[1]
    h = torch.nn.functional.embedding(ids, sd["embed_tokens.weight"]) * torch.tensor(config.hidden_size**0.5)
    # timestep embedder: [cos | sin] of sigma * exp(-log(10000) k / 128), Linear-SiLU-Linear
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    feat = torch.cat([torch.cos(sigma * freqs), torch.sin(sigma * freqs)])[None]
    temb = torch.nn.functional.silu(feat @ sd["time_embedder.mlp.0.weight"].T + sd["time_embedder.mlp.0.bias"])
    temb = temb @ sd["time_embedder.mlp.2.weight"].T + sd["time_embedder.mlp.2.bias"]
    config._attn_implementation = "eager"
    rope = GemmaRotaryEmbedding(config)(h, torch.arange(L)[None])
    keys = torch.ones(L, dtype=torch.bool)
    keys[L - T - 1 : L - 1] = text != 0
    mask = torch.zeros(1, 1, L, L).masked_fill(~keys, torch.finfo(torch.float32).min)
    for n in range(config.num_hidden_layers):
        layer = GemmaDecoderLayer(config, n)
        layer.load_state_dict({k.removeprefix(f"layers.{n}."): v for k, v in sd.items()
                               if k.startswith(f"layers.{n}.") and "adaLN" not in k})
        layer.self_attn.is_causal = False
        mod = temb @ sd[f"layers.{n}.adaLN_modulation.weight"].T + sd[f"layers.{n}.adaLN_modulation.bias"]
        sa, ca, ga, sm, cm, gm = mod.chunk(6, dim=-1)
        a = layer.self_attn(hidden_states=layer.input_layernorm(h) * (1 + ca) + sa, position_embeddings=rope,
                            attention_mask=mask)[0]
        h = h + ga * a
        h = h + gm * layer.mlp(layer.post_attention_layernorm(h) * (1 + cm) + sm)
    norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": sd["norm.weight"]})
    logits = (norm(h) @ sd["embed_tokens.weight"].T)[0].float()
    V = layout.base_vocab_size
    out_text = logits[L - T - 2 : L - 2].clone()
    out_text[:, V + 3 :] = float("-inf")  # text positions: text ids only (mask id excluded)
    out_image = logits[2 : 2 + I].clone()
    out_image[:, : V + 4] = float("-inf")
    return out_text.log_softmax(-1)[:, : V + 3], out_image.log_softmax(-1)[:, V + 4 :]


def test_release_checkpoint_matches_reference_per_row(tmp_path):
    state = write_tiny_release_checkpoint(tmp_path)
    layout = MeDiMV1Layout(base_vocab_size=TINY_BASE_VOCAB, text_len=8, image_len=16, image_vocab_size=TINY_IMAGE_VOCAB)
    config = tiny_gemma_config(vocab_size=layout.min_vocab_size)
    model = MeDiMModel.from_original(tmp_path, backbone_config=config, layout=layout)
    model.set_attn_implementation("sdpa")
    tok = tiny_tokenizer()
    cond = layout.condition(tok, [(512, 512), (1024, 768), (64, 64)])
    text = layout.encode_reports(tok, ["the chest", "no normal heart lung the chest a", "a"])
    image = layout.image_segment.vocab_start + torch.randint(0, TINY_IMAGE_VOCAB, (3, 16))
    x = torch.cat([text, image], 1)
    x[1, 10:14] = layout.mask_id
    sigma = torch.tensor([0.3, 1.2, 4.0])
    with torch.no_grad():
        out = model(x, sigma, **cond).logprobs
        for b in range(3):
            c = int(cond["cond_mask"][b].sum())
            ref_text, ref_image = release_reference(state, config, layout, x[b], sigma[b], cond["cond_ids"][b, :c])
            print(f"row {b}: max |medim - release reference| text {(out['text'][b] - ref_text).abs().max():.1e} "
                  f"image {(out['image'][b] - ref_image).abs().max():.1e}")
            assert (out["text"][b] - ref_text).abs().max() < 1e-4
            assert (out["image"][b] - ref_image).abs().max() < 1e-4
            alone = model(x[b : b + 1], sigma[b : b + 1], cond_ids=cond["cond_ids"][b : b + 1, :c],
                          cond_mask=cond["cond_mask"][b : b + 1, :c]).logprobs
            assert (alone["text"][0] - out["text"][b]).abs().max() < 1e-4
            assert (alone["image"][0] - out["image"][b]).abs().max() < 1e-4


def test_rope_base_saved_by_transformers_5_loads_on_any_line():
    # transformers 5 writes RoPE settings only as `rope_parameters`; 4.57 must not fall back to its
    # default base (10000), or the model computes something else.
    layout = NativeLayout(text_vocab_size=40, image_offset=40, image_vocab_size=16, mask_id=56, text_len=4, image_len=4)
    backbone = {"model_type": "llama", "vocab_size": 57, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
                "rope_parameters": {"rope_theta": 48.0, "rope_type": "default"}}
    model = MeDiMModel(MeDiMConfig(backbone_config=backbone, layout=layout.to_dict()))
    head_dim = 16
    expected = 48.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    torch.testing.assert_close(model.rotary_emb.inv_freq, expected)
