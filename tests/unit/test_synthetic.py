import hashlib
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from medim.data.datasets import build_dataset
from medim.data.synthetic import (
    Effusion,
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


# ----------------------------------------------------------------------------- base streams, unchanged

def _digest(pairs) -> str:
    h = hashlib.sha256()
    for image, report, spec in pairs:
        h.update(image.tobytes())
        h.update(report.encode())
        h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def test_base_phantoms_are_byte_identical_to_before_the_variant():
    # Digests computed with the pre-variant code (/work/before, commit 00428b4).
    assert _digest(make_dataset(6, seed=0)) == "6b1f3a660c015f43d9158a7ebc8a7bacd9fdd3c4b739dd22d3e167b4ab66c409"
    assert _digest(make_dataset(4, seed=123, size=96)) == \
        "dbd4bb435b2f4c562ed44bc355ff39274486ad4bb2e1659a7f35e05640e4283c"
    assert _digest([make_pair(7)]) == "c7e2355ed9cdfac096dbce48339e2aa4f093e50ad15d37b33fec2a0f2c88c0b5"
    assert _digest([make_pair(np.random.default_rng(99), size=48)]) == \
        "215f20cbb35731603f6b36a3ee8d02d406238cbe552f9cbc103ec96ca49ad122"
    assert _digest(make_dataset(6, seed=0, variant=None)) == _digest(make_dataset(6, seed=0))


# ----------------------------------------------------------------------------- the effusion variant

@pytest.fixture(scope="module")
def effusions():
    return make_dataset(300, seed=1234, variant="effusion")


def test_effusion_variant_draws_every_kind(effusions):
    kinds = {(s.effusion.side, s.effusion.size) if s.effusion else None for _, _, s in effusions}
    assert kinds == {None, ("right", "small"), ("right", "large"), ("left", "small"), ("left", "large")}
    present = sum(s.effusion is not None for _, _, s in effusions) / len(effusions)
    assert 0.55 < present < 0.78  # 2 in 3
    assert {len(s.lesions) for _, _, s in effusions} == {0, 1, 2}
    for _, report, spec in effusions:
        if spec.effusion is not None:
            assert spec.at(spec.effusion.side, "lower") is None  # the fluid obscures that zone
            assert len(spec.lesions) <= 1
            assert "pleural effusion" in report.lower()
        else:
            assert "effusion" not in report.lower()


def test_effusion_reports_fit_the_demo_text_length():
    # The demo model is what gets fine-tuned on the variant: no report may be truncated.
    from transformers import AutoTokenizer

    from medim.demo.settings import TEXT_LEN, demo_path

    tokenizer = AutoTokenizer.from_pretrained(str(demo_path() / "tokenizer"))
    reports = [r for _, r, s in make_dataset(2000, seed=3, variant="effusion") if s.effusion is not None]
    longest = max(len(tokenizer(r)["input_ids"]) for r in reports)
    assert longest + 1 <= TEXT_LEN  # + the end-of-report mark


def test_effusion_readers_are_exact(effusions):
    truth = [s for _, _, s in effusions]
    for predicted in (
        [read_image(im, variant="effusion") for im, _, _ in effusions],
        [read_image(_degrade(im), variant="effusion") for im, _, _ in effusions],
        [parse_report(r) for _, r, _ in effusions],
    ):
        scores = compare(predicted, truth)
        assert scores.exact == scores.attributes == scores.effusion == 1.0
    # The base reader does not look for an effusion: the fluid reads as a lesion in the lower zone.
    assert compare([read_image(im) for im, _, _ in effusions], truth).exact < 0.6


@pytest.mark.parametrize("size", [48, 256])
def test_effusion_other_sizes(size):
    pairs = make_dataset(40, seed=5, size=size, variant="effusion")
    assert compare([read_image(im, variant="effusion") for im, _, _ in pairs], [s for _, _, s in pairs]).exact == 1.0


def test_effusion_reader_finds_none_on_base_phantoms(pairs):
    assert all(read_image(im, variant="effusion") == spec for im, _, spec in pairs)


def test_effusion_is_drawn_at_the_base_of_its_side():
    spec = PhantomSpec(effusion=Effusion("right", "large"))  # the patient's right: the image's left
    image, report, got = make_pair(0, spec=spec)
    pixels = np.asarray(image, dtype=float)
    assert got == spec and parse_report(report) == spec and read_image(image, variant="effusion") == spec
    assert pixels[50:56, 14:28].mean() > pixels[50:56, 36:50].mean() + 60  # bright fluid, left half only
    assert pixels[8:20, 14:28].mean() < pixels[50:56, 14:28].mean() - 60  # the upper zone stays clear
    small = np.asarray(make_pair(0, spec=PhantomSpec(effusion=Effusion("right", "small")))[0], dtype=float)
    assert small[40:44, 14:28].mean() < pixels[40:44, 14:28].mean() - 60  # a small one stays lower


def test_effusion_reports_parse_strict_and_lenient():
    assert parse_report("Tiny pleural effusion on the left.") == PhantomSpec(effusion=Effusion("left", "small"))
    text = "A big dense nodule in the left upper zone. There is a right pleural effusion."
    with pytest.raises(ValueError, match="misses the effusion's side or size"):
        parse_report(text)
    assert parse_report(text, strict=False) == PhantomSpec(
        (Lesion("left", "upper", "large", "bright"),), Effusion("right", None)
    )
    two = "A small right pleural effusion. A large left pleural effusion."
    with pytest.raises(ValueError, match="repeats the effusion"):
        parse_report(two)
    assert parse_report(two, strict=False).effusion == Effusion("right", "small")
    assert parse_report("Pleural effusion.", strict=False) == PhantomSpec()  # no side: nothing to keep


def test_effusion_spec_round_trip_and_scores():
    spec = PhantomSpec((Lesion("left", "upper", "small", "dark"),), Effusion("right", "large"))
    assert PhantomSpec.from_dict(spec.to_dict()) == spec
    assert "effusion" not in PhantomSpec((Lesion("left", "upper", "small", "dark"),)).to_dict()  # base metadata
    with pytest.raises(ValueError, match="effusion side must be one of"):
        Effusion("middle", "small")
    with pytest.raises(ValueError, match="effusion size must be one of"):
        Effusion("left", "medium")
    wrong_size = PhantomSpec(spec.lesions, Effusion("right", "small"))
    scores = compare([wrong_size, spec, PhantomSpec(spec.lesions)], [spec, spec, spec])
    assert scores.effusion == 1 / 3 and scores.attributes == 1.0 and scores.exact == 1 / 3
    assert compare([PhantomSpec()], [PhantomSpec()]).effusion == 1.0


def test_effusion_variant_bad_arguments():
    for call in (lambda: make_pair(0, variant="cardiomegaly"), lambda: make_dataset(2, variant="x"),
                 lambda: read_image(make_pair(0)[0], variant="X"), lambda: build_dataset("phantom", n=2, variant="x")):
        with pytest.raises(ValueError, match="variant must be None or one of"):
            call()


def test_phantom_dataset_variant():
    ds = build_dataset("phantom", n=3, seed=1, variant="effusion")
    expected = make_dataset(3, seed=1, variant="effusion")
    for i, (image, report, spec) in enumerate(expected):
        item = ds[i]
        assert item["id"] == f"phantom-effusion-1-{i}" and item["report"] == report
        assert np.array_equal(np.asarray(item["image"]), np.asarray(image))
        assert item["meta"]["variant"] == "effusion" and PhantomSpec.from_dict(item["meta"]["spec"]) == spec
    base = build_dataset("phantom", n=1, seed=1)[0]
    assert base["id"] == "phantom-1-0" and "variant" not in base["meta"]


# ----------------------------------------------------------------------------- the multiple variant

@pytest.fixture(scope="module")
def multiples():
    return make_dataset(200, seed=4321, variant="multiple")


def test_multiple_variant_draws_three_or_four_lesions_in_one_sentence(multiples):
    assert {len(s.lesions) for _, _, s in multiples} == {3, 4}
    for _, report, spec in multiples:
        assert spec.effusion is None
        listed = report.split("Multiple ")[1]
        assert listed.count(",") == len(spec.lesions) - 1 and listed.endswith(".")


def test_multiple_readers_are_exact(multiples):
    truth = [s for _, _, s in multiples]
    for predicted in ([read_image(im) for im, _, _ in multiples], [read_image(_degrade(im)) for im, _, _ in multiples],
                      [parse_report(r) for _, r, _ in multiples]):
        assert compare(predicted, truth).exact == 1.0


def test_multiple_reports_fit_the_demo_text_length():
    from transformers import AutoTokenizer

    from medim.demo.settings import TEXT_LEN, demo_path

    tokenizer = AutoTokenizer.from_pretrained(str(demo_path() / "tokenizer"))
    longest = max(len(tokenizer(r)["input_ids"]) for _, r, _ in make_dataset(2000, seed=3, variant="multiple"))
    assert longest + 1 <= TEXT_LEN


def test_multiple_list_parses_clause_by_clause():
    text = "Multiple foci: right upper tiny bright, left lower big hypodense, left upper small dense."
    assert parse_report(text) == PhantomSpec((Lesion("right", "upper", "small", "bright"),
                                              Lesion("left", "upper", "small", "bright"),
                                              Lesion("left", "lower", "large", "dark")))
    with pytest.raises(ValueError, match="misses"):
        parse_report("Multiple nodules: right upper small dense, left lower big.")


# ----------------------------------------------------------------------------- the structured variant

def test_structured_variant_draws_the_base_specs_in_another_report_form():
    structured, base = make_dataset(300, seed=11, variant="structured"), make_dataset(300, seed=11)
    assert [s for _, _, s in structured] == [s for _, _, s in base]
    for image, report, spec in structured:
        assert report.startswith("Findings: ") and report.endswith(".")
        assert (report == "Findings: none.") == (not spec.lesions)
        assert read_image(image) == spec == parse_report(report) == parse_report(report, variant="structured")


def test_structured_reader_reads_lobe_abbreviations_only():
    assert parse_report("Findings: RLL big hypodense focus; LUL tiny dense lesion.", variant="structured") == \
        PhantomSpec((Lesion("right", "lower", "large", "dark"), Lesion("left", "upper", "small", "bright")))
    prose = "A big dark focus in the right lower zone."
    assert parse_report(prose) == PhantomSpec((Lesion("right", "lower", "large", "dark"),))
    assert parse_report(prose, variant="structured") == PhantomSpec()  # what a structured-report reader sees
    with pytest.raises(ValueError, match="variant must be"):
        parse_report(prose, variant="german")


def test_structured_reports_fit_the_demo_text_length():
    from transformers import AutoTokenizer

    from medim.demo.settings import TEXT_LEN, demo_path

    tokenizer = AutoTokenizer.from_pretrained(str(demo_path() / "tokenizer"))
    longest = max(len(tokenizer(r)["input_ids"]) for _, r, _ in make_dataset(2000, seed=3, variant="structured"))
    assert longest + 1 <= TEXT_LEN
