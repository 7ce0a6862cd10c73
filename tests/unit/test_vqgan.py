import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import medim
from medim.models.vqgan import VQGAN, VQGANConfig
from medim.utils.hub import HubOptions
from tests.helpers.pipeline import to_hub_cache
from tests.helpers.vqgan import tiny_model, write_medim_folder, write_taming

DEMO_VQGAN = Path(medim.__file__).parent / "demo_model" / "vqgan"


def pixels(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("attn_resolutions", [(), (32, 16)])
def test_encode_matches_transformers_chameleon_vqvae(attn_resolutions):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    ours = tiny_model(attn_resolutions=attn_resolutions)
    # Our nn.Embedding init is N(0, 1), far from the encoder's outputs; pull codes near them so
    # that many different codes are chosen and the comparison means something.
    with torch.no_grad():
        ours.quantize.embedding.weight.mul_(0.3)
    c = ours.config
    hf_config = ChameleonVQVAEConfig(
        embed_dim=c.embed_dim, num_embeddings=c.n_embed, double_latent=c.double_z, latent_channels=c.z_channels,
        resolution=c.resolution, in_channels=c.in_channels, base_channels=c.ch, channel_multiplier=list(c.ch_mult),
        num_res_blocks=c.num_res_blocks, attn_resolutions=list(c.attn_resolutions), dropout=c.dropout,
    )
    hf = ChameleonVQVAE(hf_config).eval()
    encoder_only = {k: v for k, v in ours.state_dict().items() if not k.startswith("decoder.")}
    hf.load_state_dict(encoder_only, strict=True)  # same names, nothing left over on either side

    x = pixels(batch=3)
    codes = ours.encode(x)
    with torch.no_grad():
        ref = hf.encode(x)
    # transformers 5 returns an output object, 4.x the tuple (quant, emb_loss, indices).
    ref_codes = ref[2] if isinstance(ref, tuple) else ref.image_tokens
    assert codes.shape == (3, 16 * 16) and codes.dtype == torch.long
    assert torch.equal(codes, ref_codes.view(3, -1))
    assert codes.unique().numel() > 4
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(x), hf.encoder(x), rtol=1e-5, atol=1e-5)


def test_decode_shapes_and_raster_order():
    model = tiny_model()
    codes = model.encode(pixels(batch=2))
    out = model.decode(codes)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    # Non-square: 8x32 codes -> 16x64 pixels, code t at grid (t // 32, t % 32) (raster order).
    wide = torch.randint(0, 64, (1, 8 * 32))
    seen = []
    model.post_quant_conv.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    assert model.decode(wide, height=16, width=64).shape == (1, 3, 16, 64)
    assert model.decode(wide, width=64).shape == (1, 3, 16, 64)
    grid = seen[0][0]  # [C, 8, 32]
    table = model.quantize.embedding.weight
    for t in (0, 31, 32, 100, 255):
        assert torch.equal(grid[:, t // 32, t % 32], table[wide[0, t]])


def test_bad_inputs_fail_clearly():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode(pixels() * 127.5 + 127.5)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(pixels(size=31))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(pixels()[:, :1])
    with pytest.raises(TypeError, match="float tensor"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        model.decode(torch.full((1, 256), 64))
    with pytest.raises(TypeError, match="integer tensor"):
        model.decode(torch.zeros(1, 256))
    with pytest.raises(ValueError, match="not a square grid"):
        model.decode(torch.zeros(1, 200, dtype=torch.long))
    with pytest.raises(ValueError, match="does not hold"):
        model.decode(torch.zeros(1, 256, dtype=torch.long), height=32, width=64)
    with pytest.raises(ValueError, match="multiple of 2"):
        model.decode(torch.zeros(1, 256, dtype=torch.long), height=33)
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(ch=48)
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig(double_z=True)


def test_from_taming_local(tmp_path: Path, caplog):
    model = tiny_model()
    ckpt = write_taming(model, tmp_path / "chameleon")
    x = pixels()
    codes = model.encode(x)
    decoded = model.decode(codes)
    loaded = VQGAN.from_taming(tmp_path, subfolder="chameleon")  # folder + subfolder
    assert loaded.config == model.config
    assert torch.equal(loaded.encode(x), codes) and torch.equal(loaded.decode(codes), decoded)
    for other in (VQGAN.from_taming(ckpt),                                  # the file; yaml beside it
                  VQGAN.from_taming(ckpt, tmp_path / "chameleon" / "vqgan.yaml"),
                  VQGAN.from_taming(ckpt, model.config)):
        assert other.config == model.config
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), loaded.state_dict().values()))

    half = VQGAN.from_taming(ckpt, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.quantize.embedding.weight.dtype == torch.float32
    assert half.encode(x).shape == (2, 256) and half.decode(codes).dtype == torch.bfloat16


def assert_lists_bad_keys(message: str, missing: str) -> None:
    """The checkpoints below miss `missing`, add encoder.extra.weight and hold a 3x3 quant_conv."""
    lines = {line.split()[0]: line for line in message.splitlines()[1:]}
    assert missing in lines["missing"] and "encoder.extra.weight" in lines["unexpected"]
    assert all(s in lines["wrong"] for s in ("quant_conv.weight", "(8, 8, 3, 3)", "(8, 8, 1, 1)"))


def test_from_taming_reports_bad_keys(tmp_path: Path):
    model = tiny_model()
    state = dict(model.state_dict())
    del state["decoder.up.0.block.1.conv2.weight"]
    state["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    state["encoder.extra.weight"] = torch.zeros(1)
    ckpt = write_taming(model, tmp_path / "bad", state=state)
    with pytest.raises(ValueError) as info:
        VQGAN.from_taming(ckpt)
    assert_lists_bad_keys(str(info.value), "decoder.up.0.block.1.conv2.weight")

    # A checkpoint that does not fit the config (the default Chameleon one) lists the mismatch.
    with pytest.raises(ValueError, match="wrong shape"):
        VQGAN.from_taming(write_taming(model, tmp_path / "good"), VQGANConfig(ch=32, ch_mult=(1, 2)))
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="could not read"):
        VQGAN.from_taming(tmp_path / "corrupt.ckpt", model.config)
    with pytest.raises(FileNotFoundError):
        VQGAN.from_taming(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype"):
        VQGAN.from_taming(ckpt, dtype=torch.int8)


def test_from_taming_hub_id_goes_through_huggingface_hub(tmp_path: Path, monkeypatch):
    model = tiny_model()
    write_taming(model, tmp_path / "space" / "chameleon")
    calls = []

    def fake_hf_hub_download(repo_id, filename, *, subfolder=None, repo_type=None, revision=None, **kwargs):
        calls.append((repo_id, subfolder, filename, repo_type, revision))
        assert repo_id == "Junfeng5/Liquid_demo"
        return str(tmp_path / "space" / subfolder / filename)

    monkeypatch.setattr("medim.utils.hub.hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr("medim.utils.hub.hub_fetch_options", lambda repo_id, hub=None, **kwargs: hub or HubOptions())
    loaded = VQGAN.from_taming("Junfeng5/Liquid_demo", repo_type="space", subfolder="chameleon", revision="main")
    assert sorted(calls) == [("Junfeng5/Liquid_demo", "chameleon", name, "space", "main")
                             for name in ("vqgan.ckpt", "vqgan.yaml")]
    x = pixels()
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_save_pretrained_round_trip(tmp_path: Path):
    model = tiny_model(attn_resolutions=(16,))
    out = model.save_pretrained(tmp_path / "pipe" / "vqgan")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQGAN.from_pretrained(tmp_path / "pipe", subfolder="vqgan")
    assert loaded.config == model.config
    x = pixels()
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))

    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(out)
    tiny_model(seed=5).save_pretrained(out, overwrite=True)
    assert not torch.equal(VQGAN.from_pretrained(out).decode(codes), model.decode(codes))
    assert [p.name for p in (tmp_path / "pipe").iterdir()] == ["vqgan"]  # no temp folders left

    (out / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="could not read"):
        VQGAN.from_pretrained(out)


def test_saved_format_is_unchanged(tmp_path: Path, capsys):
    """Folders in the format medim has always written load bit for bit, and save_pretrained writes
    that format byte for byte (so older readers keep reading new folders)."""
    model = tiny_model(attn_resolutions=(16,))
    old = write_medim_folder(model, tmp_path / "old", version=medim.__version__)
    loaded = VQGAN.from_pretrained(old)
    assert capsys.readouterr().out == ""  # no stdout chatter (the mixin's loader prints)
    assert loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())

    new = loaded.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in new.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (new / name).read_bytes() == (old / name).read_bytes(), name
    # What an older medim did on load: from_dict of the json (metadata keys ignored) + load_file.
    config = json.loads((new / "config.json").read_text())
    assert config["_class_name"] == "VQGAN" and VQGANConfig.from_dict(config) == model.config
    with safe_open(new / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    state = load_file(new / "model.safetensors")
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bundled_demo_vqgan_loads_bit_for_bit(tmp_path: Path):
    raw = load_file(DEMO_VQGAN / "model.safetensors")
    vqgan = VQGAN.from_pretrained(DEMO_VQGAN)
    assert vqgan.num_codes == 128 and vqgan.dtype == torch.float32
    assert vqgan.state_dict().keys() == raw.keys()
    assert all(torch.equal(vqgan.state_dict()[k], v) for k, v in raw.items())
    resaved = vqgan.save_pretrained(tmp_path / "vqgan")
    assert (resaved / "model.safetensors").read_bytes() == (DEMO_VQGAN / "model.safetensors").read_bytes()


def test_from_pretrained_is_strict(tmp_path: Path):
    model = tiny_model()
    folder = write_medim_folder(model, tmp_path / "bad")
    state = dict(model.state_dict())
    del state["decoder.conv_out.bias"]
    state["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError) as info:
        VQGAN.from_pretrained(folder)
    assert_lists_bad_keys(str(info.value), "decoder.conv_out.bias")

    good = write_medim_folder(model, tmp_path / "good")
    half = VQGAN.from_pretrained(good, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.quantize.embedding.weight.dtype == torch.float32
    assert torch.equal(half.quantize.embedding.weight, model.quantize.embedding.weight)
    with pytest.raises(ValueError, match="dtype must be a floating"):
        VQGAN.from_pretrained(good, dtype=torch.int64)
    with pytest.raises(ValueError, match="device must be"):
        VQGAN.from_pretrained(good, device="not-a-device")
    config = json.loads((good / "config.json").read_text())
    (good / "config.json").write_text(json.dumps({**config, "n_embeds": 64}))
    with pytest.raises(ValueError, match=r"unknown VQGANConfig fields \['n_embeds'\]"):
        VQGAN.from_pretrained(good)
    with pytest.raises(FileNotFoundError, match="config.json"):
        VQGAN.from_pretrained(tmp_path, subfolder="nowhere")


def test_offline_from_hub_cache(tmp_path: Path):
    """HF_HUB_OFFLINE=1 (tests/conftest.py): a VQGAN inside a cached pipeline repo loads by repo id."""
    model = tiny_model()
    model.save_pretrained(tmp_path / "pipe" / "vqgan")
    cache = tmp_path / "hub"
    to_hub_cache(cache, "org/medim-tiny", tmp_path / "pipe")
    x = pixels()
    for kwargs in ({}, {"local_files_only": True}):
        loaded = VQGAN.from_pretrained("org/medim-tiny", subfolder="vqgan", cache_dir=cache, **kwargs)
        assert loaded.config == model.config and torch.equal(loaded.encode(x), model.encode(x))
    with pytest.raises(Exception, match="org/missing|offline|cache"):
        VQGAN.from_pretrained("org/missing", subfolder="vqgan", cache_dir=cache)


def test_model_card_only_when_asked_and_on_push(tmp_path: Path, monkeypatch):
    model = tiny_model()
    plain = model.save_pretrained(tmp_path / "plain")  # e.g. pipeline/vqgan: the pipeline has the card
    assert not (plain / "README.md").exists()
    carded = model.save_pretrained(tmp_path / "carded", model_card_kwargs={})
    card = (carded / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: medim" in card and "- vqgan" in card
    with pytest.raises(ValueError, match="config must be None"):
        model.save_pretrained(tmp_path / "other", config={"n_embed": 3})
    assert not (tmp_path / "other").exists()

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
            seen["create"] = (repo_id, private, exist_ok)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
            folder = Path(folder_path)
            seen["files"] = sorted(p.name for p in folder.iterdir())
            seen["card"] = (folder / "README.md").read_text()
            seen["loaded"] = VQGAN.from_pretrained(folder)
            return f"https://hf.co/{repo_id}/commit/1"

    monkeypatch.setattr("huggingface_hub.hub_mixin.HfApi", FakeApi)
    url = model.push_to_hub("me/tiny-vqgan", private=True, token="hf_x")
    assert url == "https://hf.co/me/tiny-vqgan/commit/1"
    assert seen["create"] == ("me/tiny-vqgan", True, True) and seen["token"] == "hf_x"
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert 'VQGAN.from_pretrained("me/tiny-vqgan")' in seen["card"]
    assert all(torch.equal(seen["loaded"].state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_chameleon_config_512px():
    config = VQGANConfig()  # the released vqgan.yaml values
    with torch.device("meta"):
        count = VQGAN(config).num_parameters()
    print(f"Chameleon VQGAN parameters: {count:,} ({count / 1e6:.1f} M)")
    assert round(count / 1e6, 1) == 68.7
    assert config.downsample_factor == 16

    torch.manual_seed(0)
    model = VQGAN(config).eval().to(memory_format=torch.channels_last)  # ~2x faster convs on CPU
    image = pixels(batch=1, size=512).contiguous(memory_format=torch.channels_last)
    codes = model.encode(image)
    assert codes.shape == (1, 1024) and int(codes.max()) < 8192
    out = model.decode(codes)
    assert out.shape == (1, 3, 512, 512) and out.abs().max() <= 1
