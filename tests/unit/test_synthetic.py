import io
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from medim.data.synthetic import (
    Lesion,
    PhantomSpec,
    compare,
    make_dataset,
    make_pair,
    parse_report,
    read_image,
    render,
    write_report,
)


@pytest.fixture(scope="module")
def pairs():
    return make_dataset(300, seed=1234)


def _degrade(image: Image.Image) -> Image.Image:
    """Mild blur, downscale/upscale, 8-bit JPEG round trip: what a small VQGAN does to a phantom."""
    w, h = image.size
    image = image.filter(ImageFilter.GaussianBlur(1.0))
    image = image.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=75)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_pairs_are_deterministic_and_varied(pairs):
    image, report, spec = make_pair(np.random.default_rng([1234, 7]))
    assert report == pairs[7][1] and spec == pairs[7][2]
    assert np.array_equal(np.asarray(image), np.asarray(pairs[7][0]))
    assert image.size == (64, 64) and image.mode == "L"
    counts = {len(s.lesions) for _, _, s in pairs}
    assert counts == {0, 1, 2}
    assert len({r for _, r, _ in pairs}) > 100  # phrasing is drawn, not fixed
    assert all(len(r.split()) < 40 for _, r, _ in pairs)
    assert make_dataset(3, seed=1234)[2][1] == pairs[2][1]  # item i does not depend on n


def test_readers_are_exact_on_generator_output(pairs):
    truth = [s for _, _, s in pairs]
    for scores in (
        compare([read_image(im) for im, _, _ in pairs], truth),
        compare([parse_report(r) for _, r, _ in pairs], truth),
    ):
        assert scores.exact == scores.count == scores.presence == scores.attributes == 1.0
        assert scores.size == scores.density == 1.0
        assert scores.n == 300 and scores.matched == sum(len(s.lesions) for s in truth)


def test_read_image_survives_mild_degradation(pairs):
    truth = [s for _, _, s in pairs]
    assert compare([read_image(_degrade(im)) for im, _, _ in pairs], truth).exact == 1.0


@pytest.mark.parametrize("size", [48, 256])
def test_other_sizes(size):
    pairs = make_dataset(40, seed=5, size=size)
    assert pairs[0][0].size == (size, size)
    assert compare([read_image(im) for im, _, _ in pairs], [s for _, _, s in pairs]).exact == 1.0


def test_side_convention_is_the_patients():
    # The patient's right is drawn on the image's left half.
    spec = PhantomSpec((Lesion("right", "upper", "large", "bright"),))
    pixels = np.asarray(render(spec, np.random.default_rng(0), 64), dtype=float)
    assert pixels[:32, :32].max() > 200 and pixels[:32, 32:].max() < 180
    image, report, got = make_pair(0, spec=spec)
    assert got == spec and "right" in report and "upper" in report
    assert read_image(image) == spec == parse_report(report)


def test_reports_describe_each_lesion_once():
    spec = PhantomSpec(
        (Lesion("left", "lower", "small", "dark"), Lesion("right", "upper", "large", "bright"))
    )
    for seed in range(20):
        report = write_report(spec, np.random.default_rng(seed))
        words = re.findall(r"[a-z]+", report.lower())
        assert words.count("left") == 1 and words.count("right") == 1
        assert words.index("right") < words.index("left")  # fixed reading order, whatever the seed
        assert parse_report(report) == spec
    normal = write_report(PhantomSpec(), np.random.default_rng(0))
    assert parse_report(normal) == PhantomSpec()


def test_parse_report_lenient_and_strict():
    text = "A big dense mass in the left upper zone. Something in the right lower zone. Lesion on the right."
    with pytest.raises(ValueError, match="misses"):
        parse_report(text)
    got = parse_report(text, strict=False)
    assert got == PhantomSpec(
        (Lesion("left", "upper", "large", "bright"), Lesion("right", "lower", None, None))
    )
    dup = "A small dense nodule in the left upper zone. A large lucent nodule in the left upper lung."
    with pytest.raises(ValueError, match="repeats"):
        parse_report(dup)
    assert parse_report(dup, strict=False).at("left", "upper").size == "small"


def test_compare_partial_scores():
    a = PhantomSpec((Lesion("right", "upper", "small", "bright"),))
    b = PhantomSpec((Lesion("right", "upper", "large", "bright"), Lesion("left", "lower", "small", "dark")))
    scores = compare([a, PhantomSpec()], [b, PhantomSpec()])
    assert scores.exact == 0.5 and scores.count == 0.5
    assert scores.presence == 7 / 8 and scores.size == 0.0 and scores.density == 1.0 and scores.matched == 1
    # quadrants described in full: the first pair's two empty ones, all four of the second
    assert scores.attributes == 6 / 8
    assert math.isnan(compare([PhantomSpec()], [PhantomSpec()]).size)


def test_compare_attributes_need_the_whole_description():
    truth = PhantomSpec((Lesion("right", "upper", "large", "bright"),))
    # A lesion in the right place counts for presence only when its description is whole and right.
    for wrong in (Lesion("right", "upper", None, "bright"), Lesion("right", "upper", "large", "dark")):
        scores = compare([PhantomSpec((wrong,))], [truth])
        assert scores.presence == 1.0 and scores.attributes == 3 / 4 and scores.exact == 0.0
    assert compare([truth], [truth]).attributes == 1.0
    # Answering "no lesion" everywhere: every quadrant holding a lesion is missed, the rest are right.
    pairs = make_dataset(50, seed=9)
    truth = [s for _, _, s in pairs]
    lesions = sum(len(s.lesions) for s in truth)
    scores = compare([PhantomSpec()] * 50, truth)
    assert scores.attributes == scores.presence == 1 - lesions / 200
    assert scores.exact == sum(not s.lesions for s in truth) / 50


def test_spec_round_trip_and_validation():
    spec = PhantomSpec(
        (Lesion("left", "lower", "small", "dark"), Lesion("right", "upper", "large", "bright"))
    )
    assert spec.lesions[0].quadrant == ("right", "upper")  # canonical order
    assert PhantomSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="side must be one of"):
        Lesion("middle", "upper", "small", "dark")
    with pytest.raises(ValueError, match="density must be one of"):
        Lesion("left", "upper", "small", "grey")
    with pytest.raises(ValueError, match="one lesion per quadrant"):
        PhantomSpec((Lesion("left", "upper", "small", "dark"), Lesion("left", "upper", "large", "dark")))


def test_bad_arguments():
    with pytest.raises(ValueError, match="size must be"):
        make_pair(0, size=8)
    with pytest.raises(TypeError, match="rng_or_seed"):
        make_pair("seed")
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(-1)
    with pytest.raises(TypeError, match="image must be"):
        read_image(np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="same length"):
        compare([PhantomSpec()], [])
