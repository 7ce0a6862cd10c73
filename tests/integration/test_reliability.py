"""Issue 27's API cases: control-token strings in user text, schedule values checked (and blamed on
the file), `sampler_config` checked at assignment, `num_samples` bounded, one rule for RGBA masks."""

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from medim.diffusion import SamplerConfig, get_schedule
from medim.layout import MeDiMV1Layout
from medim.pipelines.editing import load_mask
from medim.pipelines.pipeline import MeDiMPipeline
from medim.utils.hub import bundled_model_path
from tests.helpers.editing import images, native_pipe, seeded, v1_pipe


@pytest.mark.parametrize("make", [native_pipe, v1_pipe])
def test_control_token_strings_in_user_text_are_plain_text(make):
    pipe = make()
    tok, layout = pipe.tokenizer, pipe.layout
    plain = layout.encode_reports(tok, ["the chest", "no normal"])
    ids = tok(["the chest", "no normal"], add_special_tokens=False)["input_ids"]
    for row, expected in zip(plain.tolist(), ids):  # texts without control strings: the tokens as before
        assert all(i in row for i in expected)
    specials = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens} - {tok.unk_token_id}
    added = len(layout._report_ids(tok, "")) - len(tok("", add_special_tokens=False)["input_ids"])
    for text in ("</s>", "the chest </s> no normal", "<pad>", "<s> the"):
        ids = layout._report_ids(tok, text)
        own = ids[1:] if isinstance(pipe.layout, MeDiMV1Layout) else ids[:-1]  # the layout's BOS / EOS
        assert len(own) == len(ids) - added and not set(own) & specials, (text, ids)
        assert len(own) > 1  # the control string's characters, not one token
    tail = layout._report_ids(tok, "no normal")
    tail = tail[1:] if isinstance(pipe.layout, MeDiMV1Layout) else tail[:-1]
    ids = layout._report_ids(tok, "the chest </s> no normal")
    assert any(ids[i:i + len(tail)] == tail for i in range(len(ids)))  # nothing after "</s>" dropped


def test_score_of_a_control_token_string_scores_its_characters():
    pipe = native_pipe()
    image = images(1)
    a = pipe.score(image, ["</s>"], generator=seeded(0), num_samples=4).scores
    b = pipe.score(image, ["no"], generator=seeded(0), num_samples=4).scores
    assert math.isfinite(float(a[0])) and float(a[0]) != float(b[0])


@pytest.mark.parametrize("name, options, match", [
    ("loglinear", {"eps": 5.0}, r"eps must be a number in \(0, 1\), got 5.0"),
    ("loglinear", {"eps": float("nan")}, "eps must be a finite number"),
    ("cosine", {"eps": -1}, r"eps must be a number in \(0, 1\)"),
    ("loglinear", {"eps": "x"}, "eps must be a finite number, got 'x'"),
    ("loglinear", {"epsilon": 0.1}, r"takes the options \['eps'\], got unknown \['epsilon'\]"),
    ("linear", {"sigma_min": 2.0, "sigma_max": 1.0}, "sigma_max must be at least sigma_min"),
])
def test_schedule_values_are_checked(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_schedule(name, **options)


@pytest.mark.parametrize("schedule, match", [
    ({"name": "loglinear", "eps": 5.0}, "eps must be a number in"),
    ({"name": "loglinear", "eps": "x"}, "eps must be a finite number"),
    ({"name": "loglinear", "rate": 1}, "got unknown"),
])
def test_a_tampered_schedule_is_blamed_on_model_index(schedule, match, tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(bundled_model_path("medim-demo"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["sampler"]["noise_schedule"] = schedule
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f'{folder}: model_index.json "sampler": .*{match}'):
        MeDiMPipeline.from_pretrained(folder)


def test_sampler_config_is_checked_at_assignment():
    pipe = native_pipe()
    pipe.sampler_config = {"num_inference_steps": 3}
    assert isinstance(pipe.sampler_config, SamplerConfig) and pipe.sampler_config.num_inference_steps == 3
    pipe.sampler_config = SamplerConfig(num_inference_steps=2)
    assert pipe.sampler_config.num_inference_steps == 2
    with pytest.raises(ValueError, match="num_inference_steps must be an int"):
        pipe.sampler_config = {"num_inference_steps": 0}
    with pytest.raises(ValueError, match="unknown sampler options"):
        pipe.sampler_config = {"steps": 3}
    with pytest.raises(TypeError, match="sampler_config must be a SamplerConfig or a dict"):
        pipe.sampler_config = 3
    assert pipe.sampler_config.num_inference_steps == 2  # a refused value changes nothing


def test_num_samples_is_bounded_before_any_compute():
    pipe = native_pipe()
    with pytest.raises(ValueError, match=r"num_samples must be an int in \[1, 4096\], got 1000000000"):
        pipe.score(images(1), ["no"], num_samples=10**9)
    with pytest.raises(ValueError, match=r"num_samples must be an int in \[1, 4096\]"):
        pipe.rank(images(1), ["no"], num_samples=10**9)


def test_rgba_masks_follow_the_apps_rule(tmp_path):
    from medim.app.tasks import mask_from_editor

    clear = Image.new("RGBA", (8, 8), (255, 255, 255, 0))  # white but fully transparent: nothing painted
    assert not load_mask(clear).any()
    painted = clear.copy()
    painted.paste((0, 0, 0, 255), (0, 0, 4, 4))  # painted in black: still painted
    assert load_mask(painted).sum() == 16
    painted.save(tmp_path / "painted.png")
    assert load_mask(tmp_path / "painted.png").sum() == 16
    opaque = Image.new("RGBA", (8, 8), (0, 0, 0, 255))  # no transparency: read by whiteness
    opaque.paste((255, 255, 255, 255), (0, 0, 2, 2))
    assert load_mask(opaque).sum() == 4
    background = Image.new("RGB", (8, 8))
    _, app_mask = mask_from_editor({"background": background, "layers": [painted]})
    assert (np.asarray(app_mask) > 127).sum() == load_mask(painted).sum()
    with pytest.raises(ValueError, match="a painted layer is 4x4 but the image is 8x8"):
        mask_from_editor({"background": background, "layers": [painted.resize((4, 4))]})


# ------------------------------------------------- nothing outside a model or checkpoint folder is read


def _demo_copy(tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(bundled_model_path("medim-demo"), folder)
    return folder


def test_a_pipeline_part_linked_outside_its_folder_is_refused(tmp_path):
    other = _demo_copy(tmp_path / "other")
    folder = _demo_copy(tmp_path)
    shutil.rmtree(folder / "model")
    (folder / "model").symlink_to(other / "model", target_is_directory=True)
    with pytest.raises(ValueError, match="model resolves outside the pipeline folder"):
        MeDiMPipeline.from_pretrained(folder)
    (folder / "model").unlink()
    shutil.copytree(other / "model", folder / "model")
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"private_key_name": 1}))
    (folder / "vqgan" / "config.json").unlink()
    (folder / "vqgan" / "config.json").symlink_to(secret)
    with pytest.raises(ValueError, match="vqgan/config.json resolves outside") as refused:
        MeDiMPipeline.from_pretrained(folder)
    assert "private_key_name" not in str(refused.value)
    (folder / "vqgan" / "config.json").unlink()
    (folder / "vqgan" / "config.json").symlink_to(other / "vqgan" / "config.json")
    with pytest.raises(ValueError, match="resolves outside"):
        MeDiMPipeline.from_pretrained(folder)
    (folder / "vqgan" / "config.json").unlink()
    shutil.copy(other / "vqgan" / "config.json", folder / "vqgan" / "inner.json")
    (folder / "vqgan" / "config.json").symlink_to("inner.json")  # a link inside the folder is fine
    MeDiMPipeline.from_pretrained(folder)


OUTSIDE = {"bytes": 1, "sha256": "0" * 64}


@pytest.mark.parametrize("tamper, match", [
    (lambda files: {"../../../etc/hostname": OUTSIDE, **files}, "not a file of the checkpoint"),
    (lambda files: {"/etc/hostname": OUTSIDE, **files}, "not a file of the checkpoint"),
    (lambda files: list(files), '"files" is a list'),
    (lambda files: {**files, "config.yaml": {"bytes": "5", "sha256": "x"}}, "the entry of 'config.yaml'"),
])
def test_a_checkpoint_manifest_lists_only_its_own_files(tamper, match, tmp_path):
    import torch

    from medim.training import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    path = ckpt.save_checkpoint(tmp_path, 1, model_state=model.state_dict(),
                                optim_state={"state": {}, "param_groups": []}, trainer_state={"step": 1},
                                rng_states=[ckpt.capture_rng()], config_yaml="a: 1\n")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = tamper(manifest["files"])
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.verify_checkpoint(path)


@pytest.mark.parametrize("strategy", ["threshold", "ddpm"])
def test_halton_order_is_refused_where_it_would_be_ignored(strategy, tmp_path):
    with pytest.raises(ValueError, match=f"order='halton' is a maskgit commit order; strategy='{strategy}'"):
        SamplerConfig(strategy=strategy, order="halton")
    pipe = native_pipe()
    with pytest.raises(ValueError, match="order='halton'"):
        pipe.text_to_image(["no"], strategy=strategy, order="halton", num_inference_steps=2)
    from medim.cli import main

    (tmp_path / "p.txt").write_text("no\n")
    with pytest.raises(SystemExit, match="order='halton'"):
        main(["generate", "image", "--model", "medim-demo", "--prompts", str(tmp_path / "p.txt"),
              "--strategy", strategy, "--order", "halton", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_inpainting_returns_the_inputs_size():
    pipe = native_pipe()
    side = pipe.image_resolution
    wide = images(1, size=(side, side // 2))[0]
    mask = np.zeros((side // 2, side), dtype=bool)
    mask[:, : side // 2] = True
    out = pipe.inpaint([wide, images(1)[0]], [mask, np.ones((side, side), dtype=bool)], ["no", "no"],
                       generator=seeded(0), num_inference_steps=2)
    assert [im.size for im in out.images] == [(side, side // 2), (side, side)]
    square = pipe.inpaint([images(1)[0]], [np.ones((side, side), dtype=bool)], ["no"], generator=seeded(0),
                          num_inference_steps=2, output_type="pt")
    assert square.images.shape[-2:] == (side, side)


# ------------------------------------------------------- found by benchmarks/probe_reliability.py


@pytest.mark.parametrize("part, named", [("model", ["os", "system"]), ("model", ["medim", "Nope"]),
                                         ("vqgan", "VQGAN"), ("tokenizer", ["builtins", "eval"])])
def test_model_index_naming_other_classes_is_refused(part, named, tmp_path):
    folder = _demo_copy(tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index[part] = named
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f'model_index.json "{part}" names .* the file was edited'):
        MeDiMPipeline.from_pretrained(folder)


def test_noise_schedule_as_model_index_stores_it():
    config = SamplerConfig(noise_schedule={"name": "cosine", "eps": 1e-3})
    assert config.noise_schedule == get_schedule("cosine", eps=1e-3)
    assert SamplerConfig.from_dict(config.to_dict()) == config
    for bad, match in (({"name": "loglinear", "eps": 5.0}, "noise_schedule: eps must be a number in"),
                       ({"name": "loglinear", "rate": 1}, "noise_schedule: schedule 'loglinear' takes the options"),
                       ({"eps": 0.1}, "noise_schedule: schedule must be one of"), (3, "noise_schedule must be one of")):
        with pytest.raises(ValueError, match=match):
            SamplerConfig(noise_schedule=bad)


def test_return_dict_and_the_number_of_outputs_are_checked_before_any_compute(monkeypatch):
    from medim.pipelines.common import MAX_OUTPUTS
    from tests.helpers.editing import fail_if_called

    pipe = native_pipe()
    fail_if_called(monkeypatch, pipe)
    with pytest.raises(TypeError, match="return_dict must be a bool, got str"):
        pipe.text_to_image(["no"], return_dict="yes")
    with pytest.raises(ValueError, match=rf"num_pairs_per_prompt must be an int in \[1, {MAX_OUTPUTS}\]"):
        pipe.generate_pairs(["no"], num_pairs_per_prompt=10**9)  # refused at once, not after building 10**9 rows
    with pytest.raises(ValueError, match=f"{MAX_OUTPUTS + 1} outputs in one call; at most {MAX_OUTPUTS}"):
        pipe.text_to_image(["no"] * (MAX_OUTPUTS + 1))


@pytest.mark.parametrize("user", ["notes.txt", "model/notes.txt", "model_index.json"])
def test_save_pretrained_overwrite_keeps_a_users_files(user, tmp_path):
    pipe = native_pipe()
    folder = tmp_path / "saved"
    if user != "model_index.json":
        pipe.save_pretrained(folder)  # a saved pipeline, then a file of the user's put in it
    (folder / user).parent.mkdir(parents=True, exist_ok=True)
    (folder / user).write_text("the user's own file\n")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="holds files a save does not write|is not a saved pipeline"):
        pipe.save_pretrained(folder, overwrite=True)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    (folder / user).unlink()
    if user != "model_index.json":
        pipe.save_pretrained(folder, overwrite=True, max_shard_size="100KB")  # a saved pipeline is replaced
        assert len(list((folder / "model").glob("model-*-of-*.safetensors"))) > 1
        pipe.save_pretrained(folder, overwrite=True)  # another shard layout: still medim's files
        assert MeDiMPipeline.from_pretrained(folder).layout.to_dict() == pipe.layout.to_dict()


def _adapter(folder, overwrite=False):
    """A LoRA adapter folder of `native_pipe()`'s model, written by the writer `save_lora_weights`
    and the trainer use."""
    from medim.pipelines import lora

    pipe = native_pipe()
    config = lora.lora_config(r=2, alpha=2, target_modules=["q_proj", "v_proj"])
    lora.add_adapter(pipe.model, config)
    return lora.save_adapter(folder, pipe.model, config, state=lora.adapter_state_dict(pipe.model), base_model=None,
                             overwrite=overwrite)


@pytest.mark.parametrize("part", ["adapter_config.json", "adapter_model.safetensors"])
def test_an_adapter_part_linked_outside_its_folder_is_refused(part, tmp_path):
    folder = _adapter(tmp_path / "adapter")
    native_pipe().load_lora_weights(folder)  # whole: loads
    (tmp_path / "outside").mkdir()
    (folder / part).rename(tmp_path / "outside" / part)
    (folder / part).symlink_to(tmp_path / "outside" / part)
    with pytest.raises(ValueError, match=f"{part} resolves outside the adapter folder"):
        native_pipe().load_lora_weights(folder)


def test_an_adapter_save_with_overwrite_keeps_a_users_files(tmp_path):
    folder = _adapter(tmp_path / "adapter")
    (folder / "notes.txt").write_text("the user's own notes\n")
    with pytest.raises(FileExistsError, match=r"holds files a save does not write \(notes.txt\)"):
        _adapter(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "the user's own notes\n"
    (folder / "notes.txt").unlink()
    _adapter(folder, overwrite=True)  # an adapter folder alone is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "adapter_config.json").write_text("my config\n")
    with pytest.raises(FileExistsError, match="is not an adapter folder"):
        _adapter(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "adapter_config.json").read_text() == "my config\n"


def test_a_vqgan_save_with_overwrite_keeps_a_users_files(tmp_path):
    from tests.helpers.vqgan import tiny_model

    folder = tiny_model(seed=1).save_pretrained(tmp_path / "vq")
    (folder / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match=r"holds files a save does not write \(notes.txt\)"):
        tiny_model(seed=2).save_pretrained(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine\n"
    (folder / "notes.txt").unlink()
    tiny_model(seed=2).save_pretrained(folder, overwrite=True)
