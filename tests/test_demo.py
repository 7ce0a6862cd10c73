"""The demo: the phantom model's build path end to end, and what `medim demo` does with a model."""

import json

import pytest
import torch

from medim import MeDiMPipeline
from medim.cli import main
from medim.data import synthetic
from medim.demo import BuildSettings, build_demo, demo_path, evaluate_demo, quadrant_accuracy


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    # The retraining path at toy size: VQGAN, tokenizer, backbone, token cache, trainer, save.
    settings = BuildSettings(num_train=16, vqgan_steps=2, model_steps=2, batch_size=4, hidden=32, layers=1)
    return build_demo(tmp_path_factory.mktemp("demo") / "model", settings, device="cpu")


def test_build_demo_writes_a_loadable_pipeline(toy_demo):
    pipe = MeDiMPipeline.from_pretrained(toy_demo)
    assert pipe.layout.name == "native" and pipe.layout.image_len == 64
    assert pipe.sampler_defaults["num_steps"] == 16
    build = json.loads((toy_demo / "build.json").read_text())
    assert build["settings"]["model_steps"] == 2 and len(build["loss_history"]) >= 1
    files = [p for p in toy_demo.rglob("*") if p.is_file()]
    assert not any(p.suffix in {".bin", ".pt", ".ckpt", ".pkl"} for p in files)  # no pickle
    out = pipe.generate_pairs(["Frontal view of the chest."], num_inference_steps=2,
                              generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64) and isinstance(out.reports[0], str)


def test_evaluate_demo_scores_in_range(toy_demo):
    scores = evaluate_demo(MeDiMPipeline.from_pretrained(toy_demo), n=4, num_inference_steps=2)
    for value in (scores.image_to_report, scores.text_to_image, scores.pairs, *scores.exact.values()):
        assert 0.0 <= value <= 1.0
    assert set(scores.nfe) == {"image_to_report", "text_to_image", "pairs"}


def test_quadrant_accuracy_counts_quadrants():
    pairs = synthetic.make_dataset(20, seed=3)
    truth = [spec for _, _, spec in pairs]
    assert quadrant_accuracy(truth, truth) == 1.0
    empty = [synthetic.PhantomSpec(()) for _ in truth]
    lesions = sum(len(s.lesions) for s in truth)
    assert quadrant_accuracy(empty, truth) == pytest.approx(1 - lesions / (4 * len(truth)))


def test_medim_demo_command_writes_outputs(toy_demo, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(toy_demo), "--out", str(out), "--steps", "2"]) == 0
    for name in ("text_to_image.png", "image_to_report.png", "pairs.png", "reports.txt", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["pairs"]["reports"]) == 4 and len(summary["image_to_report"]["reports"]) == 4
    with pytest.raises(SystemExit, match="overwrite"):
        main(["demo", "--model", str(toy_demo), "--out", str(out), "--steps", "2"])


@pytest.mark.skipif((demo_path() / "model_index.json").is_file(), reason="a demo model is bundled")
def test_missing_bundled_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="medim demo --retrain"):
        MeDiMPipeline.from_pretrained("medim-demo")
    with pytest.raises(SystemExit, match="--retrain"):
        main(["demo", "--out", str(tmp_path / "x")])
