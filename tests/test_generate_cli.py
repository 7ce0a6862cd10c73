"""`medim generate`: outputs, manifest, resume after an interruption without rewriting finished files."""

import json
from pathlib import Path

import pytest
from helpers_pipeline import IMAGE_PX, V1_LAYOUT, write_upstream
from PIL import Image

from medim.cli import build_parser, main
from medim.pipeline import MeDiMPipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    paths = write_upstream(root / "upstream")
    pipe = MeDiMPipeline.from_original(paths["release"], backbone=paths["liquid"], tokenizer=paths["llama_tokenizer"],
                                       vqgan=paths["space"], num_layers=2, layout=V1_LAYOUT)
    return pipe.save_pretrained(root / "pipe")


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("the chest\n\nno normal\n")
    return path


def generate(task, model_dir, out, *extra):
    return main(["generate", task, "--model", str(model_dir), "--out", str(out), "--steps", "2",
                 "--device", "cpu", *map(str, extra)])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_pairs_interrupted_run_resumes_identically(model_dir, prompts, tmp_path, monkeypatch):
    args = ("--prompts", prompts, "--num-per-prompt", 2, "--batch-size", 3, "--seed", 7)
    assert generate("pairs", model_dir, tmp_path / "full", *args) == 0
    full = manifest(tmp_path / "full")
    assert [e["index"] for e in full] == [0, 1, 2, 3] and [e["seed"] for e in full] == [7, 8, 9, 10]
    assert [e["prompt"] for e in full] == ["the chest", "the chest", "no normal", "no normal"]
    assert full[0]["settings"]["num_inference_steps"] == 2 and full[0]["loader"] == "pretrained"
    for e in full:
        assert Image.open(tmp_path / "full" / e["image"]).size == (IMAGE_PX, IMAGE_PX)
        assert (tmp_path / "full" / e["report"]).read_text().startswith(e["prompt"])

    # Interrupt the second batch, then run again.
    original, calls = MeDiMPipeline.generate_pairs, []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(MeDiMPipeline, "generate_pairs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate("pairs", model_dir, out, *args)
    monkeypatch.setattr(MeDiMPipeline, "generate_pairs", original)
    assert [e["index"] for e in manifest(out)] == [0, 1, 2]
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("00000[0-2].*")}
    assert len(finished) == 6

    assert generate("pairs", model_dir, out, *args) == 0
    assert manifest(out) == full
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("00000[0-2].*")} == finished
    for e in full:  # the resumed run made exactly the samples of the uninterrupted one
        assert (out / e["report"]).read_text() == (tmp_path / "full" / e["report"]).read_text()
        assert (out / e["image"]).read_bytes() == (tmp_path / "full" / e["image"]).read_bytes()

    # A line cut short by a kill is dropped and its sample made again; other settings are refused.
    text = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(text[: text.rindex("{") + 10])
    assert generate("pairs", model_dir, out, *args) == 0
    assert manifest(out) == full
    with pytest.raises(SystemExit, match="other settings"):
        generate("pairs", model_dir, out, *args, "--guidance-scale", 1.5)
    prompts.write_text("the heart\nno normal\n")
    with pytest.raises(SystemExit, match="other inputs"):
        generate("pairs", model_dir, out, *args)


def test_image_and_report_tasks(model_dir, prompts, tmp_path):
    assert generate("image", model_dir, tmp_path / "img", "--prompts", prompts, "--image-size", "640x480") == 0
    entries = manifest(tmp_path / "img")
    assert len(entries) == 2 and all("report" not in e for e in entries)
    assert entries[0]["settings"]["image_size"] == [640, 480]
    paths = [tmp_path / "img" / e["image"] for e in entries]

    assert generate("report", model_dir, tmp_path / "rep", "--images", str(tmp_path / "img" / "*.png"),
                    "--prompt", "the") == 0
    entries = manifest(tmp_path / "rep")
    assert [e["source_image"] for e in entries] == [str(p) for p in paths]
    assert all((tmp_path / "rep" / e["report"]).read_text().startswith("the") for e in entries)


@pytest.mark.parametrize(
    "extra, match",
    [
        (("report", "--images", "/nothing/here/*.png"), "nothing matches"),
        (("report",), "needs --images"),
        (("pairs",), "needs --prompts"),
        (("pairs", "--prompts", "PROMPTS", "--num-per-prompt", "0"), "--num-per-prompt must be >= 1"),
        (("image", "--prompts", "PROMPTS", "--image-size", "big"), "WIDTHxHEIGHT"),
        (("image", "--prompts", "PROMPTS", "--prompt", "x"), "--prompt is for 'report'"),
    ],
)
def test_bad_arguments(extra, match, prompts, tmp_path):
    extra = [str(prompts) if a == "PROMPTS" else a for a in extra]
    with pytest.raises(SystemExit, match=match):
        main(["generate", *extra, "--out", str(tmp_path / "o"), "--model", str(tmp_path)])


def test_help_explains_every_option():
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    for action in sub._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help"
    text = sub.format_help()
    for option in ("--model", "--prompts", "--images", "--num-per-prompt", "--out", "--seed", "--batch-size", "--steps"):
        assert option in text
