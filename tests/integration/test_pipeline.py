"""End to end: MeDiMPipeline built only from tiny files written here in the upstream formats."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medim import MeDiMOutput, MeDiMPipeline
from tests.helpers.pipeline import IMAGE_LEN, IMAGE_PX, TEXT_LEN, V1_LAYOUT, to_hub_cache

STEPS = 3


def load(kind: str, paths: dict[str, Path]) -> MeDiMPipeline:
    if kind == "original":
        pipe = MeDiMPipeline.from_original(paths["release"], backbone=paths["liquid"],
                                           tokenizer=paths["llama_tokenizer"], vqgan=paths["space"], num_layers=2,
                                           layout=V1_LAYOUT)
    else:
        pipe = MeDiMPipeline.from_base_models(paths["liquid"], vqgan=paths["space"], num_layers=2, text_len=TEXT_LEN,
                                              image_len=IMAGE_LEN, image_offset=200)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def v1(upstream) -> MeDiMPipeline:
    return load("original", upstream)


@pytest.fixture(scope="module")
def native(upstream) -> MeDiMPipeline:
    return load("base", upstream)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["original", "base"])
def test_three_tasks(kind, v1, native, tmp_path):
    pipe = v1 if kind == "original" else native
    assert pipe.layout.name == ("medim-v1" if kind == "original" else "native")
    assert pipe.image_resolution == IMAGE_PX and pipe.sampler_defaults["num_inference_steps"] == 128

    out = pipe.text_to_image(["no normal chest", "the heart"], num_inference_steps=STEPS, generator=seeded())
    assert isinstance(out, MeDiMOutput) and out.reports == ["no normal chest", "the heart"]
    assert [(im.mode, im.size) for im in out.images] == [("RGB", (IMAGE_PX, IMAGE_PX))] * 2
    text = pipe.layout.encode_reports(pipe.tokenizer, out.reports)
    assert torch.equal(out.tokens[:, :TEXT_LEN], text)  # the condition never moves
    image_ids = out.tokens[:, TEXT_LEN:]
    image = pipe.layout.image_segment
    assert ((image_ids >= image.vocab_start) & (image_ids < image.vocab_stop)).all()

    out = pipe.generate_pairs(["the chest", "no"], num_pairs_per_prompt=2, num_inference_steps=STEPS,
                              generator=seeded())
    assert len(out.images) == len(out.reports) == 4 and out.nfe > 0
    assert all(r.startswith("the chest") for r in out.reports[:2]) and all(r.startswith("no") for r in out.reports[2:])
    assert (out.tokens != pipe.layout.mask_id).all()

    # Images of every kind users have: 16-bit and grayscale X-rays, paths, arrays, tensors.
    path = tmp_path / "cxr.png"
    out.images[0].save(path)
    xray16 = Image.fromarray(np.arange(20 * 12, dtype=np.uint16).reshape(12, 20) * 200)
    inputs = [xray16, out.images[1].convert("L"), path, np.zeros((10, 14, 3), dtype=np.uint8), torch.rand(3, 16, 16)]
    rep = pipe.image_to_report(inputs, prompt="the", num_inference_steps=STEPS, generator=seeded())
    assert len(rep.reports) == 5 and all(isinstance(r, str) and r.startswith("the") for r in rep.reports)
    assert [im.mode for im in rep.images] == ["RGB"] * 5 and rep.images[0].size == (20, 12)
    codes = pipe.vqgan.encode(pipe_pixels(pipe, out.images[:1]))
    again = pipe.image_to_report(out.images[:1], num_inference_steps=STEPS, output_type="tokens")
    assert torch.equal(again.images, codes)
    assert torch.equal(again.tokens[:, TEXT_LEN:], codes + pipe.layout.image_segment.vocab_start)


def pipe_pixels(pipe, images):
    from medim.data.images import preprocess

    return preprocess(images, size=pipe.image_resolution)


def test_output_types_and_dispatch(v1):
    pt = v1.text_to_image(["the heart"], output_type="pt", num_inference_steps=2, generator=seeded(1))
    assert pt.images.shape == (1, 3, IMAGE_PX, IMAGE_PX) and 0 <= pt.images.min() and pt.images.max() <= 1
    tokens = v1("image", ["the heart"], output_type="tokens", num_inference_steps=2, generator=seeded(1))
    assert tokens.images.dtype == torch.long and tokens.images.shape == (1, IMAGE_LEN)
    assert torch.equal(tokens.tokens, pt.tokens)  # same seed, same samples whatever the output type
    images, reports = v1("pairs", ["the"], return_dict=False, num_inference_steps=2)
    assert len(images) == len(reports) == 1
    with pytest.raises(ValueError, match="task must be one of"):
        v1("video", ["the"])


def test_save_load_identical_and_atomic(v1, tmp_path):
    target = v1.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert all(f.endswith((".json", ".safetensors")) for f in files if f != "README.md"), files  # no pickle anywhere
    assert sum(f.startswith("model/model-") for f in files) > 1  # sharded
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "MeDiMPipeline" and index["layout"] == V1_LAYOUT
    assert index["sampler"]["num_inference_steps"] == 128 and index["sampler"]["guidance_scale"] == 5.0

    loaded = MeDiMPipeline.from_pretrained(target)
    loaded.set_progress_bar_config(disable=True)
    a = v1.generate_pairs(["the chest"], num_pairs_per_prompt=2, num_inference_steps=STEPS, generator=seeded(5))
    b = loaded.generate_pairs(["the chest"], num_pairs_per_prompt=2, num_inference_steps=STEPS, generator=seeded(5))
    assert torch.equal(a.tokens, b.tokens) and a.reports == b.reports
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))

    with pytest.raises(FileExistsError, match="overwrite=True"):
        v1.save_pretrained(target)
    with pytest.raises(FileNotFoundError, match="from_original"):
        MeDiMPipeline.from_pretrained(target / "model")


def test_chunked_equals_unchunked(native):
    prompts = ["the chest", "no", ""]
    kw = dict(num_pairs_per_prompt=2, num_inference_steps=STEPS)
    whole = native.generate_pairs(prompts, generator=seeded(3), **kw)
    chunked = native.generate_pairs(prompts, generator=seeded(3), batch_size=4, **kw)
    assert torch.equal(whole.tokens, chunked.tokens) and whole.reports == chunked.reports
    # One generator per output: row 4 alone is row 4 of the batch.
    gens = [seeded(100 + i) for i in range(6)]
    batch = native.generate_pairs(prompts, generator=gens, **kw)
    alone = native.generate_pairs([""], num_pairs_per_prompt=1, num_inference_steps=STEPS, generator=[seeded(104)])
    assert torch.equal(batch.tokens[4:5], alone.tokens)
    assert not torch.equal(batch.tokens[4], batch.tokens[5])  # different seeds, different samples


def test_callback_and_progress_bar(v1, capsys):
    calls = []
    v1.set_progress_bar_config(disable=False)
    try:
        v1.text_to_image(["the", "no", "a"], num_inference_steps=2, batch_size=2, generator=seeded(),
                         callback_on_step_end=lambda pipe, step, t, x: calls.append((pipe, step, x.shape[0])))
    finally:
        v1.set_progress_bar_config(disable=True)
    assert calls == [(v1, 0, 2), (v1, 1, 2), (v1, 0, 1), (v1, 1, 1)]
    assert "MeDiM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda p: p.text_to_image([]), ValueError, "prompts is empty"),
        (lambda p: p.text_to_image("the heart"), TypeError, "prompts must be a list of str"),
        (lambda p: p.text_to_image(["a"], num_inference_steps=0), ValueError, "num_inference_steps must be an int"),
        (lambda p: p.text_to_image(["a"], guidance_scale=-1.0), ValueError,
         "guidance_scale must be a finite number >= 0"),
        (lambda p: p.text_to_image(["a"], output_type="jpg"), ValueError, "output_type must be one of"),
        (lambda p: p.text_to_image(["a"], strategy="beam"), ValueError, "strategy must be one of"),
        (lambda p: p.text_to_image(["a"], batch_size=0), ValueError, "batch_size must be None or an int >= 1"),
        (lambda p: p.text_to_image(["a"], image_size=512), ValueError, "image_size must be"),
        (lambda p: p.text_to_image(["a"], speed=2), ValueError, "unknown sampler options"),
        (lambda p: p.text_to_image(["a", "b"], generator=[seeded()]), ValueError, "one generator per output"),
        (lambda p: p.text_to_image(["a"], generator=0), TypeError, "generator must be"),
        (lambda p: p.generate_pairs(["a"], num_pairs_per_prompt=0), ValueError, "num_pairs_per_prompt"),
        (lambda p: p.image_to_report([]), ValueError, "images is empty"),
        (lambda p: p.image_to_report([123]), TypeError, "image must be a PIL image"),
        (lambda p: p.image_to_report(["/no/such.png"]), FileNotFoundError, "does not exist"),
        (lambda p: p.image_to_report([Image.new("L", (8, 8))] * 2, prompt=["a"]), ValueError, "one per image"),
    ],
)
def test_bad_inputs_fail_before_compute(v1, monkeypatch, call, error, match):
    def boom(*args, **kwargs):
        raise AssertionError("compute ran before the input was checked")

    monkeypatch.setattr(v1.model, "forward", boom)
    monkeypatch.setattr(v1.vqgan, "encode", boom)
    with pytest.raises(error, match=match):
        call(v1)


def test_long_prompt_truncates_with_warning(v1):
    with pytest.warns(UserWarning, match="truncated"):
        out = v1.text_to_image(["the chest " * 20], num_inference_steps=1, generator=seeded())
    assert len(out.images) == 1


def test_offline_from_hub_cache(v1, upstream, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (tests/conftest.py): every piece comes from a Hub-style cache by repo id."""
    cache = tmp_path / "hub"
    to_hub_cache(cache, "org/medim-tiny", v1.save_pretrained(tmp_path / "saved"))
    to_hub_cache(cache, "JiaMao/medim_ckpts", upstream["release"])
    to_hub_cache(cache, "Junfeng5/Liquid_V1_7B", upstream["liquid"])
    to_hub_cache(cache, "NousResearch/Llama-2-7b-hf", upstream["llama_tokenizer"])
    to_hub_cache(cache, "Junfeng5/Liquid_demo", upstream["space"], repo_type="space")

    expected = v1.text_to_image(["the heart"], num_inference_steps=STEPS, generator=seeded(9)).tokens
    pipe = MeDiMPipeline.from_pretrained("org/medim-tiny", cache_dir=cache)
    pipe.set_progress_bar_config(disable=True)
    out = pipe.text_to_image(["the heart"], num_inference_steps=STEPS, generator=seeded(9))
    assert torch.equal(out.tokens, expected)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = MeDiMPipeline.from_original(cache_dir=cache, num_layers=2, layout=V1_LAYOUT)
    pipe.set_progress_bar_config(disable=True)
    out = pipe.text_to_image(["the heart"], num_inference_steps=STEPS, generator=seeded(9))
    assert torch.equal(out.tokens, expected)

    with pytest.raises(Exception, match="org/missing|offline|cache"):
        MeDiMPipeline.from_pretrained("org/missing", cache_dir=cache)


def test_push_to_hub_uploads_a_saved_folder(v1, monkeypatch):
    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            seen["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            seen["create"] = (repo_id, private, exist_ok)

        def file_exists(self, repo_id, filename, revision=None):  # the model card check
            return False

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            folder = Path(folder_path)
            seen["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            seen["folder"] = folder
            return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = v1.push_to_hub("me/medim-tiny", private=True, token="hf_x")
    assert url == "https://hf.co/me/medim-tiny/commit/1"
    assert seen["create"] == ("me/medim-tiny", True, True) and seen["token"] == "hf_x"
    assert "model_index.json" in seen["files"] and "vqgan/model.safetensors" in seen["files"]
    assert not seen["folder"].exists()  # the temporary save is cleaned up


def test_to_dtype_keeps_codebook_float32(upstream):
    pipe = load("original", upstream).to(dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    assert pipe.vqgan.quantize.embedding.weight.dtype == torch.float32
    assert pipe.vqgan.dtype == torch.bfloat16
    out = pipe.generate_pairs(["the"], num_inference_steps=2, generator=seeded())
    assert len(out.images) == 1
    with pytest.raises(ValueError, match="dtype must be a floating"):
        pipe.to(dtype=torch.int64)
