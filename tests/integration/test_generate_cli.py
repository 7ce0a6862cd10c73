"""`medim generate`: outputs, manifest, resume after an interruption without rewriting finished files."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from medim.cli import build_parser, main
from medim.commands.common import WITHOUT_HUB
from medim.pipelines.pipeline import MeDiMPipeline
from tests.helpers.pipeline import IMAGE_PX, V1_LAYOUT


@pytest.fixture(scope="module")
def model_dir(upstream, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    paths = upstream
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
    """The sample entries, after the header line medim signs its manifests with."""
    header, *entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert header["medim"] == "generate" and "index" not in header
    assert all(e["medim"] == "generate" for e in entries)
    return entries


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

    assert generate("image", model_dir, tmp_path / "img2", "--prompts", prompts) == 0
    assert manifest(tmp_path / "img2")[0]["settings"]["image_size"] is None  # not given: not claimed

    assert generate("report", model_dir, tmp_path / "rep", "--images", str(tmp_path / "img" / "*.png"),
                    "--prompt", "the") == 0
    entries = manifest(tmp_path / "rep")
    assert [e["source_image"] for e in entries] == [str(p) for p in paths]
    assert all((tmp_path / "rep" / e["report"]).read_text().startswith("the") for e in entries)


def test_cache_interval_and_order_reach_the_sampler(model_dir, prompts, tmp_path):
    """--cache-interval 1 refreshes every step: the same images as uncached; both options are
    recorded in the manifest, and a resume with another value is refused."""
    assert generate("image", model_dir, tmp_path / "cached", "--prompts", prompts, "--steps", 4,
                    "--cache-interval", 1, "--order", "halton") == 0
    assert generate("image", model_dir, tmp_path / "halton", "--prompts", prompts, "--steps", 4,
                    "--order", "halton") == 0
    cached = manifest(tmp_path / "cached")
    assert cached[0]["settings"]["cache_interval"] == 1 and cached[0]["settings"]["order"] == "halton"
    for a, b in zip(cached, manifest(tmp_path / "halton")):
        assert (tmp_path / "cached" / a["image"]).read_bytes() == (tmp_path / "halton" / b["image"]).read_bytes()
    with pytest.raises(SystemExit, match="other settings .*cache_interval"):
        generate("image", model_dir, tmp_path / "cached", "--prompts", prompts, "--steps", 4, "--order", "halton")


@pytest.mark.parametrize(
    "extra, match",
    [
        (("report", "--images", "/nothing/here/*.png"), "nothing matches"),
        (("report",), "needs --images"),
        (("pairs",), "needs --prompts"),
        (("pairs", "--prompts", "PROMPTS", "--num-per-prompt", "0"), "--num-per-prompt must be an int >= 1"),
        (("image", "--prompts", "PROMPTS", "--image-size", "big"), "WIDTHxHEIGHT"),
        (("image", "--prompts", "PROMPTS", "--prompt", "x"), "--prompt is for 'report'"),
        (("image", "--prompt", "x"), "--prompt is for 'report'"),  # not "needs --prompts"
        (("pairs", "--masks", "m.png"), "--masks and --mask-dilation are for 'inpaint'"),
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
    for option in ("--model", "--prompts", "--images", "--num-per-prompt", "--out", "--seed", "--batch-size",
                   "--num-inference-steps N, --steps N", "--guidance-scale", "--cache-interval", "--order",
                   "--schedule", "--text-share"):
        assert option in text
    # Each default said once: none that says nothing ("(default: None)"), the released model named once.
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("JiaMao/medim_ckpts") == 1 and "(default: JiaMao/medim_ckpts)" in text
    assert all(action.dest == "num_inference_steps" for action in sub._actions if "--steps" in action.option_strings)


# ------------------------------------------------------- bad inputs: a clear error before any compute


def bad(tmp_path: Path, *argv) -> str:
    """The message `medim generate` stops with (a folder that loads nothing as --model: every
    check here must fire before the model is read)."""
    with pytest.raises(SystemExit) as stop:
        main(["generate", *map(str, argv), "--out", str(tmp_path / "o")])
    return str(stop.value)


def test_model_folder_errors(prompts, tmp_path):
    message = bad(tmp_path, "pairs", "--prompts", prompts, "--model", tmp_path / "nope")
    assert message == f"medim generate: cannot load --model {tmp_path / 'nope'}: no such folder"
    assert "no such folder" in bad(tmp_path, "pairs", "--prompts", prompts, "--model", "./nope")
    (tmp_path / "empty").mkdir()
    assert "holds neither a saved MeDiMPipeline (model_index.json) nor the released checkpoint" in bad(
        tmp_path, "pairs", "--prompts", prompts, "--model", tmp_path / "empty")
    assert "is a file" in bad(tmp_path, "pairs", "--prompts", prompts, "--model", prompts)
    assert not (tmp_path / "o").exists()  # nothing written


def test_auto_loader_reads_a_release_folder_as_the_original_checkpoint(prompts, tmp_path, monkeypatch):
    release = tmp_path / "release"
    (release / "checkpoint_7").mkdir(parents=True)
    (release / "checkpoint_7" / "model.safetensors").write_bytes(b"")
    calls = []

    def from_original(checkpoint, **kwargs):
        calls.append(checkpoint)
        raise RuntimeError("stop here")

    monkeypatch.setattr(MeDiMPipeline, "from_original", from_original)
    with pytest.raises(SystemExit, match="unexpected RuntimeError: stop here"):  # not the user's fault: a bug
        main(["generate", "pairs", "--prompts", str(prompts), "--model", str(release), "--out", str(tmp_path / "o")])
    assert calls == [str(release)]


def test_hub_errors_are_reported_as_they_are(prompts, tmp_path, monkeypatch):
    """A repo id the Hub cannot answer for (offline, no access) stops before any load with the
    Hub's own error, never read as the released checkpoint instead."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(repo, filename, **kwargs):
        raise LocalEntryNotFoundError(f"cannot reach the Hub for {repo}/{filename}")

    def must_not_load(*a, **k):
        raise AssertionError("a loader ran after the Hub failed")

    monkeypatch.setattr("medim.pipelines.loading.resolve_file", unreachable)
    # the Hub "answers" the probe; the download then fails
    monkeypatch.setattr("medim.utils.hub.hub_fetch_options", lambda repo_id, hub=None, **kwargs: hub)
    monkeypatch.setattr(MeDiMPipeline, "from_original", must_not_load)
    monkeypatch.setattr(MeDiMPipeline, "from_pretrained", must_not_load)
    assert bad(tmp_path, "pairs", "--prompts", prompts, "--model", "org/medim-cxr") == (
        "medim generate: cannot load --model org/medim-cxr: cannot reach the Hub for org/medim-cxr/model_index.json. "
        + WITHOUT_HUB + ".")
    assert not (tmp_path / "o").exists()


def test_load_errors_are_reported_as_they_are(prompts, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    message = bad(tmp_path, "pairs", "--prompts", prompts, "--model", broken)
    assert message.startswith(f"medim generate: cannot load --model {broken}: ") and "is not valid JSON" in message


def test_bundled_model_by_name(prompts, tmp_path):
    assert main(["generate", "image", "--model", "medim-demo", "--prompts", str(prompts), "--steps", "2",
                 "--out", str(tmp_path / "o")]) == 0
    assert [e["loader"] for e in manifest(tmp_path / "o")] == ["pretrained", "pretrained"]


def test_prompts_file_that_is_not_utf8(tmp_path, model_dir):
    path = tmp_path / "latin1.txt"
    path.write_bytes("the chest\nno p\xe9nible finding\n".encode("latin-1"))
    message = bad(tmp_path, "pairs", "--prompts", path, "--model", model_dir)
    assert message.startswith(f"--prompts: {path} line 2 is not valid UTF-8")


@pytest.mark.parametrize("extra, match", [
    (("--seed", 2**63), r"--seed: sample i uses seed \+ i, which must stay in \[0, 9223372036854775807\]"),
    (("--seed", 2**63 - 3, "--num-per-prompt", 2), r"gives \[9223372036854775805, 9223372036854775808\]"),
    (("--seed", -1), "--seed"),
    (("--steps", 10**9), r"--num-inference-steps: num_inference_steps must be an int in \[1, 65536\], got 1000000000"),
    (("--num-inference-steps", 0), r"--num-inference-steps: num_inference_steps must be an int in \[1, 65536\]"),
    (("--top-p", 1.5), r"--top-p: top_p must be None or a number in \(0, 1\]"),
    (("--strategy", "beam"), "--strategy: strategy must be one of"),
    (("--cache-interval", 0),
     r"--cache-interval: cache_interval must be None or an int in \[1, 65536\]"),
    (("--order", "spiral"), r"--order: order must be one of \['confidence', 'halton', 'text_first'\]"),
    (("--schedule", "square"), r"--schedule: schedule must be one of"),
    (("--text-share", "1.5"), r"--text-share: text_share must be a number in \(0, 1\)"),
    (("--device", "meta"), "--device: .*meta"),
])
def test_out_of_range_options(extra, match, prompts, tmp_path):
    # "--seed 2**63 - 3" with 2 prompts x 2 copies: the last sample's seed is 2**63, one too many.
    assert re.search(match, bad(tmp_path, "pairs", "--prompts", prompts, "--model", tmp_path, *extra))


def test_lone_surrogate_prompt(tmp_path, model_dir):
    image = tmp_path / "x.png"
    Image.new("L", (IMAGE_PX, IMAGE_PX)).save(image)
    assert "--prompt is not valid text: it holds a lone surrogate '\\ud800' at position 3" in bad(
        tmp_path, "report", "--images", image, "--prompt", "the\ud800", "--model", tmp_path)
    pipe = MeDiMPipeline.from_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"prompts\[1\] is not valid text: it holds a lone surrogate"):
        pipe.text_to_image(["the chest", "\ud800"])
    with pytest.raises(ValueError, match="prompt is not valid text"):
        pipe.image_to_report([image], prompt="\udcff")


def test_huge_request_is_planned_lazily(prompts, tmp_path, monkeypatch):
    """A billion samples per prompt: checks and planning take no memory; the load is reached."""
    import tracemalloc

    import medim.commands.generate as generate_command

    def load(*args, **kwargs):
        raise RuntimeError(f"reached the model load; peak {tracemalloc.get_traced_memory()[1]} bytes")

    monkeypatch.setattr(generate_command, "load_pipeline", load)
    monkeypatch.setenv("MEDIM_DEBUG", "1")  # the exception itself, not the command line's message
    tracemalloc.start()
    try:
        with pytest.raises(RuntimeError, match="reached the model load") as reached:
            main(["generate", "pairs", "--prompts", str(prompts), "--model", "medim-demo",
                  "--num-per-prompt", str(10**9), "--out", str(tmp_path / "o")])
    finally:
        tracemalloc.stop()
    peak = int(str(reached.value).split()[-2])
    assert peak < 10 * 2**20, f"planning {2 * 10**9} samples allocated {peak} bytes"


def test_unreadable_image_is_skipped_and_recorded(model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "c"):
        Image.effect_noise((128, 128), 60).save(images / f"{name}.png")
    whole = (images / "a.png").read_bytes()
    (images / "b.png").write_bytes(whole[: len(whole) * 2 // 3])  # cut short, as by a failed copy
    out = tmp_path / "rep"
    assert generate("report", model_dir, out, "--images", str(images / "*.png")) == 0
    entries = manifest(out)
    assert [e["index"] for e in entries] == [0, 1, 2]
    assert "report" in entries[0] and "report" in entries[2]
    assert "report" not in entries[1] and entries[1]["source_image"] == str(images / "b.png")
    assert "truncated" in entries[1]["error"]
    assert sorted(p.name for p in out.iterdir()) == ["000000.txt", "000002.txt", "manifest.jsonl"]
    stamp = (out / "manifest.jsonl").stat().st_mtime_ns
    assert generate("report", model_dir, out, "--images", str(images / "*.png")) == 0  # all done: not retried
    assert (out / "manifest.jsonl").stat().st_mtime_ns == stamp


def test_inpaint_task(tmp_path, monkeypatch):
    import numpy as np

    from medim.data.synthetic import make_pair

    paths, masks = [], []
    for i in range(2):
        image, _, _ = make_pair(i)
        paths.append(tmp_path / f"phantom{i}.png")
        image.save(paths[-1])
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[:32, :32 * (i + 1)] = 255
        masks.append(tmp_path / f"mask{i}.png")
        Image.fromarray(mask).save(masks[-1])
    reports = tmp_path / "reports.txt"
    reports.write_text("A large dense nodule in the right upper zone.\nNo focal lesion.\n")
    out = tmp_path / "inpainted"
    args = ["generate", "inpaint", "--model", "medim-demo", "--device", "cpu", "--steps", "4", "--out", str(out),
            "--images", str(tmp_path / "phantom*.png"), "--masks", str(tmp_path / "mask*.png")]
    assert main([*args, "--prompts", str(reports)]) == 0
    entries = manifest(out)
    assert [(e["source_image"], e["mask"], e["prompt"]) for e in entries] == [
        (str(p), str(m), r) for p, m, r in zip(paths, masks, reports.read_text().splitlines())]
    assert all(Image.open(out / e["image"]).size == (64, 64) and "report" not in e for e in entries)
    assert entries[0]["settings"]["mask_dilation"] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*args, "--prompts", str(reports)]) == 0  # resumed: nothing to do, nothing rewritten
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(SystemExit, match="other inputs"):  # other masks in the same folder
        main([*args[:-1], str(masks[0]), "--prompts", str(reports)])
    # Without reports, each image's report is generated with it.
    assert main([*args[:-4], "--out", str(tmp_path / "free"), *args[-4:]]) == 0
    assert all((tmp_path / "free" / e["report"]).read_text().strip() for e in manifest(tmp_path / "free"))

    def must_not_load(*a, **k):
        raise AssertionError("the model loaded before the inputs were checked")

    monkeypatch.setattr(MeDiMPipeline, "from_pretrained", must_not_load)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "small.png")
    for extra, match in [(["--masks", str(tmp_path / "small.png")], "32x32 but its image"),
                         (["--masks", str(masks[0]), str(masks[1]), str(masks[0])], "one per image"),
                         ([], "needs --masks")]:
        with pytest.raises(SystemExit, match=match):
            main([*args[:12], *extra, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="for 'inpaint'"):
        main(["generate", "image", "--model", "medim-demo", "--prompts", str(reports), "--out", str(tmp_path / "y"),
              "--masks", str(masks[0])])


# ------------------------------------------------- the user's files: never overwritten, never deleted


def test_folder_without_a_medim_manifest_is_refused(model_dir, prompts, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "000000.png").write_bytes(b"mine")
    (out / "000001.txt").write_text("my notes")
    with pytest.raises(SystemExit, match="not empty and holds no manifest of medim generate"):
        generate("pairs", model_dir, out, "--prompts", prompts)
    (out / "manifest.jsonl").write_text("my list\n")
    with pytest.raises(SystemExit, match="manifest.jsonl was not written by medim generate"):
        generate("pairs", model_dir, out, "--prompts", prompts)
    assert (out / "000000.png").read_bytes() == b"mine" and (out / "000001.txt").read_text() == "my notes"
    assert (out / "manifest.jsonl").read_text() == "my list\n"


def test_cleanup_removes_only_the_atomic_writers_temporary_names(model_dir, prompts, tmp_path):
    out = tmp_path / "o"
    assert generate("image", model_dir, out, "--prompts", prompts) == 0
    mine = [".manifest.jsonl.bak", ".000001.png.orig", ".manifest.rank3.jsonl.old", ".000000.png.tmp-notahex1",
            ".000000.png.tmp-0123abcd.keep"]
    for name in mine:
        (out / name).write_text("mine")
    leftovers = [".000000.png.tmp-0123abcd", ".manifest.jsonl.tmp-89abcdef", ".manifest.rank2.jsonl.tmp-00000000"]
    for name in leftovers:
        (out / name).write_text("half")
    assert generate("image", model_dir, out, "--prompts", prompts) == 0
    assert all((out / name).read_text() == "mine" for name in mine)
    assert not any((out / name).exists() for name in leftovers)


def test_a_manifest_line_medim_did_not_write_is_refused(model_dir, prompts, tmp_path):
    out = tmp_path / "o"
    assert generate("image", model_dir, out, "--prompts", prompts) == 0
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"index": 9}\n')
    with pytest.raises(SystemExit, match="line 4 was not written by medim generate"):
        generate("image", model_dir, out, "--prompts", prompts)


@pytest.mark.parametrize("out_kind", ["file", "read-only"])
def test_an_unusable_out_is_refused_before_the_model_loads(out_kind, prompts, tmp_path, monkeypatch):
    import os

    if out_kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    out = tmp_path / "o"
    if out_kind == "file":
        out.write_text("x")
    else:
        out.mkdir(mode=0o555)
    monkeypatch.setattr(MeDiMPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit, match="is not a folder" if out_kind == "file" else "is not writable"):
        generate("image", "medim-demo", out, "--prompts", prompts)


# ------------------------------------------------- resumes: inputs by contents, outputs checked


def test_resume_refuses_changed_input_contents_and_accepts_another_spelling(model_dir, tmp_path, monkeypatch):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b"):
        Image.effect_noise((64, 64), 60).save(images / f"{name}.png")
    out = tmp_path / "rep"
    monkeypatch.chdir(tmp_path)
    assert generate("report", model_dir, out, "--images", "imgs/*.png") == 0
    assert generate("report", model_dir, out, "--images", "./imgs/*.png") == 0  # the same files
    Image.effect_noise((64, 64), 10).save(images / "b.png")
    with pytest.raises(SystemExit, match=f"the input {re.escape(str((images / 'b.png').resolve()))} changed"):
        generate("report", model_dir, out, "--images", "imgs/*.png")


def test_missing_or_empty_outputs_of_a_finished_run_are_made_again(model_dir, prompts, tmp_path):
    out = tmp_path / "o"
    args = ("--prompts", prompts, "--num-per-prompt", 2)
    assert generate("pairs", model_dir, out, *args) == 0
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "000001.png").unlink()
    (out / "000002.txt").write_text("")
    assert generate("pairs", model_dir, out, *args) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole


def test_an_output_cut_short_since_it_was_written_is_made_again(model_dir, prompts, tmp_path):
    """Found by benchmarks/probe_reliability.py: a PNG cut to 40 bytes (a failed copy) passed as finished."""
    out = tmp_path / "o"
    args = ("--prompts", prompts, "--num-per-prompt", 2)
    assert generate("pairs", model_dir, out, *args) == 0
    whole = {p.name: p.read_bytes() for p in out.iterdir()}
    assert all(e["bytes"] == {e["image"]: len(whole[e["image"]]), e["report"]: len(whole[e["report"]])}
               for e in manifest(out))
    (out / "000003.png").write_bytes(whole["000003.png"][:40])
    assert generate("pairs", model_dir, out, *args) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == whole
