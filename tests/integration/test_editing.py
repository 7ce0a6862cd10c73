"""Inpainting and infilling: pixel masks to codes, known positions kept exactly, templates and gap
lengths in both layouts, errors before any compute, and quality smokes on the shipped demo model."""

import numpy as np
import pytest
import torch
from PIL import Image

import medim.pipelines.editing
from medim.data.images import preprocess
from medim.pipelines.editing import InfillOutput, code_mask, load_mask
from medim.pipelines.templates import candidates, parse_template
from tests.helpers.editing import PX, fail_if_called, images, seeded

QUADRANT = np.zeros((PX, PX), dtype=bool)
QUADRANT[: PX // 2, : PX // 2] = True  # the image's upper left: codes rows 0-3, columns 0-3 of 8 x 8
PROMPTS = ["There is a small dense nodule in the right upper zone .", "No focal lesion ."]


def codes_of(pipe, ims):
    return pipe.vqgan.encode(preprocess(ims, size=pipe.image_resolution))


def test_load_mask_conventions(tmp_path):
    gray = np.zeros((4, 6), dtype=np.uint8)
    gray[1, 2], gray[2, 3] = 255, 100  # white selects, dark grey does not
    Image.fromarray(gray).save(tmp_path / "m.png")
    expected = np.zeros((4, 6), dtype=bool)
    expected[1, 2] = True
    for mask in (Image.fromarray(gray), tmp_path / "m.png", str(tmp_path / "m.png"), gray, expected,
                 Image.fromarray(gray).convert("1"), expected.astype(np.int64), expected.astype(np.float32),
                 torch.from_numpy(expected)[None], torch.from_numpy(expected).half(), expected[..., None]):
        assert np.array_equal(load_mask(mask), expected), type(mask)
    with pytest.raises(ValueError, match="H x W"):
        load_mask(np.zeros((2, 3, 4)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mask(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="must be a PIL image"):
        load_mask([[1, 0]])


def test_code_mask_any_pixel_in_the_patch():
    mask = np.zeros((16, 16), dtype=bool)
    mask[5, 9] = True  # 2-pixel patches: code (2, 4)
    assert code_mask(mask, 8).nonzero().flatten().tolist() == [2 * 8 + 4]
    grown = code_mask(mask, 8, dilation=1).view(8, 8)
    assert grown.sum() == 9 and grown[1:4, 3:6].all()
    corner = np.zeros((16, 16), dtype=bool)
    corner[0, 0] = True
    assert code_mask(corner, 8, dilation=2).sum() == 9  # clipped at the border
    wide = np.zeros((8, 16), dtype=bool)  # padded to 16 x 16 like its image: 4 rows above
    wide[0, 0] = True
    assert code_mask(wide, 8).nonzero().flatten().tolist() == [2 * 8]
    odd = np.zeros((20, 20), dtype=bool)  # 2.5-pixel patches: a pixel counts for each patch it overlaps
    odd[2, 10] = True  # rows [2, 3) overlap patches 0 and 1; columns [10, 11) only patch 4
    assert code_mask(odd, 8).view(8, 8).nonzero().tolist() == [[0, 4], [1, 4]]
    demo = np.zeros((64, 64), dtype=bool)  # the demo's 64 px -> 8 x 8: a quadrant is 4 x 4 codes
    demo[:32, 32:] = True
    assert code_mask(demo, 8).view(8, 8)[:4, 4:].all() and code_mask(demo, 8).sum() == 16


def test_inpaint_keeps_every_known_position(native):
    ims = images(2)
    out = native.inpaint(ims, [QUADRANT, QUADRANT], PROMPTS, generator=seeded(), output_type="tokens")
    layout = native.layout
    region = code_mask(QUADRANT, 8)
    codes = codes_of(native, ims)
    assert torch.equal(out.images[:, ~region], codes[:, ~region])  # unmasked codes exactly as encoded
    assert torch.equal(out.tokens[:, : layout.text_len], layout.encode_reports(native.tokenizer, PROMPTS))
    assert out.reports == PROMPTS and out.nfe > 0
    # The same region as a token mask gives the same samples.
    token = region.expand(2, -1).clone()
    again = native.inpaint(ims, token, PROMPTS, generator=seeded(), output_type="tokens")
    assert torch.equal(again.tokens, out.tokens)
    pil = native("inpaint", ims[0], QUADRANT, PROMPTS[0], generator=seeded(), mask_dilation=1)
    assert pil.images[0].size == (PX, PX) and pil.images[0].mode == "RGB"
    grown = code_mask(QUADRANT, 8, dilation=1)
    assert torch.equal(pil.tokens[0, layout.text_len :][~grown] - layout.image_segment.vocab_start,
                       codes[0, ~grown])
    dilated = native.inpaint([ims[0]], region[None].clone(), PROMPTS[:1], generator=seeded(), mask_dilation=1)
    assert torch.equal(dilated.tokens, pil.tokens)  # token masks grow the same way


def test_inpaint_keeps_the_candidate_its_report_explains_best(native, monkeypatch):
    sampled, scored = [], []
    run_chunks, edit_scores = medim.pipelines.editing.run_chunks, medim.pipelines.editing.edit_scores

    def capture_rows(rt, task, condition, settings):
        tokens, nfe = run_chunks(rt, task, condition, settings)
        sampled.append(tokens)
        return tokens, nfe

    def capture_scores(*args):
        scores, nfe = edit_scores(*args)
        scored.append(scores)
        return scores, nfe

    monkeypatch.setattr(medim.pipelines.editing, "run_chunks", capture_rows)
    monkeypatch.setattr(medim.pipelines.editing, "edit_scores", capture_scores)
    ims = images(2, seed=3)
    out = native.inpaint(ims, [QUADRANT] * 2, PROMPTS, num_candidates=3, generator=seeded(), output_type="tokens")
    assert sampled[0].shape[0] == 6 and scored[0].shape == (6,)  # 3 candidate rows per image, image by image
    for i in range(2):
        best = 3 * i + int(scored[0][3 * i : 3 * i + 3].argmax())
        assert torch.equal(out.tokens[i], sampled[0][best]) and out.edit_scores[i] == scored[0][best]
    assert out.weak_edits == [i for i in range(2) if out.edit_scores[i] < medim.pipelines.editing.WEAK_EDIT_NATS]
    # One candidate samples with the image's own generator, as inpainting did before candidates.
    one = native.inpaint(ims, [QUADRANT] * 2, PROMPTS, num_candidates=1, generator=seeded(), output_type="tokens")
    assert torch.equal(one.tokens, sampled[-1])


def test_edit_score_is_the_region_pmi(native):
    """Conditional minus unconditional log-likelihood of the region's codes, the rest of the image known."""
    ims = images(1, seed=5)
    out = native.inpaint(ims, [QUADRANT], PROMPTS[:1], num_candidates=1, generator=seeded(), output_type="tokens")
    layout, region = native.layout, code_mask(QUADRANT, 8)
    image = layout.image_segment
    codes = out.tokens[0, image.start :] - image.vocab_start
    sigma = native.sampler_config.noise_schedule
    sigma = medim.pipelines.editing.get_schedule(sigma).sigma(torch.ones(1))
    seen = out.tokens.clone()
    seen[0, image.start :][region] = layout.mask_id
    hidden = seen.clone()
    hidden[0, : layout.text_len] = layout.mask_id
    with torch.no_grad():
        lp = [native.model(x, sigma).logprobs["image"][0, torch.arange(64), codes][region].sum()
              for x in (seen, hidden)]
    assert torch.isclose(out.edit_scores[0], lp[0] - lp[1], atol=1e-3)


def test_inpaint_without_prompts_writes_the_report(native):
    out = native.inpaint(images(1), [QUADRANT], generator=seeded(2))
    assert len(out.reports) == 1 and isinstance(out.reports[0], str)
    assert (out.tokens != native.layout.mask_id).all()


def test_inpaint_medim_v1_any_image_size(v1):
    ims = images(1, size=(24, 12))  # padded to 24 x 24 like preprocess: 6 rows above, 6 below
    mask = np.zeros((12, 24), dtype=bool)
    mask[:, 18:] = True  # the right quarter -> codes of column 3, rows 1-2 (of 4 x 4)
    region = code_mask(mask, 4)
    assert region.view(4, 4).nonzero().tolist() == [[1, 3], [2, 3]]
    out = v1.inpaint(ims, [mask], ["the chest"], generator=seeded(), output_type="tokens")
    assert torch.equal(out.images[:, ~region], codes_of(v1, ims)[:, ~region])


@pytest.mark.parametrize("call, error, match", [
    (lambda p: p.inpaint(images(1), [np.zeros((8, 8), bool)], PROMPTS[:1]), ValueError, "must have its image's size"),
    (lambda p: p.inpaint(images(1), [np.zeros((PX, PX), bool)], PROMPTS[:1]), ValueError, "select nothing"),
    (lambda p: p.inpaint(images(2), [QUADRANT], PROMPTS), ValueError, "one per image"),
    (lambda p: p.inpaint(images(1), torch.zeros(1, 64, dtype=torch.bool), PROMPTS[:1]), ValueError, "select nothing"),
    (lambda p: p.inpaint(images(1), torch.ones(1, 10, dtype=torch.bool), PROMPTS[:1]), TypeError, "bool tensor"),
    (lambda p: p.inpaint(images(1), [QUADRANT], PROMPTS), ValueError, "prompts: give one str or one per image"),
    (lambda p: p.inpaint(images(1), [QUADRANT], PROMPTS[:1], mask_dilation=-1), ValueError, "mask_dilation"),
    (lambda p: p.inpaint([], [], PROMPTS[:1]), ValueError, "images is empty"),
    (lambda p: p.inpaint(images(1), ["no/such/mask.png"], PROMPTS[:1]), FileNotFoundError, r"masks\[0\]"),
    (lambda p: p.inpaint(images(1), [QUADRANT], PROMPTS[:1], output_type="np"), ValueError, "output_type"),
    (lambda p: p.inpaint(images(1), [QUADRANT], PROMPTS[:1], num_candidates=0), ValueError, "num_candidates"),
    (lambda p: p.inpaint(images(2), [QUADRANT] * 2, [PROMPTS[1], " ".join(["nodule"] * 40)]), ValueError,
     r"prompts\[1\] takes 41 text slots, more than the model's reports hold \(text_len=40\)"),
    (lambda p: p.infill(["There is a small nodule ."], images(1)), ValueError, "has no gap"),
    (lambda p: p.infill(["[MASK:3] [MASK]"]), ValueError, "holds only gaps"),
    (lambda p: p.infill(["There is a [MASK:0] nodule ."]), ValueError, "holds no token"),
    (lambda p: p.infill(["There is a [MASK:two] nodule ."]), ValueError, "is not a gap"),
    (lambda p: p.infill(["There is a [MASK:39] nodule ."]), ValueError, "more than the model's reports hold"),
    (lambda p: p.infill(["a [MASK:5] b [MASK:5] c [MASK:5] d"]), ValueError, "length combinations"),
    (lambda p: p.infill(["There is a nod[MASK]ule ."]), ValueError, "falls inside a token"),
    (lambda p: p.infill(["There is a [MASK] nodule ."], images(2)), ValueError, "one per template"),
    (lambda p: p.infill([]), ValueError, "templates is empty"),
    (lambda p: p.infill(["a [MASK] b"], num_samples=0), ValueError, "num_samples"),
])
def test_bad_input_fails_before_compute(native, monkeypatch, call, error, match):
    fail_if_called(monkeypatch, native)
    with pytest.raises(error, match=match):
        call(native)


def test_template_rows_native(native):
    layout, tok = native.layout, native.tokenizer
    template = parse_template("There is a  [MASK:2] nodule in the right upper zone . [MASK:3]", "t")
    assert template.text == "There is a nodule in the right upper zone ." and [g.size for g in template.gaps] == [2, 3]
    rows = candidates(layout, tok, template, 0, "t", exact=False)
    full = layout.encode_reports(tok, [template.text])[0]
    assert len(rows) == 2  # the inner gap at 1 or 2 tokens; the trailing one ends where the model likes
    for n, row in zip((1, 2), rows):
        assert row.gaps[0] == (3, 3 + n) and row.unknown[3 : 3 + n].all()
        assert torch.equal(row.ids[:3], full[:3]) and torch.equal(row.ids[3 + n : 10 + n], full[3:10])
        start, stop = row.gaps[1]
        assert start == 10 + n and stop - start == 3 and row.unknown[start : stop + 1].all()  # + the end mark's slot
        assert row.unknown.sum() == n + 4 and (row.ids[stop + 1 :] == layout.pad_id).all()
    exact = candidates(layout, tok, template, 0, "t", exact=True)
    assert len(exact) == 1 and exact[0].unknown.sum() == 5 and exact[0].ids[exact[0].gaps[1][1]] == layout.eos_id


def test_template_rows_medim_v1_are_exact(v1):
    template = parse_template("[MASK:2] the chest [MASK]", "t")
    rows = candidates(v1.layout, v1.tokenizer, template, 0, "t", exact=False)
    assert len(rows) == 1 and rows[0].gaps == ((1, 3), (5, 6)) and rows[0].ids[0] == 1  # after BOS
    assert rows[0].unknown.sum() == 3 and rows[0].ids[6:].eq(v1.layout.pad_id).all()


def test_infill_keeps_the_template_and_picks_the_best_length(native, monkeypatch):
    recorded = []
    original = medim.pipelines.editing.estimate_elbo

    def spy(rt, rows, **kwargs):
        out = original(rt, rows, **kwargs)
        recorded.append((rows(torch.arange(len(kwargs["group"])))[0], out.scores, kwargs["group"]))
        return out

    monkeypatch.setattr(medim.pipelines.editing, "estimate_elbo", spy)
    templates = ["There is a [MASK:3] nodule in the right upper zone .", "Frontal view of the [MASK] ."]
    out = native.infill(templates, images(2), generator=seeded(), num_samples=2)
    assert isinstance(out, InfillOutput) and len(out.fills) == 2 and out.nfe > 0
    x0, scores, group = recorded[0]
    assert len(scores) == 3 and (group == 0).all()  # only the first template has a choice
    assert torch.equal(out.tokens[0, : native.layout.text_len], x0[scores.argmax(), : native.layout.text_len])
    rows = candidates(native.layout, native.tokenizer, parse_template(templates[1], "t"), 1, "t", False)
    known = ~rows[0].unknown
    assert torch.equal(out.tokens[1, : native.layout.text_len][known], rows[0].ids[known])
    codes = codes_of(native, images(2))
    assert torch.equal(out.tokens[:, native.layout.text_len :] - native.layout.image_segment.vocab_start, codes)
    same = native.infill(templates, images(2), generator=seeded(), num_samples=2)
    assert same.reports == out.reports


def test_infill_starts_the_model_time_at_the_unknown_fraction(native, monkeypatch):
    from medim.diffusion import get_schedule
    from medim.diffusion.tasks import TaskInputs
    from medim.pipelines.editing import StartedSchedule, started

    base = get_schedule("loglinear")
    t = torch.tensor([1.0, 0.5, 0.01])
    assert torch.allclose(StartedSchedule(base, 0.25).sigma(t), base.sigma(0.25 * t))
    known = torch.ones(2, native.layout.state_len, dtype=torch.bool)
    known[0, 3:5] = False  # 2 of the 40 report slots
    known[1, 7] = False
    config = started(native.sampler_config, TaskInputs(torch.zeros_like(known, dtype=torch.long), known), native.layout)
    assert config.noise_schedule.base == base and config.noise_schedule.start == pytest.approx(2 / 40)
    assert config.num_inference_steps == native.sampler_config.num_inference_steps
    known[1, 7], known[1, 40:] = True, False  # a row generating its whole image starts at t = 1
    assert started(native.sampler_config, TaskInputs(known.long(), known), native.layout) is native.sampler_config
    seen = []
    original = medim.pipelines.editing.run_chunks
    def spy(rt, task, condition, settings):
        seen.append(settings.config)
        return original(rt, task, condition, settings)

    monkeypatch.setattr(medim.pipelines.editing, "run_chunks", spy)
    native.infill(["There is a [MASK] nodule ."], images(1), generator=seeded())
    native.inpaint(images(1), [QUADRANT], PROMPTS[:1], generator=seeded())
    assert seen[0].noise_schedule.start == pytest.approx(1 / 40)  # one gap slot of the 40
    assert seen[1].noise_schedule == "loglinear"  # inpainting keeps t = 1


def test_infill_unconditioned_generates_the_image(native, v1):
    out = native.infill(["Frontal view of the chest . [MASK:6]"], generator=seeded(1))
    assert out.images[0].size == (PX, PX) and out.reports[0].startswith("Frontal view of the chest .")
    out = v1.infill(["the [MASK:2] lung"], images(1), generator=seeded(1), output_type="tokens")
    assert out.reports[0].startswith("the") and out.reports[0].endswith("lung") and out.images.shape == (1, 16)


# ---- the shipped demo model --------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    from medim import MeDiMPipeline

    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_demo_inpaint_adds_a_lesion(demo):
    from medim.data import synthetic

    ims, _, specs = zip(*synthetic.make_dataset(4, seed=10_000, size=64))
    mask = np.zeros((64, 64), dtype=bool)
    mask[:32, :32] = True  # the image's upper left = the patient's right upper zone
    wanted, prompts = [], []
    for i, spec in enumerate(specs):
        kept = tuple(x for x in spec.lesions if x.quadrant != ("right", "upper"))
        wanted.append(synthetic.PhantomSpec((*kept, synthetic.Lesion("right", "upper", "large", "bright"))))
        prompts.append(synthetic.write_report(wanted[-1], np.random.default_rng(i)))
    out = demo.inpaint(list(ims), [mask] * 4, prompts, generator=seeded())
    assert sum(synthetic.read_image(im) == w for im, w in zip(out.images, wanted)) >= 3


def test_demo_infill_reads_the_size(demo):
    from medim.data import synthetic

    pairs = [p for p in synthetic.make_dataset(12, seed=10_000, size=64) if p[2].lesions][:6]
    templates, truth = [], []
    for _, _, spec in pairs:
        lesion = spec.lesions[0]
        templates.append(f"There is a [MASK] dense nodule in the {lesion.side} {lesion.level} zone.")
        truth.append(lesion.size)
    out = demo.infill(templates, [p[0] for p in pairs], generator=seeded())
    words = {"small": "small", "tiny": "small", "large": "large", "big": "large"}
    assert sum(words.get(f[0]) == t for f, t in zip(out.fills, truth)) >= 5, (out.fills, truth)
