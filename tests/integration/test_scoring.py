"""Likelihood scoring: the ELBO terms against a denoiser whose likelihood is known, `score` / `rank`
mechanics on tiny pipelines of both layouts, their errors before any compute, `medim score`, and
a quality smoke on the shipped demo model."""

import json
import math

import pytest
import torch

from medim.cli import main
from medim.commands import score as score_command
from medim.data.images import preprocess
from medim.diffusion.loss import elbo_terms, sample_times
from medim.diffusion.schedule import get_schedule
from medim.layout import Segment
from medim.pipelines.scoring import ESTIMATORS, NUM_SAMPLES, PAIR_DIRECTIONS, RANK_DIRECTIONS, ScoreOutput
from tests.helpers.editing import fail_if_called, images, seeded

SEGS = (Segment("text", 0, 3, 0, 5), Segment("image", 3, 4, 6, 4))  # mask id 5
MASK = 5
TABLE = {  # context-free log-probs: the model's likelihood of x is the product of the table's entries
    "text": torch.log_softmax(torch.arange(15.0).reshape(3, 5).sin() * 2, -1),
    "image": torch.log_softmax(torch.arange(16.0).reshape(4, 4).cos() * 3, -1),
}
X0 = torch.tensor([[1, 4, 0, 6, 9, 7, 8]])
REPORTS = ["There is a small dense nodule in the right upper zone .", "No focal lesion .",
           "A large dark lesion in the left lower lung ."]


def table_denoiser(calls):
    def denoiser(x, sigma, positions, **kwargs):
        calls.append((x.clone(), sorted(positions)))
        return {name: TABLE[name][pos - seg.start].expand(x.shape[0], -1, -1)
                for seg in SEGS for name, pos in positions.items() if name == seg.name}
    return denoiser


def test_elbo_terms_average_to_the_known_likelihood():
    # For a context-free denoiser the bound is exact: E[row sum] = (1 - eps) * sum of -log p.
    B = 20000
    t = sample_times(B, generator=torch.Generator().manual_seed(0))
    u = torch.rand(B, 7, generator=torch.Generator().manual_seed(1))
    noised = torch.ones(B, 7, dtype=torch.bool)
    counted = noised.clone()
    counted[:, 2] = False  # masked like the rest, never scored (medim-v1 padding)
    calls = []
    terms = elbo_terms(table_denoiser(calls), X0.expand(B, -1), noised, counted, t, u, segments=SEGS, mask_id=MASK)
    nll = sum(-TABLE["text"][i, X0[0, i]].item() for i in (0, 1)) + sum(
        -TABLE["image"][i, X0[0, 3 + i] - 6].item() for i in range(4))
    assert math.isclose(terms.sum(1).mean().item(), (1 - 1e-3) * nll, rel_tol=0.02)
    assert (terms[:, 2] == 0).all() and len(calls) == 1 and calls[0][1] == ["image", "text"]
    masked = u < (1 - 1e-3) * t[:, None]
    rows = (masked & counted).any(1)  # the model only runs where something scored is masked
    xt = calls[0][0]
    assert len(xt) == rows.sum() < B and ((xt[:, 2] == MASK) == masked[rows, 2]).all()  # noised, not scored


def test_elbo_terms_skip_the_forward_and_unscored_segments():
    calls = []
    t, u = torch.full((2,), 1e-3), torch.ones(2, 7)  # nothing masked
    noised = torch.zeros(2, 7, dtype=torch.bool)
    noised[:, :3] = True
    assert not elbo_terms(table_denoiser(calls), X0.expand(2, -1), noised, noised, t, u,
                          segments=SEGS, mask_id=MASK).any()
    assert not calls
    x0 = X0.expand(2, -1).clone()
    x0[:, 3:] = MASK  # the image hidden
    terms = elbo_terms(table_denoiser(calls), x0, noised, noised, torch.ones(2), torch.zeros(2, 7),
                       segments=SEGS, mask_id=MASK)
    assert calls[0][1] == ["text"] and (calls[0][0][:, 3:] == MASK).all() and (terms[:, :3] > 0).all()


def test_score_is_reproducible_and_consistent(native):
    ims = images(3)
    out = native.score(ims, REPORTS, generator=seeded(), num_samples=4)
    assert isinstance(out, ScoreOutput) and out.scores.shape == (3,) and out.nfe > 0
    again = native.score(ims, REPORTS, generator=seeded(), num_samples=4, batch_size=5)
    assert torch.allclose(out.scores, again.scores, atol=1e-4)  # another batching, same numbers
    assert not torch.equal(out.scores, native.score(ims, REPORTS, generator=seeded(1), num_samples=4).scores)
    assert torch.allclose(out.token_scores.sum(1), out.scores, atol=1e-3)
    ids = native.layout.encode_reports(native.tokenizer, REPORTS)
    assert out.num_tokens.tolist() == (ids != native.layout.pad_id).sum(1).tolist()  # words + end mark
    assert torch.allclose(out.per_token, out.scores / out.num_tokens)
    assert (out.scores < 0).all() and out.stderr.isfinite().all()
    # Padding is scored in the native layout (the report's length), the image is not.
    text = out.token_scores[:, : native.layout.text_len]
    assert (text <= 0).all() and (text[ids == native.layout.pad_id] < 0).any()
    assert (out.token_scores[:, native.layout.text_len :] == 0).all()
    assert native.score(ims[:1], REPORTS[:1], num_samples=1).stderr.isnan().all()


def test_rank_entries_equal_pair_scores(native):
    ims = images(2, seed=4)
    matrix = native.rank(ims, REPORTS, direction="report|image", generator=seeded(3), num_samples=3, batch_size=4)
    assert matrix.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            one = native.score([ims[i]], [REPORTS[j]], generator=seeded(3), num_samples=3).scores[0]
            assert math.isclose(matrix[i, j].item(), one.item(), abs_tol=1e-3)
    flipped = native.rank(ims, REPORTS, direction="image|report", generator=seeded(3), num_samples=3)
    pair = native.score([ims[1]], [REPORTS[2]], direction="image|report", generator=seeded(3), num_samples=3)
    assert math.isclose(flipped[1, 2].item(), pair.scores[0].item(), abs_tol=1e-3)
    assert (pair.token_scores[:, : native.layout.text_len] == 0).all() and pair.num_tokens.item() == 64


def test_rank_pmi_is_conditional_minus_marginal(native):
    ims = images(2, seed=4)
    pmi = native.rank(ims, REPORTS, direction="pmi", estimator="elbo", generator=seeded(3), num_samples=3)
    raw = native.rank(ims, REPORTS, direction="image|report", generator=seeded(3), num_samples=3)
    marginal = native.score(ims, None, direction="image", generator=seeded(3), num_samples=3).scores
    assert torch.allclose(pmi, raw - marginal[:, None], atol=1e-4)
    again = native.rank(ims, REPORTS, direction="pmi", estimator="elbo", generator=seeded(3), num_samples=3,
                        batch_size=5)
    assert torch.allclose(pmi, again, atol=1e-4)  # shared draws: another batching, the same matrix


def one_step_log_p(pipe, ims, report):
    """log p(codes of each image | report or nothing) under the model's one-step prediction, by hand."""
    layout = pipe.layout
    codes = pipe.vqgan.encode(preprocess(ims, size=pipe.image_resolution))
    x = torch.full((1, layout.state_len), layout.mask_id)
    if report is not None:
        x[0, : layout.text_len] = layout.encode_reports(pipe.tokenizer, [report])[0]
    sigma = get_schedule(pipe.sampler_config.noise_schedule).sigma(torch.ones(1))
    with torch.no_grad():
        lp = pipe.model(x, sigma).logprobs["image"][0]
    return lp[torch.arange(codes.shape[1]), codes].sum(-1)


def test_rank_default_is_the_one_step_pmi(native, monkeypatch):
    ims = images(3, seed=6)
    matrix = native.rank(ims, REPORTS)  # no generator: the one-step estimate draws nothing
    unconditional = one_step_log_p(native, ims, None)
    for j, report in enumerate(REPORTS):
        assert torch.allclose(matrix[:, j], one_step_log_p(native, ims, report) - unconditional, atol=1e-3)
    assert torch.equal(matrix, native.rank(ims, REPORTS, batch_size=1))  # deterministic, whatever the batching
    calls = []
    forward = native.model.forward
    monkeypatch.setitem(vars(native.model), "forward", lambda *a, **k: calls.append(len(a[0])) or forward(*a, **k))
    native.rank(ims * 3, REPORTS)
    assert calls == [len(REPORTS) + 1]  # one forward row per report plus the unconditional, whatever the images


def test_rank_one_step_groups_medim_v1_sizes(v1):
    ims = images(2, size=(20, 12)) + images(1, size=(9, 30))  # two size conditions
    reports = ["the chest", "no normal heart"]
    matrix = v1.rank(ims, reports)
    for i, image in enumerate(ims):
        assert torch.allclose(matrix[i], v1.rank([image], reports)[0], atol=1e-4)


def test_marginals_and_joint(native):
    report = native.score(None, REPORTS, direction="report", generator=seeded(), num_samples=3)
    image = native.score(images(2), None, direction="image", generator=seeded(), num_samples=3)
    joint = native.score(images(3), REPORTS, direction="joint", generator=seeded(), num_samples=3)
    assert report.scores.shape == (3,) and image.scores.shape == (2,) and (image.num_tokens == 64).all()
    assert (joint.num_tokens == report.num_tokens + 64).all() and joint.scores.isfinite().all()


def test_medim_v1_scores_no_padding(v1):
    ims = images(2, size=(20, 12)) + images(1, size=(9, 30))  # sizes go into the size condition
    out = v1.score(ims, ["the chest", "no normal heart", "the lung"], generator=seeded(), num_samples=3)
    ids = v1.layout.encode_reports(v1.tokenizer, ["the chest", "no normal heart", "the lung"])
    pad = torch.cat([ids == v1.layout.pad_id, torch.zeros(3, v1.layout.image_len, dtype=torch.bool)], 1)
    assert out.num_tokens.tolist() == (~pad[:, :16]).sum(1).tolist() == [3, 4, 3]  # BOS + words
    assert (out.token_scores[pad] == 0).all()


@pytest.mark.parametrize("call, error, match", [
    (lambda p: p.score([], [], num_samples=2), ValueError, "reports is empty"),
    (lambda p: p.score([], REPORTS[:1]), ValueError, "images is empty"),
    (lambda p: p.score(images(2), REPORTS), ValueError, "pair up one to one"),
    (lambda p: p.score(images(1), REPORTS[:1], direction="report|text"), ValueError, "direction must be one of"),
    (lambda p: p.score(images(1), REPORTS[:1], num_samples=0), ValueError, "num_samples"),
    (lambda p: p.score(images(1), REPORTS[:1], batch_size=0), ValueError, "batch_size"),
    (lambda p: p.score(images(1), REPORTS[:1], direction="report"), ValueError, "pass images=None"),
    (lambda p: p.score(None, REPORTS[:1]), ValueError, "needs images"),
    (lambda p: p.score(images(1), REPORTS[:1], generator=[seeded()]), TypeError, "one torch.Generator"),
    (lambda p: p.score(images(1), [""]), ValueError, r"reports\[0\] is empty"),
    (lambda p: p.rank(images(1), REPORTS, direction="report"), ValueError, "direction must be one of"),
    (lambda p: p.rank(images(1), REPORTS, estimator="mc"), ValueError, "estimator must be one of"),
    (lambda p: p.rank(images(1), REPORTS, direction="report|image", estimator="one-step"), ValueError,
     "estimates direction 'pmi' only"),
    (lambda p: p.rank(images(1), REPORTS, num_samples=0), ValueError, "num_samples"),
    (lambda p: p.rank(images(1), REPORTS, generator=1), TypeError, "one torch.Generator"),
    (lambda p: p.rank([], REPORTS), ValueError, "images is empty"),
    (lambda p: p.rank(images(1), []), ValueError, "reports is empty"),
])
def test_bad_input_fails_before_compute(native, monkeypatch, call, error, match):
    fail_if_called(monkeypatch, native)
    with pytest.raises(error, match=match):
        call(native)


@pytest.fixture(scope="module")
def saved(native, tmp_path_factory):
    root = tmp_path_factory.mktemp("score_cli")
    model = native.save_pretrained(root / "pipe")
    paths = []
    for i, image in enumerate(images(3, seed=9)):
        image.save(root / f"im{i}.png")
        paths.append(root / f"im{i}.png")
    (root / "reports.txt").write_text("\n".join(REPORTS) + "\n\n")
    return root, model


def cli(root, model, out, *extra):
    return main(["score", "--model", str(model), "--images", str(root / "im*.png"), "--reports",
                 str(root / "reports.txt"), "--out", str(out), "--num-samples", "3", "--device", "cpu", *extra])


def test_cli_pairs_and_rank(native, saved, tmp_path):
    root, model = saved
    assert cli(root, model, tmp_path / "s.jsonl", "--seed", "5") == 0
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    expected = native.score([root / f"im{i}.png" for i in range(3)], REPORTS, num_samples=3, generator=seeded(5))
    assert [e["report"] for e in lines] == REPORTS and [e["index"] for e in lines] == [0, 1, 2]
    assert all(math.isclose(e["score"], s, abs_tol=1e-3) for e, s in zip(lines, expected.scores.tolist()))
    assert lines[0]["num_samples"] == 3 and lines[0]["direction"] == "report|image" and "stderr" in lines[0]

    assert cli(root, model, tmp_path / "m.json", "--rank", "--direction", "image|report") == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert len(result["matrix"]) == 3 and len(result["matrix"][0]) == 3 and "scores" not in result
    assert result["reports"] == REPORTS
    assert result["direction"] == "image|report" and result["images"][0].endswith("im0.png")

    assert cli(root, model, tmp_path / "p.json", "--rank") == 0  # the library's default: the one-step PMI
    result = json.loads((tmp_path / "p.json").read_text())
    expected = native.rank([root / f"im{i}.png" for i in range(3)], REPORTS)
    assert result["direction"] == "pmi" and torch.allclose(torch.tensor(result["matrix"]), expected, atol=1e-4)


def test_cli_errors_before_loading(saved, tmp_path, monkeypatch):
    root, model = saved
    (root / "two.txt").write_text("one\ntwo\n")
    (root / "none.txt").write_text("\n\n")
    monkeypatch.setattr("medim.pipelines.pipeline.MeDiMPipeline.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    cases = [
        (["--reports", str(root / "two.txt")], "3 images but 2 reports"),
        (["--reports", str(root / "none.txt")], "holds no report"),
        (["--images", str(root / "nothing*.png")], "nothing matches"),
        (["--num-samples", "0"], r"--num-samples must be an int in \[1, 4096\], got 0"),
        (["--num-samples", str(10**9)], r"--num-samples must be an int in \[1, 4096\]"),
        (["--seed", str(2**64)], r"--seed must be an int in \[0, 18446744073709551615\], got 18446744073709551616"),
        (["--seed", "-1"], "--seed must be an int in"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--direction", "pmi"], "add --rank"),
        (["--rank", "--direction", "joint", "--estimator", "one-step"], "estimates --direction pmi only"),
        (["--images", str(tmp_path / "broken.png"), "--reports", str(root / "one.txt")], "broken.png"),
    ]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (root / "one.txt").write_text("one\n")
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli(root, model, tmp_path / "x.jsonl", *extra)
    assert not (tmp_path / "x.jsonl").exists()
    with pytest.raises(SystemExit):
        main(["score", "--images", "a.png", "--reports", "r.txt", "--out", "o", "--direction", "report"])


def test_cli_defaults_match_the_library():
    assert score_command.PAIR_DIRECTIONS == PAIR_DIRECTIONS and score_command.RANK_DIRECTIONS == RANK_DIRECTIONS
    assert score_command.ESTIMATORS == ESTIMATORS
    parser = __import__("argparse").ArgumentParser()
    score_command.add_arguments(parser)
    assert parser.get_default("num_samples") == NUM_SAMPLES


@pytest.mark.slow
def test_demo_ranks_each_report_on_its_own_image():
    from medim import MeDiMPipeline
    from medim.data import synthetic

    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    ims, reports, specs = zip(*synthetic.make_dataset(8, seed=10_000, size=64))
    matrix = pipe.rank(list(ims), list(reports))  # the PMI: each report's and each image's prior cancels
    for m in (matrix, matrix.T):  # the reports of each image, the images of each report
        hits = [specs[int(m[i].argmax())] == specs[i] for i in range(8)]
        assert sum(hits) >= 7, matrix
    raw = pipe.rank(list(ims), list(reports), direction="report|image", num_samples=4, generator=seeded())
    # log p(report | image) compares the images of one report (the report's own prior cancels).
    assert sum(specs[int(raw[:, j].argmax())] == specs[j] for j in range(8)) >= 7, raw
