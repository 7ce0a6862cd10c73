"""`medim convert`: upstream-format files (written by tests/helpers/) -> medim folders that load back."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medim.cli import build_parser, main
from medim.models.vqgan import VQGAN
from medim.pipelines.pipeline import MeDiMPipeline
from tests.helpers.pipeline import IMAGE_LEN, IMAGE_PX, TEXT_LEN, V1_LAYOUT


def original_args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["convert", "original", "--checkpoint", str(paths["release"]), "--backbone", str(paths["liquid"]),
            "--tokenizer", str(paths["llama_tokenizer"]), "--vqgan", str(paths["space"]), "--num-layers", "2",
            "--text-len", str(TEXT_LEN), "--image-len", str(IMAGE_LEN),
            "--base-vocab-size", str(V1_LAYOUT["base_vocab_size"]),
            "--image-vocab-size", str(V1_LAYOUT["image_vocab_size"]), "--out", str(out), *extra]


def saved_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_every_option_has_help():
    parser = build_parser()
    convert = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "convert")[1]
    sources = next(a for a in convert._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert sorted(sources) == ["liquid", "original", "vqgan"]
    for name, sub in sources.items():
        options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
        assert {"--out", "--overwrite", "--dtype"} <= {s for a in options for s in a.option_strings}, name
        for action in options:
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings} has no help"


def test_original_round_trip(upstream, tmp_path, capsys):
    out = tmp_path / "v1"
    assert main(original_args(upstream, out)) == 0
    assert "medim-v1 layout, 2 layers" in capsys.readouterr().out
    # Only JSON and safetensors (no pickle in saved artefacts), and the model card, README.md.
    assert {p.suffix for p in saved_files(out)} <= {".json", ".safetensors", ".md"}
    index = json.loads((out / "model_index.json").read_text())
    assert index["layout"] == V1_LAYOUT

    pipe = MeDiMPipeline.from_pretrained(out)
    ref = MeDiMPipeline.from_original(upstream["release"], backbone=upstream["liquid"],
                                      tokenizer=upstream["llama_tokenizer"], vqgan=upstream["space"],
                                      num_layers=2, layout=V1_LAYOUT)
    own, expected = pipe.model.state_dict(), ref.model.state_dict()
    assert own.keys() == expected.keys()
    assert all(torch.equal(own[k], expected[k]) for k in own)
    # ... and those are the newest release checkpoint's tensors.
    release = load_file(upstream["release"] / "checkpoint_200" / "model.safetensors")
    assert torch.equal(own["layers.1.adaLN_modulation.weight"], release["model.layers.1.adaLN_modulation.weight"])
    assert pipe.tokenizer.convert_tokens_to_ids(["<boi>", "<eoi>", "<eos>"]) == [120, 121, 122]
    codes = torch.randint(0, 64, (1, IMAGE_LEN))
    assert torch.equal(pipe.vqgan.decode(codes), ref.vqgan.decode(codes))


def test_refuses_to_overwrite_before_loading(upstream, tmp_path, monkeypatch):
    out = tmp_path / "v1"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before checking --out")

    monkeypatch.setattr(MeDiMPipeline, "from_original", must_not_load)
    with pytest.raises(SystemExit, match="--overwrite"):
        main(original_args(upstream, out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="not a directory"):
        main(["convert", "vqgan", "--ckpt", "x", "--out", str(tmp_path / "file")])
    with pytest.raises(SystemExit, match=r"is not a previous output of medim convert \(keep.txt\)"):
        main(original_args(upstream, out, "--overwrite"))  # --overwrite never deletes a user's file
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    monkeypatch.undo()

    (out / "keep.txt").unlink()
    assert main(original_args(upstream, out, "--dtype", "float32")) == 0
    assert main(original_args(upstream, out, "--overwrite", "--dtype", "bfloat16")) == 0  # a previous output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "v1"]  # no temp folders left
    with safe_open(str(next((out / "model").glob("*.safetensors"))), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    vqgan = load_file(out / "vqgan" / "model.safetensors")
    assert vqgan["quantize.embedding.weight"].dtype == torch.float32  # nearest-code search stays exact
    assert {v.dtype for k, v in vqgan.items() if not k.startswith("quantize.")} == {torch.bfloat16}


def test_liquid_to_trainable_pipeline(upstream, tmp_path):
    out = tmp_path / "base"
    assert main(["convert", "liquid", "--backbone", str(upstream["liquid"]), "--vqgan", str(upstream["space"]),
                 "--num-layers", "2", "--text-len", str(TEXT_LEN), "--image-len", str(IMAGE_LEN),
                 "--image-offset", "200", "--out", str(out)]) == 0
    pipe = MeDiMPipeline.from_pretrained(out)
    assert pipe.layout.name == "native" and len(pipe.model.layers) == 2 and pipe.layout.mask_id == 264
    assert pipe.image_resolution == IMAGE_PX
    assert pipe.tokenizer.bos_token_id == 2  # the backbone's own tokenizer (Liquid/Gemma ids)
    source = {}
    for shard in upstream["liquid"].glob("model-*.safetensors"):
        source.update(load_file(shard))
    own = pipe.model.state_dict()
    for key in ("layers.1.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight", "norm.weight"):
        assert torch.equal(own[key], source["model." + key].float()), key
    assert torch.equal(own["embed_tokens.weight"][:264], source["model.embed_tokens.weight"].float())


def test_vqgan_to_safetensors(upstream, tmp_path):
    ckpt = upstream["space"] / "chameleon" / "vqgan.ckpt"
    ref = VQGAN.from_taming(ckpt)
    pixels = torch.rand(2, 3, IMAGE_PX, IMAGE_PX) * 2 - 1
    for n, extra in enumerate((["--ckpt", str(ckpt)],
                               ["--ckpt", str(upstream["space"]), "--subfolder", "chameleon"],
                               ["--ckpt", str(ckpt), "--config", str(ckpt.with_name("vqgan.yaml"))])):
        out = tmp_path / f"vq{n}"
        assert main(["convert", "vqgan", *extra, "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        loaded = VQGAN.from_pretrained(out)
        assert loaded.config == ref.config
        codes = loaded.encode(pixels)
        assert torch.equal(codes, ref.encode(pixels)) and torch.equal(loaded.decode(codes), ref.decode(codes))


@pytest.mark.parametrize("argv, message", [
    (["liquid", "--num-layers", "0"], "positive int"),
    (["liquid", "--image-offset", "abc"], "'none'"),
    (["original", "--dtype", "int8"], "invalid choice"),
    (["vqgan"], "--ckpt"),
    (["original"], "--out"),
])
def test_bad_arguments_fail_clearly(argv, message, tmp_path, capsys):
    out = [] if argv == ["original"] else ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        main(["convert", *argv, *out])
    assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
