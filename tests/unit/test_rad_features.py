"""Radiology image features and diversity: the Frechet distance on RAD-DINO features (a small DINOv2
made here, with RAD-DINO's preprocessing settings) against a direct transformers computation, and
the MS-SSIM diversity against pytorch-msssim on the same pairs."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from medim.evaluation import RadDinoFeatures, feature_statistics, fid, frechet_distance, ms_ssim_diversity
from medim.evaluation.rad_features import _image_processor_class

# microsoft/rad-dino's preprocessor_config.json, at 28 pixels instead of 518 (the stand-in's size).
PROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 28}, resample=3, do_center_crop=True,
    crop_size={"height": 28, "width": 28}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
    image_mean=[0.5307, 0.5307, 0.5307], image_std=[0.2583, 0.2583, 0.2583], do_convert_rgb=True,
)


@pytest.fixture(scope="module")
def rad_dino(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("rad-dino")
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=28
    )
    Dinov2Model(config).save_pretrained(folder)
    _image_processor_class()(**PROCESSOR).save_pretrained(folder)
    return folder


def _images(folder, n, seed, sizes=((40, 30), (28, 28), (64, 48))):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        mode = "L" if i % 2 else "RGB"
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i:03d}.png")
    return folder


def test_rad_dino_fd_equals_direct_transformers(rad_dino, tmp_path):
    from transformers import Dinov2Model

    real, fake = _images(tmp_path / "real", 7, 0), _images(tmp_path / "fake", 6, 1)
    with pytest.warns(UserWarning, match="biased"):
        out = fid(real, fake, features="rad-dino", weights=rad_dino, batch_size=4, device="cpu")
    # Directly: the model card's recipe (the folder's processor, Dinov2Model, pooler_output).
    processor = _image_processor_class().from_pretrained(rad_dino)
    model = Dinov2Model.from_pretrained(rad_dino).eval()

    def direct(folder):
        images = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())]
        with torch.no_grad():
            return model(**processor(images=images, return_tensors="pt")).pooler_output

    expected = frechet_distance(*feature_statistics(direct(real)), *feature_statistics(direct(fake)))
    assert out.fid == pytest.approx(expected, rel=1e-6)
    assert out.fid > 0 and (out.num_real, out.num_generated, out.feature_dim) == (7, 6, 24)
    assert out.extractor.startswith("RAD-DINO pooler_output")


def test_rad_dino_preprocessing_is_the_model_cards(rad_dino):
    extractor = RadDinoFeatures.from_pretrained(rad_dino, device="cpu")
    image = Image.fromarray(np.full((30, 60), 200, dtype=np.uint8), "L")
    pixels = extractor.preprocess([image])
    # short side to 28, center crop 28x28, (200/255 - mean) / std on every channel
    assert pixels.shape == (1, 3, 28, 28)
    assert pixels.float().mean().item() == pytest.approx((200 / 255 - 0.5307) / 0.2583, abs=1e-3)


def test_rad_dino_missing_weights_name_the_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="microsoft/rad-dino") as info:
        RadDinoFeatures.from_pretrained(tmp_path / "absent", device="cpu")
    assert "\n" not in str(info.value)


def test_fid_feature_arguments_checked_first(tmp_path):
    with pytest.raises(ValueError, match="features"):
        fid(tmp_path / "a", tmp_path / "b", features="dino", weights="x")
    with pytest.raises(ValueError, match="feature_extractor"):
        fid(tmp_path / "a", tmp_path / "b", features="rad-dino", feature_extractor=lambda x: x)


def test_cli_fid_rad_dino(rad_dino, tmp_path, capsys):
    from medim.cli import main

    real, fake = _images(tmp_path / "real", 4, 0), _images(tmp_path / "fake", 4, 1)
    output = tmp_path / "fd.json"
    argv = ["evaluate", "fid", "--features", "rad-dino", "--weights", str(rad_dino), "--real", str(real),
            "--fake", str(fake), "--device", "cpu", "--output", str(output)]
    with pytest.warns(UserWarning):
        assert main(argv) == 0
    result = json.loads(output.read_text())
    with pytest.warns(UserWarning):
        direct = fid(real, fake, features="rad-dino", weights=rad_dino, device="cpu")
    assert result["fid"] == direct.fid and result["features"] == "rad-dino"
    assert "FD (RAD-DINO)" in capsys.readouterr().out


# ---------------------------------------------------------------- MS-SSIM diversity
def test_ms_ssim_diversity_equals_pytorch_msssim(tmp_path):
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    folder = _images(tmp_path / "gen", 5, 2, sizes=((192, 192),))
    out = ms_ssim_diversity(folder, size=192, batch_size=3)
    stack = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        for p in sorted(folder.iterdir())
    ])
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    values = torch.stack([pytorch_msssim.ms_ssim(stack[i : i + 1], stack[j : j + 1], data_range=1.0) for i, j in pairs])
    assert out.num_pairs == 10 and out.num_images == 5
    assert out.ms_ssim == pytest.approx(values.double().mean().item(), rel=1e-5)
    same = tmp_path / "same"
    same.mkdir()
    for i in range(3):
        Image.open(folder / "000.png").save(same / f"{i}.png")
    assert ms_ssim_diversity(same, size=192).ms_ssim == pytest.approx(1.0, abs=1e-5)


def test_ms_ssim_diversity_samples_pairs(tmp_path):
    pytest.importorskip("pytorch_msssim")
    folder = _images(tmp_path / "gen", 6, 3, sizes=((170, 170),))
    a = ms_ssim_diversity(folder, size=170, max_pairs=4, seed=1)
    assert a.num_pairs == 4 and a == ms_ssim_diversity(folder, size=170, max_pairs=4, seed=1)


def test_ms_ssim_diversity_checks(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="size"):
        ms_ssim_diversity(tmp_path, size=128)
    folder = _images(tmp_path / "one", 1, 0)
    monkeypatch.setitem(sys.modules, "pytorch_msssim", None)
    with pytest.raises(ImportError, match=r"medim-diffusion\[clinical\]"):
        ms_ssim_diversity(_images(tmp_path / "two", 2, 0))
    with pytest.raises(ValueError, match="at least 2"):
        ms_ssim_diversity(folder)
