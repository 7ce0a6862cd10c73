"""Model cards: what save_pretrained and push_to_hub write as README.md, its Hub metadata (checked
offline), the training summary, the usage snippet, and the rule that an existing card is kept."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, ModelCardData

from medim import MeDiMPipeline
from medim.pipelines.model_card import CARD_NAME, PIPELINE_TAG, TAGS, CardInfo, card_info, hub_repo_id
from tests.helpers.pipeline import IMAGE_LEN, TEXT_LEN, to_hub_cache

# What `medim train` knows at the end of a run (the trainer's last log record + its cache).
TRAINING = {"steps": 4, "samples_seen": 32, "data_cache": "phantom-cache", "data_size": 60, "val_size": 4,
            "loss": 2.5, "loss_text": 1.25, "loss_image": 3.0625, "val_loss": 2.75}


@pytest.fixture(scope="module")
def pipe() -> MeDiMPipeline:
    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def front_matter(path: Path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def table(card: ModelCard, heading: str) -> dict[str, str]:
    """The two-column table under `## heading`."""
    section = card.text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| ([^|]+?) \| (.+?) \|$", section, re.M))


def test_saved_card_parses_and_its_metadata_validates(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "demo", model_card={"license": "mit"})
    card = ModelCard.load(folder / CARD_NAME)
    data = card.data.to_dict()
    assert data == {"library_name": "medim", "license": "mit", "pipeline_tag": PIPELINE_TAG, "tags": list(TAGS)}
    assert {"medical-imaging", "discrete-diffusion", "text-to-image", "image-to-text"} <= set(data["tags"])
    # Offline validation: the YAML is plain, and huggingface_hub's own metadata class reads it back
    # unchanged (ModelCard.validate would post the card to the Hub).
    assert front_matter(folder / CARD_NAME) == data
    assert ModelCardData(**data).to_dict() == data
    assert not (folder / "vqgan" / CARD_NAME).exists()  # the VQGAN mixin writes no card of its own

    model = table(card, "Model")
    assert model["layout"].startswith("`native`: 40 report tokens + 64 image codes (8 x 8)")
    assert "64 x 64 pixels" in model["image tokenizer"] and "128 codes" in model["image tokenizer"]
    sampler = table(card, "Sampler defaults")
    assert sampler["num_inference_steps"] == "32" and sampler["strategy"] == "maskgit"
    assert sampler["guidance_scale"] == "0"
    assert "## Training" not in card.text and "## Licence\n\n`mit`" in card.text


def test_usage_snippet_loads_that_exact_folder(pipe, tmp_path, monkeypatch):
    folder = pipe.save_pretrained(tmp_path / "saved")
    (code,) = re.findall(r"```python\n(.*?)```", (folder / CARD_NAME).read_text(), re.S)
    assert f"MeDiMPipeline.from_pretrained({json.dumps(str(tmp_path / 'saved'))})" in code
    monkeypatch.chdir(tmp_path)
    (tmp_path / "snippet.py").write_text(code)
    namespace = runpy.run_path(str(tmp_path / "snippet.py"))
    assert (tmp_path / "image.png").is_file() and namespace["pipe"].layout == pipe.layout
    assert len(namespace["pairs"].reports) == 2


def test_training_summary(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "trained", model_card={"training": TRAINING})
    card = ModelCard.load(folder / CARD_NAME)
    rows = table(card, "Training")
    assert rows == {"optimizer steps": "4", "training samples seen": "32", "token cache": "phantom-cache",
                    "training examples in the cache": "60", "held-out examples": "4", "final loss": "2.5",
                    "final loss, report tokens": "1.25", "final loss, image tokens": "3.062",
                    "validation loss": "2.75"}
    # Keys the card has no label for are shown by name; the metadata does not change.
    folder = pipe.save_pretrained(tmp_path / "more", model_card={"training": {**TRAINING, "val_bleu4": 0.125}})
    more = ModelCard.load(folder / CARD_NAME)
    assert table(more, "Training")["val_bleu4"] == "0.125" and more.data.to_dict() == card.data.to_dict()
    assert card.data.license == "other" and "Chameleon Research License" in card.text


def test_existing_card_is_kept_unless_asked(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "p")
    (folder / CARD_NAME).write_text("---\nlicense: mit\n---\n\n# Written by hand\n")
    pipe.sampler_config = pipe.sampler_config.replace(num_inference_steps=16)
    try:
        pipe.save_pretrained(folder, overwrite=True, model_card={"training": TRAINING})
        assert (folder / CARD_NAME).read_text() == "---\nlicense: mit\n---\n\n# Written by hand\n"
        assert json.loads((folder / "model_index.json").read_text())["sampler"]["num_inference_steps"] == 16
        pipe.save_pretrained(folder, overwrite=True, overwrite_card=True)
        assert table(ModelCard.load(folder / CARD_NAME), "Sampler defaults")["num_inference_steps"] == "16"
    finally:
        pipe.sampler_config = pipe.sampler_config.replace(num_inference_steps=32)
    pipe.save_pretrained(tmp_path / "none", model_card=False)
    assert not (tmp_path / "none" / CARD_NAME).exists() and (tmp_path / "none" / "model_index.json").is_file()


def test_card_is_inside_the_atomic_write(pipe, tmp_path, monkeypatch):
    folder = pipe.save_pretrained(tmp_path / "p", model_card={"license": "mit"})
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("medim.pipelines.pipeline.write_card", broken)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(folder, overwrite=True, overwrite_card=True)
    after = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["p"]


@pytest.mark.parametrize("model_card, error", [
    ({"licence": "mit"}, "unknown model_card keys \\['licence'\\]"),
    ({"license": "MIT"}, "lowercase Hub licence id"),
    ({"base_model": "./runs/base"}, "base_model must be a Hub repo id"),
    ({"datasets": [""]}, "datasets must be a list"),
    ({"training": {"steps": -1}}, "training\\['steps'\\] must be an int >= 0"),
    ({"training": {"loss": float("nan")}}, "training\\['loss'\\] must be a str, a finite number"),
    ({"training": {"losses": [1.0, 2.0]}}, "training\\['losses'\\]"),
    ("yes", "model_card must be True, False, a dict or a CardInfo"),
])
def test_bad_card_options_fail_before_any_write(pipe, tmp_path, model_card, error):
    with pytest.raises((ValueError, TypeError), match=error):
        pipe.save_pretrained(tmp_path / "p", model_card=model_card)
    assert not any(tmp_path.iterdir())


def test_hub_repo_id_and_base_model(tmp_path):
    assert hub_repo_id("org/medim-cxr") == "org/medim-cxr"
    assert hub_repo_id("medim-demo") is None and hub_repo_id("bad//id") is None and hub_repo_id(3) is None
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert hub_repo_id(tmp_path / "org" / "local") is None
    assert card_info(True) == CardInfo() and card_info(False) is None
    assert card_info({"base_model": "org/base"}).base_model == "org/base"


def test_base_model_of_a_pipeline_made_from_a_hub_backbone(upstream, tmp_path):
    paths = upstream
    to_hub_cache(tmp_path / "hub", "Junfeng5/Liquid_V1_7B", paths["liquid"])
    pipe = MeDiMPipeline.from_base_models("Junfeng5/Liquid_V1_7B", vqgan=paths["space"], num_layers=2,
                                          text_len=TEXT_LEN, image_len=IMAGE_LEN, image_offset=200,
                                          cache_dir=tmp_path / "hub")
    assert pipe.base_model == "Junfeng5/Liquid_V1_7B"
    card = ModelCard.load(pipe.save_pretrained(tmp_path / "p") / CARD_NAME)
    assert card.data.base_model == "Junfeng5/Liquid_V1_7B"
    card = ModelCard.load(pipe.save_pretrained(tmp_path / "q", model_card={"base_model": "me/other"}) / CARD_NAME)
    assert card.data.base_model == "me/other"
    local = MeDiMPipeline.from_base_models(paths["liquid"], vqgan=paths["space"], num_layers=2, text_len=TEXT_LEN,
                                           image_len=IMAGE_LEN, image_offset=200)
    assert local.base_model is None


class FakeApi:
    """huggingface_hub.HfApi as push_to_hub uses it; `remote` holds the repo's files."""

    remote: dict[str, str] = {}
    uploaded: dict[str, str] = {}

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, private=None, exist_ok=False):
        pass

    def file_exists(self, repo_id, filename, revision=None):
        return filename in FakeApi.remote

    def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
        folder = Path(folder_path)
        FakeApi.uploaded = {p.relative_to(folder).as_posix(): p.read_text(errors="replace")
                            for p in folder.rglob("*") if p.is_file()}
        return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()


def test_push_to_hub_card(pipe, monkeypatch):
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    monkeypatch.setattr(FakeApi, "remote", {})
    pipe.push_to_hub("me/medim-demo-copy", model_card={"license": "mit", "training": TRAINING})
    card = ModelCard(FakeApi.uploaded[CARD_NAME])
    assert card.data.license == "mit" and card.data.library_name == "medim"
    assert 'MeDiMPipeline.from_pretrained("me/medim-demo-copy")' in card.text and "# medim-demo-copy" in card.text
    assert table(card, "Training")["optimizer steps"] == "4"

    monkeypatch.setattr(FakeApi, "remote", {CARD_NAME: "# theirs"})
    pipe.push_to_hub("me/medim-demo-copy")
    assert CARD_NAME not in FakeApi.uploaded and "model_index.json" in FakeApi.uploaded
    pipe.push_to_hub("me/medim-demo-copy", overwrite_card=True)
    assert ModelCard(FakeApi.uploaded[CARD_NAME]).data.library_name == "medim"
