from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medim.data.images import PAD_COLOR, load_image, postprocess, preprocess


def gradient(w: int, h: int, dtype=np.uint8, lo: int = 0, hi: int = 255) -> np.ndarray:
    ramp = np.linspace(lo, hi, w * h).reshape(h, w)
    return np.rint(ramp).astype(dtype)


def test_all_kinds_of_inputs_become_square_batches(tmp_path: Path):
    xray16 = Image.fromarray(gradient(37, 23, np.uint16, 1000, 40000))
    assert xray16.mode == "I;16"
    palette = Image.new("P", (20, 30), 3)
    palette.info["transparency"] = 3
    Image.fromarray(gradient(40, 28)).save(tmp_path / "gray.png")
    inputs = [
        Image.fromarray(gradient(31, 17)),                                  # L, odd size
        xray16,                                                             # I;16
        Image.fromarray(gradient(20, 50, np.int32, -5, 70000)),             # I (32-bit)
        Image.fromarray(gradient(19, 19).astype(np.float32) * 3.5),         # F
        Image.new("RGBA", (33, 21), (10, 20, 30, 128)),                     # RGBA
        Image.new("LA", (12, 40), (50, 0)),                                 # LA
        palette,                                                            # P with transparency
        Image.new("1", (9, 7), 1),                                          # bilevel
        Image.new("CMYK", (16, 16), (0, 255, 0, 0)),                        # CMYK
        tmp_path / "gray.png",                                              # a file path
        str(tmp_path / "gray.png"),
        gradient(25, 11, np.uint16, 0, 4095),                               # HxW uint16 (12-bit)
        np.stack([gradient(10, 14)] * 3, axis=-1),                          # HxWx3 uint8
        gradient(13, 13)[..., None].astype(np.float32) / 255,               # HxWx1 float in [0, 1]
        torch.rand(3, 15, 22),                                              # CHW float tensor
        torch.randint(0, 256, (1, 9, 30), dtype=torch.uint8),               # 1xHxW uint8 tensor
    ]
    pixels, sizes = preprocess(inputs, size=32, return_sizes=True)
    assert pixels.shape == (len(inputs), 3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert sizes[:3] == [(31, 17), (37, 23), (20, 50)] and sizes[-1] == (30, 9) and sizes[-2] == (22, 15)
    crop = preprocess(inputs, size=16, resize="crop")
    assert crop.shape == (len(inputs), 3, 16, 16) and crop.min() >= -1 and crop.max() <= 1


def test_high_bit_depth_uses_the_actual_range():
    # A 12-bit X-ray stored in 16 bits: clipping or dividing by 256 would give a nearly black image.
    rgb = np.asarray(load_image(Image.fromarray(gradient(64, 64, np.uint16, 1000, 3000))))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    big_endian = Image.fromarray(gradient(8, 8, np.uint16, 10, 20)).convert("I;16B")
    assert np.asarray(load_image(big_endian)).max() == 255
    assert np.asarray(load_image(Image.new("I;16", (4, 4), 7))).max() == 0  # flat image: no division by zero


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    out = np.asarray(load_image(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 0, 0]
    half = np.asarray(load_image(Image.new("LA", (1, 1), (0, 128))))
    assert abs(int(half[0, 0, 0]) - 127) <= 1


def test_pad_uses_medim_colour_and_keeps_content_centered():
    red = Image.new("RGB", (20, 10), (255, 0, 0))
    pixels = preprocess(red, size=20)  # already 20 wide: no resampling blur
    to_unit = torch.tensor(PAD_COLOR, dtype=torch.float32) / 255 * 2 - 1
    assert torch.equal(pixels[0, :, 0, 0], to_unit) and torch.equal(pixels[0, :, 19, 19], to_unit)
    assert torch.equal(pixels[0, :, 5:15, :], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 10, 20))
    # pixels are exactly x / 255 * 2 - 1
    gray = Image.fromarray(gradient(16, 16))
    expected = torch.from_numpy(gradient(16, 16)).float() / 255 * 2 - 1
    assert torch.equal(preprocess(gray, size=16)[0, 1], expected)


def test_crop_keeps_the_center():
    strip = np.zeros((10, 30, 3), dtype=np.uint8)
    strip[:, :10] = (255, 0, 0)
    strip[:, 10:20] = (0, 255, 0)
    strip[:, 20:] = (0, 0, 255)
    pixels = preprocess(strip, size=10, resize="crop")
    assert torch.equal(pixels[0], torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 10, 10))
    wide = preprocess(strip, size=5, resize="crop")  # short side 10 -> 5, then crop the middle
    assert wide.shape == (1, 3, 5, 5) and wide[0, 1].mean() > 0.9


def test_postprocess_rounds_and_round_trips():
    x = torch.tensor([-1.0, 1.0, 100.6 / 127.5 - 1, 100.4 / 127.5 - 1, 5.0, -7.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = postprocess(x, output_type="np")
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 255, 101, 100, 255, 0]  # rounding, not truncation; clamped

    images = [Image.fromarray(np.stack([gradient(12, 12), gradient(12, 12)[::-1], gradient(12, 12).T], -1))]
    pil = postprocess(preprocess(images, size=12))
    assert isinstance(pil, list) and pil[0].mode == "RGB"
    assert np.array_equal(np.asarray(pil[0]), np.asarray(images[0]))  # uint8 -> [-1, 1] -> uint8 exactly
    assert postprocess(torch.zeros(3, 4, 4, dtype=torch.bfloat16), output_type="np").shape == (1, 4, 4, 3)


def test_bad_inputs_fail_clearly(tmp_path: Path):
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocess(Image.new("RGB", (4, 4)), resize="stretch")
    with pytest.raises(ValueError, match="size must be a positive int"):
        preprocess(Image.new("RGB", (4, 4)), size=0)
    with pytest.raises(ValueError, match="images is empty"):
        preprocess([])
    with pytest.raises(TypeError, match="PIL image, a path"):
        load_image(42)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        load_image(tmp_path / "text.png")
    with pytest.raises(ValueError, match=r"C in \(1, 3, 4\)"):
        load_image(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(torch.rand(3, 4, 4) * 2 - 1)
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_image(np.zeros((4, 4), dtype=np.complex64))
    with pytest.raises(ValueError, match="empty"):
        load_image(np.zeros((0, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="output_type must be one of"):
        postprocess(torch.zeros(1, 3, 2, 2), output_type="pt")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        postprocess(torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match="float tensor"):
        postprocess(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


def test_non_finite_float_images_are_refused_by_name(tmp_path: Path):
    # Before: a PIL "F" image with NaN was stretched by a NaN range into a black image and got a report.
    nan = np.full((8, 8), 0.5, dtype=np.float32)
    nan[2, 3] = np.nan
    inf = np.full((8, 8), 0.5, dtype=np.float32)
    inf[0, :2] = [np.inf, -np.inf]
    with pytest.raises(ValueError, match=r"^image \(PIL mode 'F'\) holds 1 NaN or infinite value\(s\) out of 64"):
        load_image(Image.fromarray(nan * 1000))
    with pytest.raises(ValueError, match=r"^image \(PIL mode 'F'\) holds 2 NaN"):
        load_image(Image.fromarray(inf))
    with pytest.raises(ValueError, match=r"^image array holds 1 NaN"):
        load_image(nan)
    with pytest.raises(ValueError, match=r"^image tensor holds 2 NaN"):
        load_image(torch.from_numpy(inf)[None].to(torch.bfloat16))
    Image.fromarray(nan).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nan.tif'} \\(PIL mode 'F'\\) holds 1 NaN"):
        load_image(tmp_path / "nan.tif")
    good = Image.fromarray(gradient(8, 8)).convert("F")
    with pytest.raises(ValueError, match=r"^images\[2\] \(.*nan.tif\) \(PIL mode 'F'\) holds 1 NaN"):
        preprocess([good, good, tmp_path / "nan.tif"], size=8)
    with pytest.raises(ValueError, match=r"^images\[1\] holds 2 NaN"):
        preprocess(np.stack([np.full((8, 8), 0.5, dtype=np.float32), inf])[..., None], size=8)
    assert np.asarray(load_image(good)).max() == 255  # finite "F" images still load


def test_truncated_file_is_named(tmp_path: Path):
    Image.fromarray(gradient(64, 64)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"^{tmp_path / 'cut.png'} could not be decoded: .*truncated"):
        load_image(tmp_path / "cut.png")
