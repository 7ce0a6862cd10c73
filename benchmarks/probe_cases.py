"""The cases of benchmarks/probe_reliability.py, by group: each command with bad option values, bad or
garbage input files, output folders holding a user's files, tampered model folders, checkpoints
whose manifest points outside, training configs, and the Python API (every public pipeline task and
every SamplerConfig field) with wrong types and values. Built combinatorially where sensible."""

from __future__ import annotations

import functools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import RESULTS
from PIL import Image

__all__ = ["Case", "all_cases", "RESULTS"]

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    """One adversarial try. `setup(folder)` writes what the case needs in its own (current) folder
    and returns the action: a CLI argv (a list) or a callable. `expect`: "error" (must be refused),
    "ok" (must succeed) or "any". `names`: words a clean error contains (any one). `check(folder,
    result)`: after a success, a problem text when the result is wrong. `owned`: globs of files
    medim wrote (a previous run's outputs) that it may change. `process`: run as a real process."""

    group: str
    name: str
    setup: Callable[[Path], Any]
    expect: str = "error"
    names: tuple[str, ...] = ()
    check: Callable[[Path, Any], str | None] | None = None
    owned: tuple[str, ...] = ()
    process: bool = False


# ------------------------------------------------------------------------------------ inputs


def phantom(seed: int, size: int = 64) -> Image.Image:
    from medim.data.synthetic import make_pair

    return make_pair(seed, size=size)[0]


def inputs(folder: Path) -> None:
    """The valid inputs every case starts from: two prompts, two images (with their reports beside
    them), two masks, two reports."""
    (folder / "prompts.txt").write_text("A large dense nodule in the right upper zone.\nNo focal lesion.\n")
    (folder / "reports.txt").write_text("A large dense nodule in the right upper zone.\nNo focal lesion.\n")
    (folder / "imgs").mkdir()
    for i, report in enumerate(("A large dense nodule in the right upper zone.", "No focal lesion.")):
        phantom(i).save(folder / "imgs" / f"img{i}.png")
        (folder / "imgs" / f"img{i}.txt").write_text(report + "\n")  # a pair, for `medim cache --dataset folder`
        mask = np.zeros((64, 64), np.uint8)
        mask[:32, : 32 + i * 8] = 255
        Image.fromarray(mask).save(folder / f"mask{i}.png")
    (folder / "emptydir").mkdir()


def garbage(folder: Path) -> dict[str, str]:
    """Files that are not what their names say; name -> path (relative)."""
    (folder / "text.png").write_text("not an image at all\n")
    whole = (folder / "imgs" / "img0.png").read_bytes()
    (folder / "trunc.png").write_bytes(whole[: len(whole) // 2])
    (folder / "nopixels.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 40)
    (folder / "zero.png").write_bytes(b"")
    (folder / "latin1.txt").write_bytes("une l\xe9sion\n".encode("latin-1"))
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (folder / "blank.txt").write_text("\n\n  \n")
    (folder / "empty.txt").write_text("")
    return {"text.png": "text.png", "trunc.png": "trunc.png", "nopixels.dcm": "nopixels.dcm",
            "zero.png": "zero.png", "dir": "emptydir", "missing": "missing.png"}


def setup_cli(*argv: str, prepare: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    def setup(folder: Path) -> list[str]:
        inputs(folder)
        garbage(folder)
        if prepare is not None:
            prepare(folder)
        return [str(a) for a in argv]

    return setup


GEN_INPUTS = {
    "image": ["--prompts", "prompts.txt"],
    "pairs": ["--prompts", "prompts.txt"],
    "report": ["--images", "imgs/img0.png", "imgs/img1.png"],
    "inpaint": ["--images", "imgs/img0.png", "imgs/img1.png", "--masks", "mask0.png", "mask1.png"],
}


def gen(task: str, *extra: str, out: str = "out", inputs_: list[str] | None = None, steps: bool = True) -> list[str]:
    return ["generate", task, "--model", "medim-demo", "--out", out, *(["--steps", "2"] if steps else []),
            "--device", "cpu", *(GEN_INPUTS[task] if inputs_ is None else inputs_), *extra]


def skipped(path: str) -> Callable[[Path, Any], str | None]:
    """A `medim generate` run that went on without the unreadable input `path`: its manifest entry
    says why, and the other outputs are whole."""

    def check(folder: Path, result: Any) -> str | None:
        entries = [json.loads(line) for line in (folder / "out" / "manifest.jsonl").read_text().splitlines()[1:]]
        if not any(path in e.get("error", "") for e in entries):
            return f"{path} neither refused nor recorded as skipped"
        return whole_outputs(folder)

    return check


def whole_outputs(folder: Path, result: Any = None, out: str = "out") -> str | None:
    """A finished `medim generate` folder: every listed output exists and is whole."""
    lines = (folder / out / "manifest.jsonl").read_text().splitlines()
    for line in lines[1:]:
        entry = json.loads(line)
        for key in ("image", "report"):
            if entry.get(key):
                path = folder / out / entry[key]
                if not path.is_file() or path.stat().st_size == 0:
                    return f"{entry[key]} listed but missing or empty"
                if key == "image":
                    try:
                        with Image.open(path) as im:
                            im.load()
                    except OSError as e:
                        return f"{entry[key]} is not a whole image: {e}"
    return None


# ------------------------------------------------------------------------ command-line options

BAD_SAMPLER_OPTIONS = {
    "--steps": ["0", "-1", "x", "1.5", "nan", "100000"],
    "--guidance-scale": ["-1", "nan", "inf", "x"],
    "--strategy": ["greedy", ""],
    "--temperature": ["-1", "nan", "x", "inf"],
    "--top-k": ["0", "-1", "x", "1.5"],
    "--top-p": ["0", "1.5", "-0.1", "nan", "x"],
    "--cache-interval": ["0", "-1", "x"],
    "--order": ["random", ""],
    "--seed": ["-1", "18446744073709551616", "x", "1.5"],
    "--batch-size": ["0", "-1", "x"],
    "--device": ["tpu", "cuda:99", "xyz"],
    "--dtype": ["int8"],
    "--loader": ["x"],
    "--model": ["nonexistent-folder", "prompts.txt", "emptydir"],
    "--lora": ["nonexistent", "prompts.txt", "emptydir"],
}
FIELD = {"--steps": "num_inference_steps", "--guidance-scale": "guidance_scale", "--top-k": "top_k",
         "--top-p": "top_p", "--cache-interval": "cache_interval", "--batch-size": "batch_size",
         "--num-per-prompt": "num_per_prompt", "--image-size": "image_size", "--mask-dilation": "mask_dilation"}


def _names(option: str, value: str) -> tuple[str, ...]:
    names = (option, FIELD.get(option, option.lstrip("-").replace("-", "_")))
    return (*names, value) if option in ("--model", "--lora", "--device") and value else names


def generate_option_cases() -> Iterator[Case]:
    for task in GEN_INPUTS:
        for option, values in BAD_SAMPLER_OPTIONS.items():
            for value in values:
                argv = gen(task, option, value, steps=option != "--steps")
                yield Case("cli-generate-options", f"{task} {option} {value!r}", setup_cli(*argv),
                           names=_names(option, value))
    for task in ("image", "pairs"):
        for value in ("0", "-1", "x", "1.5"):
            yield Case("cli-generate-options", f"{task} --num-per-prompt {value!r}",
                       setup_cli(*gen(task, "--num-per-prompt", value)), names=_names("--num-per-prompt", value))
        for value in ("0", "-1", "x", "3", "100000", "64x"):
            yield Case("cli-generate-options", f"{task} --image-size {value!r}",
                       setup_cli(*gen(task, "--image-size", value)), names=_names("--image-size", value))
    for value in ("-1", "x", "1.5"):
        yield Case("cli-generate-options", f"inpaint --mask-dilation {value!r}",
                   setup_cli(*gen("inpaint", "--mask-dilation", value)), names=_names("--mask-dilation", value))
    yield Case("cli-generate-options", "image --prompt (report only)", setup_cli(*gen("image", "--prompt", "a")),
               names=("--prompt",))
    yield Case("cli-generate-options", "report with --prompts", setup_cli(*gen("report", "--prompts", "prompts.txt")),
               expect="any")
    yield Case("cli-generate-options", "image without --prompts", setup_cli(*gen("image", inputs_=[])),
               names=("--prompts",))
    yield Case("cli-generate-options", "inpaint without --masks", setup_cli(*gen("inpaint", inputs_=GEN_INPUTS[
        "report"])), names=("--masks",))


# ---------------------------------------------------------------------------------- input files


def generate_file_cases() -> Iterator[Case]:
    for name, path in {"missing": "missing.txt", "empty": "empty.txt", "blank lines": "blank.txt",
                       "latin-1": "latin1.txt", "binary": "binary.txt", "a folder": "emptydir",
                       "an image": "imgs/img0.png"}.items():
        for task in ("image", "pairs"):
            yield Case("cli-generate-files", f"{task} --prompts {name}", setup_cli(*gen(task, inputs_=[
                "--prompts", path])), names=(path, "--prompts"))
    for name, path in garbage(_scratch()).items():
        for task in ("report", "inpaint"):
            images = ["--images", path, "imgs/img1.png"]
            extra = ["--masks", "mask0.png", "mask1.png"] if task == "inpaint" else []
            # A batch job skips an unreadable image (a warning, and the reason in the manifest) when
            # it is one of many found files; a path that is not a file is refused.
            skips = name not in ("dir", "missing")
            yield Case("cli-generate-files", f"{task} --images {name}", setup_cli(*gen(task, inputs_=images + extra)),
                       names=(path, "--images"), expect="any" if skips else "error",
                       check=skipped(path) if skips else None)
        yield Case("cli-generate-files", f"inpaint --masks {name}", setup_cli(*gen("inpaint", inputs_=[
            "--images", "imgs/img0.png", "imgs/img1.png", "--masks", path, "mask1.png"])), names=(path, "--masks"))

    def masks(kind: str) -> Callable[[Path], None]:
        def prepare(folder: Path) -> None:
            if kind == "blank":
                Image.new("L", (64, 64), 0).save(folder / "mask0.png")
            elif kind == "transparent":
                Image.new("RGBA", (64, 64), (255, 255, 255, 0)).save(folder / "mask0.png")
            elif kind == "other size":
                Image.new("L", (32, 48), 255).save(folder / "mask0.png")

        return prepare

    for kind in ("blank", "transparent", "other size"):
        yield Case("cli-generate-files", f"inpaint mask {kind}", setup_cli(*gen("inpaint"), prepare=masks(kind)),
                   names=("mask0.png",))
    yield Case("cli-generate-files", "inpaint one mask for two images (documented: one for all)", setup_cli(
        *gen("inpaint", inputs_=["--images", "imgs/img0.png", "imgs/img1.png", "--masks", "mask0.png"])), expect="ok",
        check=whole_outputs)
    yield Case("cli-generate-files", "inpaint three masks for two images", setup_cli(*gen("inpaint", inputs_=[
        "--images", "imgs/img0.png", "imgs/img1.png", "--masks", "mask0.png", "mask1.png", "mask0.png"])),
        names=("--masks",))
    yield Case("cli-generate-files", "report of a 1x1 image", setup_cli(*gen("report", inputs_=[
        "--images", "one.png"]), prepare=lambda f: Image.new("RGB", (1, 1)).save(f / "one.png")), expect="any")
    yield Case("cli-generate-files", "report of a 16-bit PNG", setup_cli(*gen("report", inputs_=[
        "--images", "deep.png"]), prepare=lambda f: Image.fromarray(
            (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(f / "deep.png")), expect="ok")
    yield Case("cli-generate-files", "image from a 100k-character prompt", setup_cli(*gen("image"), prepare=lambda f: (
        f / "prompts.txt").write_text("nodule " * 15000 + "\n")), expect="ok")
    yield Case("cli-generate-files", "image from control-token text", setup_cli(*gen("image"), prepare=lambda f: (
        f / "prompts.txt").write_text("<pad> </s> <s> [MASK:3]\n")), expect="ok")


@functools.cache
def _scratch() -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="medim-probe-scratch-"))
    inputs(folder)
    return folder


# ------------------------------------------------------------------------------- output folders


def _previous_run(folder: Path, *argv: str) -> None:
    from medim.cli import main

    main(gen("image", *argv))


def output_cases() -> Iterator[Case]:
    def user_files(*names: str, text: str = "the user's own file\n") -> Callable[[Path], None]:
        def prepare(folder: Path) -> None:
            for name in names:
                (folder / "out" / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / "out" / name).write_text(text)

        return prepare

    yield Case("cli-generate-out", "out holds 000000.png and 000001.txt, no manifest",
               setup_cli(*gen("image"), prepare=user_files("000000.png", "000001.txt")), names=("out",))
    yield Case("cli-generate-out", "out/manifest.jsonl is the user's text",
               setup_cli(*gen("image"), prepare=user_files("manifest.jsonl", text="my list\n")), names=("manifest",))
    yield Case("cli-generate-out", "out/manifest.jsonl is JSON lines medim did not sign",
               setup_cli(*gen("image"), prepare=user_files("manifest.jsonl", text='{"index": 0, "image": "a.png"}\n')),
               names=("manifest",))
    yield Case("cli-generate-out", "out holds a notes folder", setup_cli(*gen("image"), prepare=user_files(
        "notes/todo.txt")), names=("out",))
    yield Case("cli-generate-out", "out is a file", setup_cli(*gen("image", out="prompts.txt")), names=("--out",
                                                                                                         "prompts.txt"))
    yield Case("cli-generate-out", "out under a file", setup_cli(*gen("image", out="prompts.txt/sub")),
               names=("--out", "prompts.txt"))
    yield Case("cli-generate-out", "out an empty folder", setup_cli(*gen("image"), prepare=lambda f: (
        f / "out").mkdir()), expect="ok", check=whole_outputs)
    for task in GEN_INPUTS:
        yield Case("cli-generate-out", f"{task}: a score manifest in out", setup_cli(
            *gen(task), prepare=user_files("manifest.jsonl", text='{"medim": "score", "image": "a", "report": "b"}\n')),
            names=("manifest",))

    def backups(folder: Path) -> None:
        _previous_run(folder)
        for name in (".manifest.jsonl.bak", ".000001.png.orig", ".manifest.rank3.jsonl.old", ".000000.png.tmp",
                     "000001.png~"):
            (folder / "out" / name).write_text("the user's backup\n")

    yield Case("cli-generate-out", "a finished run beside the user's backups", setup_cli(*gen("image"),
               prepare=backups), expect="ok", owned=("out/0*.png", "out/manifest.jsonl"), check=whole_outputs)

    def damaged(folder: Path) -> None:
        _previous_run(folder, "--num-per-prompt", "3")
        (folder / "out" / "000005.png").unlink()
        (folder / "out" / "000004.png").write_bytes(b"")
        whole = (folder / "out" / "000003.png").read_bytes()
        (folder / "out" / "000003.png").write_bytes(whole[:40])

    yield Case("cli-generate-out", "a finished run with a deleted, an empty and a cut output", setup_cli(
        *gen("image", "--num-per-prompt", "3"), prepare=damaged), expect="ok", owned=("out/*",), check=whole_outputs)

    def cut_manifest(folder: Path) -> None:
        _previous_run(folder)
        text = (folder / "out" / "manifest.jsonl").read_text()
        (folder / "out" / "manifest.jsonl").write_text(text[:-30])

    yield Case("cli-generate-out", "medim's manifest with a cut last line", setup_cli(*gen("image"),
               prepare=cut_manifest), expect="ok", owned=("out/*",), check=whole_outputs)

    def changed(what: str) -> Callable[[Path], None]:
        def prepare(folder: Path) -> None:
            from medim.cli import main

            main(gen("inpaint" if what == "mask" else "image", "--num-per-prompt", "1"))
            if what == "mask":
                Image.new("L", (64, 64), 255).save(folder / "mask1.png")
            else:
                (folder / "prompts.txt").write_text("No focal lesion.\nA large dense nodule.\n")

        return prepare

    yield Case("cli-generate-out", "resume after the masks' contents changed",
               setup_cli(*gen("inpaint"), prepare=changed("mask")), names=("mask1.png", "changed"), owned=("out/*",))
    yield Case("cli-generate-out", "resume after the prompts changed", setup_cli(*gen("image"), prepare=changed(
        "prompts")), names=("prompts", "changed"), owned=("out/*",))
    yield Case("cli-generate-out", "resume with ./imgs for imgs", setup_cli(*gen("report", inputs_=[
        "--images", "./imgs/img0.png", "./imgs/img1.png"]), prepare=lambda f: _run_report(f)), expect="ok",
        owned=("out/*",), check=whole_outputs)
    yield Case("cli-generate-out", "resume with other settings", setup_cli(*gen("image", "--guidance-scale", "2"),
               prepare=lambda f: _previous_run(f)), names=("guidance",), owned=("out/*",))
    yield Case("score-out", "score --out is the user's file", setup_cli(*score_argv(), prepare=lambda f: (
        f / "scores.jsonl").write_text("my scores\n")), expect="any", names=("scores.jsonl",))
    yield Case("score-out", "score --out is a folder", setup_cli(*score_argv(out="emptydir")), names=("emptydir",
                                                                                                    "--out"))
    for target in ("report.json", "emptydir"):
        yield Case("evaluate-out", f"evaluate reports --output {target} (the user's)", setup_cli(
            "evaluate", "reports", "--pred", "preds", "--ref", "preds", "--wordnet", "none", "--output", target,
            prepare=_reports_and_user_json), expect="any", names=(target, "--output"))
    yield Case("demo-out", "demo --out holding the user's files", setup_cli(
        "demo", "--out", "out", "--steps", "2", prepare=user_files("examples.md", "000000.png")), expect="any",
        names=("--out", "out"))
    yield Case("convert-out", "convert vqgan --out holding the user's files", setup_cli(
        "convert", "vqgan", "--ckpt", "vq.ckpt", "--out", "out", prepare=_vq_ckpt_and(user_files("config.json"))),
        names=("--out", "out"))
    yield Case("cache-out", "cache --out holding the user's files", setup_cli(
        "cache", "--dataset", "folder", "--data-root", "imgs", "--model", "medim-demo", "--out", "out",
        "--device", "cpu", prepare=user_files("index.json", "notes.txt")), expect="any", names=("--out", "out"))


def overwrite_cases(shared: Path) -> Iterator[Case]:
    """Commands and methods told to overwrite (--overwrite, overwrite=True): they replace what they
    wrote, never a user's files in the same folder."""
    def user_and(prepare: Callable[[Path], None] | None, where: str) -> Callable[[Path], None]:
        def both(folder: Path) -> None:
            if prepare is not None:
                prepare(folder)
            (folder / where).mkdir(parents=True, exist_ok=True)
            (folder / where / "notes.txt").write_text("the user's own notes\n")

        return both

    cache = ("cache", "--dataset", "folder", "--data-root", "imgs", "--model", "medim-demo", "--device", "cpu",
             "--out", "out")
    yield Case("overwrite", "cache --overwrite of a folder holding the user's notes", setup_cli(
        *cache, "--overwrite", prepare=user_and(None, "out")), expect="any", names=("out",))
    yield Case("overwrite", "cache --overwrite of a cache beside the user's notes", setup_cli(
        *cache, "--overwrite", prepare=user_and(lambda f: _cli(*cache), "out")), expect="any", names=("out",),
        owned=("out/*.json", "out/*.safetensors", "out/*.bin", "out/shard*"))
    yield Case("overwrite", "demo --overwrite of a folder holding the user's notes", setup_cli(
        "demo", "--out", "out", "--steps", "2", "--overwrite", prepare=user_and(None, "out")), expect="any",
        names=("out",))
    yield Case("overwrite", "convert vqgan --overwrite of a folder holding the user's notes", setup_cli(
        "convert", "vqgan", "--ckpt", "vq.ckpt", "--out", "out", "--overwrite", prepare=_vq_ckpt_and(
            user_and(None, "out"))), expect="any", names=("out", "vq.ckpt"))

    def lora_save(folder: Path) -> Callable[[], Any]:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "notes.txt").write_text("the user's own notes\n")
        return lambda: _lora_pipe(shared).save_lora_weights(folder / "adapter", overwrite=True)

    yield Case("overwrite", "save_lora_weights(overwrite=True) into a folder holding the user's notes", lora_save,
               expect="any", names=("adapter",))

    def cache_changed(folder: Path) -> None:
        _cli(*cache)
        phantom(5).save(folder / "imgs" / "img0.png")

    yield Case("resume", "cache resumed after an image's contents changed", setup_cli(*cache, prepare=cache_changed),
               names=("dataset_fingerprint",), owned=("out/*",))

    def lora_linked(part: str) -> Callable[[Path], Callable[[], Any]]:
        def setup(folder: Path) -> Callable[[], Any]:
            shutil.copytree(_tiny_adapter(shared), folder / "adapter")
            _link_out(part)(folder / "adapter")
            base = _tiny_base(shared)
            return lambda: base.load_lora_weights(folder / "adapter")

        return setup

    for part in ("adapter_config.json", "adapter_model.safetensors"):
        yield Case("lora-folder", f"{part} linked outside", lora_linked(part), names=(part, "outside"))


@functools.cache
def _tiny_adapter(shared: Path) -> Path:
    """A LoRA adapter of the tiny model, trained for 2 steps (once): its final/ folder."""
    base, cache = tiny_run_paths(shared)
    _cli("train", "--config", str(REPO / "configs/tiny.yaml"), f"model.init={base}", f"data.cache={cache}",
         f"train.output_dir={shared / 'lora'}", "train.max_steps=2", "eval.every=0", "checkpoint.every=0",
         "lora.r=2", "lora.alpha=4")
    return shared / "lora" / "final"


def _tiny_base(shared: Path):
    from medim import MeDiMPipeline

    return MeDiMPipeline.from_pretrained(tiny_run_paths(shared)[0])


def _lora_pipe(shared: Path):
    return _tiny_base(shared).load_lora_weights(_tiny_adapter(shared))


def _cli(*argv: str) -> None:
    from medim.cli import main

    main(list(argv))


def _run_report(folder: Path) -> None:
    from medim.cli import main

    main(gen("report"))


def _reports_and_user_json(folder: Path) -> None:
    (folder / "preds").mkdir()
    (folder / "preds" / "a.txt").write_text("no focal lesion")
    (folder / "report.json").write_text('{"my": "own results"}\n')


def _vq_ckpt_and(prepare: Callable[[Path], None]) -> Callable[[Path], None]:
    def both(folder: Path) -> None:
        (folder / "vq.ckpt").write_bytes(b"\0garbage" * 10)
        prepare(folder)

    return both


def score_argv(*extra: str, out: str = "scores.jsonl", images: tuple[str, ...] = ("imgs/img0.png", "imgs/img1.png"),
               reports: str = "reports.txt", samples: bool = True) -> list[str]:
    return ["score", "--model", "medim-demo", "--images", *images, "--reports", reports, "--out", out,
            *(["--num-samples", "2"] if samples else []), "--device", "cpu", *extra]


def score_cases() -> Iterator[Case]:
    for option, values in {"--num-samples": ["0", "-1", "x", "1000000000"], "--seed": ["-1", "18446744073709551616",
                           "x"], "--batch-size": ["0", "-1", "x"], "--direction": ["x"]}.items():
        for value in values:
            argv = score_argv(option, value, samples=option != "--num-samples")
            yield Case("cli-score", f"{option} {value!r}", setup_cli(*argv), names=(option, option.strip("-").replace(
                "-", "_")))
    for name, path in garbage(_scratch()).items():
        yield Case("cli-score", f"--images {name}", setup_cli(*score_argv(images=(path, "imgs/img1.png"))),
                   names=(path, "--images"))
    for name, path in {"missing": "missing.txt", "empty": "empty.txt", "latin-1": "latin1.txt", "a folder": "emptydir",
                       "blank": "blank.txt"}.items():
        yield Case("cli-score", f"--reports {name}", setup_cli(*score_argv(reports=path)), names=(path, "--reports"))
    yield Case("cli-score", "3 reports for 2 images", setup_cli(*score_argv(), prepare=lambda f: (
        f / "reports.txt").write_text("a\nb\nc\n")), names=("report", "image"))
    yield Case("cli-score", "valid pairs", setup_cli(*score_argv()), expect="ok")
    yield Case("cli-score", "valid --rank", setup_cli(*score_argv("--rank")), expect="ok")


# ------------------------------------------------------------------------------------ evaluate


def _image_folder(folder: Path, n: int = 3, bad: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        phantom(i, 32).save(folder / f"{i}.png")
    if bad:
        (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:30])


def evaluate_cases() -> Iterator[Case]:
    def folders(folder: Path) -> None:
        _image_folder(folder / "real")
        _image_folder(folder / "fake")
        _image_folder(folder / "badfake", bad=True)
        (folder / "preds").mkdir()
        (folder / "preds" / "a.txt").write_text("no focal lesion")
        (folder / "bad").mkdir()
        (folder / "bad" / "a.txt").write_bytes("une l\xe9sion".encode("latin-1"))
        (folder / "garbage.pth").write_bytes(b"\0garbage" * 10)
        (folder / "garbage.safetensors").write_bytes(b"\0garbage" * 10)
        (folder / "m.jsonl").write_text('{"id": "a", "report": "x"}\nnot json\n')
        import torch

        torch.save([torch.zeros(1)], folder / "list.pth")
        torch.save({}, folder / "empty.pth")

    def ev(*argv: str) -> Callable[[Path], list[str]]:
        return setup_cli("evaluate", *argv, prepare=folders)

    rep = ("reports", "--wordnet", "none")
    for name, path in {"missing": "nope", "empty folder": "emptydir", "latin-1": "bad", "bad manifest": "m.jsonl",
                       "a file": "prompts.txt"}.items():
        yield Case("cli-evaluate", f"reports --pred {name}", ev(*rep, "--pred", path, "--ref", "preds"), names=(path,))
    for option, value in (("--metrics", "x"), ("--metrics", ""), ("--protocol", "x")):
        yield Case("cli-evaluate", f"reports {option} {value!r}", ev(*rep, "--pred", "preds", "--ref", "preds",
                                                                      option, value), names=(option.strip("-"),))
    yield Case("cli-evaluate", "reports valid", ev(*rep, "--pred", "preds", "--ref", "preds"), expect="ok")
    fid = ("fid", "--real", "real", "--device", "cpu")
    for weights in ("missing.pth", "garbage.pth", "list.pth", "garbage.safetensors", "prompts.txt", "emptydir"):
        yield Case("cli-evaluate", f"fid --weights {weights}", ev(*fid, "--fake", "fake", "--weights", weights),
                   names=(weights, "--weights"))
    for fake in ("nope", "emptydir", "badfake", "prompts.txt"):
        yield Case("cli-evaluate", f"fid --fake {fake}", ev(*fid, "--fake", fake, "--weights", "empty.pth"),
                   names=(fake, "weights"))  # the weights are read first: these are not FID weights
    for option, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--batch-size", "x"),
                          ("--features", "x"), ("--device", "tpu")):
        yield Case("cli-evaluate", f"fid {option} {value}", ev("fid", "--real", "real", "--fake", "fake", "--weights",
                                                               "empty.pth", option, value), names=(option, value))
    for images in ("nope", "emptydir", "badfake", "prompts.txt"):
        yield Case("cli-evaluate", f"diversity --images {images}", ev("diversity", "--images", images), names=(images,))
    for option, value in (("--size", "0"), ("--size", "100"), ("--size", "x"), ("--max-pairs", "0"),
                          ("--max-pairs", "-1"), ("--seed", "-1"), ("--seed", "x")):
        yield Case("cli-evaluate", f"diversity {option} {value}", ev("diversity", "--images", "real", option, value),
                   names=(option, option.strip("-").replace("-", "_")))
    for images in ("nope", "emptydir"):
        yield Case("cli-evaluate", f"is --images {images}", ev("is", "--images", images, "--weights", "empty.pth"),
                   names=(images,))
    for weights in ("missing.pth", "garbage.pth", "list.pth"):
        yield Case("cli-evaluate", f"is --weights {weights}", ev("is", "--images", "real", "--weights", weights,
                                                                 "--splits", "3", "--device", "cpu"), names=(weights,))
    for option, value in (("--splits", "0"), ("--splits", "-1"), ("--splits", "x"), ("--splits", "1000"),
                          ("--batch-size", "0")):
        yield Case("cli-evaluate", f"is {option} {value}", ev("is", "--images", "real", "--weights", "empty.pth",
                                                              option, value), names=(option, option.strip("-").replace(
                                                                  "-", "_")))


# ------------------------------------------------------------------------- other commands


def other_command_cases() -> Iterator[Case]:
    cache = ("cache", "--dataset", "folder", "--data-root", "imgs", "--model", "medim-demo", "--device", "cpu")
    for option, value in (("--dataset", "x"), ("--data-root", "nope"), ("--data-root", "prompts.txt"),
                          ("--shard-size", "0"), ("--shard-size", "-1"), ("--shard-size", "x"), ("--batch-size", "0"),
                          ("--batch-size", "x"), ("--resize", "x"), ("--model", "nope"), ("--dataset-args", "{x"),
                          ("--dataset-args", "[1]"), ("--out", "prompts.txt"), ("--layout", "nope.json")):
        argv = [*cache, "--out", "cache", option, value] if option != "--out" else [*cache, option, value]
        yield Case("cli-cache", f"{option} {value!r}", setup_cli(*argv), names=(option, option.strip("-").replace(
            "-", "_"), value))
    for option, value in (("--ckpt", "missing.ckpt"), ("--ckpt", "prompts.txt"), ("--ckpt", "emptydir"),
                          ("--config", "prompts.txt"), ("--dtype", "int8")):
        argv = ["convert", "vqgan", "--ckpt", "vq.ckpt", "--out", "vq", option, value]
        yield Case("cli-convert", f"vqgan {option} {value!r}", setup_cli(*argv, prepare=_vq_ckpt_and(lambda f: None)),
                   names=(option, value))
    yield Case("cli-convert", "original of a missing folder", setup_cli("convert", "original", "--help"),
               expect="any")
    for option, value in (("--steps", "0"), ("--steps", "x"), ("--n", "0"), ("--n", "-1"), ("--seed", "x"),
                          ("--out", "prompts.txt"), ("--model", "nope")):
        yield Case("cli-demo", f"{option} {value!r}", setup_cli("demo", "--steps", "2", option, value),
                   names=(option, option.strip("-"), value))
    for value in ("0", "-1", "70000", "x"):
        yield Case("cli-app", f"--port {value!r}", setup_cli("app", "--port", value), names=("--port",))


# ---------------------------------------------------------------------------------- training


TRAIN_BAD = {
    "optim.lr": ["nan", "-1", "0", "x", "null", "inf"],
    "optim.eps": ["0", "-1", "nan"],
    "optim.weight_decay": ["-1", "nan", "x"],
    "optim.grad_clip": ["-1", "nan", "x"],
    "optim.warmup_steps": ["-1", "1.5", "x"],
    "optim.num_cycles": ["0", "-1"],
    "optim.betas": ["[0.9]", "[2, 0.9]", "x", "[nan, 0.9]"],
    "optim.scheduler": ["x", "1"],
    "optim.ema_decay": ["1.5", "-0.1", "nan", "x"],
    "data.val_size": ["-1", "x"],
    "data.shuffle": ["maybe"],
    "diffusion.schedule": ["x", "1"],
    "diffusion.keep_prefix_prob": ["-0.1", "1.5", "nan"],
    "diffusion.cond_drop_prob": ["-0.1", "1.5"],
    "diffusion.cond_keep_prob": ["-0.1", "1.5"],
    "train.max_steps": ["0", "-1", "1.5", "x"],
    "train.global_batch_size": ["0", "-1", "x"],
    "train.micro_batch_size": ["0", "-1", "x"],
    "train.seed": ["x", "1.5"],
    "train.precision": ["x", "fp8"],
    "train.parallel": ["x"],
    "train.device": ["tpu", "cuda:99"],
    "train.max_bad_steps": ["0", "-1", "1.5", "x", "null"],
    "train.compile": ["maybe"],
    "log.every": ["0", "-1", "x"],
    "eval.every": ["-1", "x"],
    "eval.num_inference_steps": ["0", "x"],
    "eval.prompts": ["[[1]]", "3"],
    "checkpoint.every": ["-1", "x"],
    "checkpoint.keep_last": ["-1", "x"],
    "checkpoint.allow_changed": ["x", "[[1]]", "[optim.lrr]"],
    "lora.r": ["-1", "x", "1.5"],
    "lora.alpha": ["0", "-1", "nan"],
    "lora.dropout": ["1", "-0.1", "x"],
    "lora.target_modules": ["3"],
    "optim.lrr": ["1"],
    "nosuch.key": ["1"],
    "train": ["1"],
}


def train_cases(shared: Path) -> Iterator[Case]:
    base = ("train", "model.init=model", "data.cache=cache", "train.output_dir=run")
    for key, values in TRAIN_BAD.items():
        for value in values:
            yield Case("cli-train-config", f"{key}={value}", train_setup(shared, f"{key}={value}"),
                       names=(key, key.split(".")[0]))
    for name, text in {"missing": None, "not YAML": "a: [1\n", "a list": "- 1\n", "latin-1": None,
                       "unknown section": "nosuch: {a: 1}\n"}.items():
        def prepare(folder: Path, text=text, name=name) -> None:
            if name == "latin-1":
                (folder / "c.yaml").write_bytes("optim: {lr: 1}\n# l\xe9sion\n".encode("latin-1"))
            elif text is not None:
                (folder / "c.yaml").write_text(text)

        yield Case("cli-train-config", f"--config {name}", setup_cli("train", "--config", "c.yaml", *base[1:],
                                                                      prepare=prepare), names=("c.yaml", "config"))
    for value in ("/etc", "nope", "prompts.txt"):
        yield Case("cli-train-config", f"checkpoint.resume={value}", train_setup(shared, f"checkpoint.resume={value}"),
                   names=("resume", value))
    yield from train_run_cases(shared)


def tiny_run_paths(shared: Path) -> tuple[Path, Path]:
    from tests.helpers.training import tiny_run

    shared.mkdir(parents=True, exist_ok=True)
    return tiny_run(shared)


def train_setup(shared: Path, *extra: str, prepare: Callable[[Path], None] | None = None
                ) -> Callable[[Path], list[str]]:
    """A 2-step run of the tiny model on its tiny cache (built once in `shared`), into run/."""
    def setup(folder: Path) -> list[str]:
        base, cache = tiny_run_paths(shared)
        inputs(folder)
        (folder / "run").mkdir()
        if prepare is not None:
            prepare(folder)
        return ["train", "--config", str(REPO / "configs/tiny.yaml"), f"model.init={base}", f"data.cache={cache}",
                "train.output_dir=run", "train.max_steps=2", "eval.every=0", "checkpoint.every=0",
                "log.every=1", *extra]

    return setup


def train_run_cases(shared: Path) -> Iterator[Case]:
    def run(*extra: str, prepare: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
        return train_setup(shared, *extra, prepare=prepare)

    def user(name: str, text: str = "the user's own notes\n") -> Callable[[Path], None]:
        def prepare(folder: Path) -> None:
            (folder / "run" / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / "run" / name).write_text(text)

        return prepare

    yield Case("cli-train-run", "output_dir holding the user's log.jsonl", run(prepare=user("log.jsonl", "my log\n")),
               expect="error", names=("log.jsonl", "output_dir"))
    yield Case("cli-train-run", "output_dir holding the user's final/README.md", run(prepare=user("final/README.md")),
               expect="error", names=("final", "output_dir"))
    yield Case("cli-train-run", "output_dir holding the user's checkpoints/notes.txt", run(prepare=user(
        "checkpoints/notes.txt")), expect="error", names=("checkpoints", "output_dir"))
    yield Case("cli-train-run", "a valid tiny run", run(), expect="ok")

    def escaping(folder: Path) -> None:
        import torch

        from medim.training import checkpoint as ckpt

        model = torch.nn.Linear(3, 2)
        path = ckpt.save_checkpoint(folder / "run" / "checkpoints", 1, model_state=model.state_dict(),
                                    optim_state={"state": {}, "param_groups": []}, trainer_state={"step": 1},
                                    rng_states=[ckpt.capture_rng()], config_yaml="a: 1\n")
        _escape_manifest(path, folder)

    yield Case("cli-train-run", "resume from a checkpoint whose manifest lists ../../outside/secret.txt",
               run("checkpoint.resume=latest", prepare=escaping), names=("checkpoint", "manifest", "secret"))


# --------------------------------------------------------------------------- model folders


@functools.cache
def demo_path() -> Path:
    from medim.utils.hub import bundled_model_path

    return Path(bundled_model_path("medim-demo"))


def _index_edit(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def tamper(model: Path) -> None:
        index = json.loads((model / "model_index.json").read_text())
        edit(index)
        (model / "model_index.json").write_text(json.dumps(index))

    return tamper


def _link_out(part: str) -> Callable[[Path], None]:
    """Replace `part` of the model folder by a link to a copy of it in the case's outside/."""

    def tamper(model: Path) -> None:
        outside = model.parent / "outside" / "other"
        outside.parent.mkdir(exist_ok=True)
        src = model / part
        target = outside / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target)
            shutil.rmtree(src)
        else:
            shutil.copy(src, target)
            src.unlink()
        src.symlink_to(target, target_is_directory=target.is_dir())

    return tamper


def _write(part: str, data: bytes | str) -> Callable[[Path], None]:
    def tamper(model: Path) -> None:
        path = model / part
        path.unlink() if path.exists() else None
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)

    return tamper


def _remove(part: str) -> Callable[[Path], None]:
    def tamper(model: Path) -> None:
        path = model / part
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return tamper


def _secret_json(part: str) -> Callable[[Path], None]:
    def tamper(model: Path) -> None:
        secret = model.parent / "outside" / "secret.json"
        secret.write_text(json.dumps({"private_key_name": 1}))
        (model / part).unlink()
        (model / part).symlink_to(secret)

    return tamper


def _sampler(**values: Any) -> Callable[[Path], None]:
    return _index_edit(lambda index: index["sampler"].update(values))


def _layout(**values: Any) -> Callable[[Path], None]:
    return _index_edit(lambda index: index["layout"].update(values))


def _cut(part: str, keep: int) -> Callable[[Path], None]:
    def tamper(model: Path) -> None:
        data = (model / part).read_bytes()
        (model / part).write_bytes(data[:keep])

    return tamper


def _model_config(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def tamper(model: Path) -> None:
        config = json.loads((model / "model" / "config.json").read_text())
        edit(config)
        (model / "model" / "config.json").write_text(json.dumps(config))

    return tamper


TAMPERS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "model/ linked outside": (_link_out("model"), ("model",)),
    "vqgan/ linked outside": (_link_out("vqgan"), ("vqgan",)),
    "tokenizer/ linked outside": (_link_out("tokenizer"), ("tokenizer",)),
    "model.safetensors linked outside": (_link_out("model/model.safetensors"), ("model.safetensors",)),
    "model_index.json linked outside": (_link_out("model_index.json"), ("model_index.json",)),
    "vqgan/config.json linked to an outside JSON": (_secret_json("vqgan/config.json"), ("vqgan/config.json",)),
    "tokenizer_config.json linked to an outside JSON": (_secret_json("tokenizer/tokenizer_config.json"),
                                                        ("tokenizer_config.json",)),
    "schedule eps 5.0": (_sampler(noise_schedule={"name": "loglinear", "eps": 5.0}), ("eps",)),
    "schedule eps NaN": (_sampler(noise_schedule={"name": "loglinear", "eps": math.nan}), ("eps",)),
    "schedule eps -1": (_sampler(noise_schedule={"name": "cosine", "eps": -1}), ("eps",)),
    "schedule eps 'x'": (_sampler(noise_schedule={"name": "loglinear", "eps": "x"}), ("eps",)),
    "schedule unknown key": (_sampler(noise_schedule={"name": "loglinear", "rate": 1}), ("rate",)),
    "schedule unknown name": (_sampler(noise_schedule="nope"), ("nope", "noise_schedule")),
    "sampler steps 0": (_sampler(num_inference_steps=0), ("num_inference_steps",)),
    "sampler steps 'x'": (_sampler(num_inference_steps="x"), ("num_inference_steps",)),
    "sampler unknown option": (_sampler(foo=1), ("foo",)),
    "sampler temperature NaN": (_sampler(temperature=math.nan), ("temperature",)),
    "sampler a list": (_index_edit(lambda i: i.update(sampler=[1])), ("sampler",)),
    "layout mask_id out of range": (_layout(mask_id=99999), ("mask_id",)),
    "layout text_len 0": (_layout(text_len=0), ("text_len",)),
    "layout text_len -5": (_layout(text_len=-5), ("text_len",)),
    "layout name unknown": (_layout(name="x"), ("layout", "x")),
    "layout image_len not a square": (_layout(image_len=63), ("image_len",)),
    "_class_name another class": (_index_edit(lambda i: i.update(_class_name="OtherPipeline")), ("OtherPipeline",)),
    "model part names os.system": (_index_edit(lambda i: i.update(model=["os", "system"])), ("model",)),
    "model part names an unknown class": (_index_edit(lambda i: i.update(model=["medim", "Nope"])), ("model", "Nope")),
    "model_index.json not JSON": (_write("model_index.json", "{not json"), ("model_index.json",)),
    "model_index.json latin-1": (_write("model_index.json", b'{"a": "l\xe9sion"}'), ("model_index.json",)),
    "model_index.json a list": (_write("model_index.json", "[1, 2]"), ("model_index.json",)),
    "model_index.json empty": (_write("model_index.json", ""), ("model_index.json",)),
    "model_index.json missing": (_remove("model_index.json"), ("model_index.json",)),
    "model/config.json not JSON": (_write("model/config.json", "{oops"), ("config.json",)),
    "model/config.json auto_map to code": (_model_config(lambda c: c.update(auto_map={
        "AutoModel": "evil.Model"})), ()),
    "model/config.json num_hidden_layers -1": (_model_config(lambda c: c["backbone_config"].update(
        num_hidden_layers=-1)), ("num_hidden_layers", "config.json")),
    "model/config.json 2 layers of 4": (_model_config(lambda c: c["backbone_config"].update(
        num_hidden_layers=2)), ("layers", "config.json")),
    "model.safetensors cut": (_cut("model/model.safetensors", 5000), ("model.safetensors",)),
    "model.safetensors empty": (_write("model/model.safetensors", b""), ("model.safetensors",)),
    "model.safetensors missing": (_remove("model/model.safetensors"), ("model.safetensors", "model")),
    "vqgan/model.safetensors garbage": (_write("vqgan/model.safetensors", b"\0garbage" * 100), ("vqgan",)),
    "vqgan/config.json unknown key": (lambda m: _json_edit(m / "vqgan/config.json", nosuch=1), ("nosuch", "vqgan")),
    "vqgan/config.json negative size": (lambda m: _json_edit(m / "vqgan/config.json", resolution=-64),
                                        ("resolution", "vqgan")),
    "tokenizer/ missing": (_remove("tokenizer"), ("tokenizer",)),
    "tokenizer.json garbage": (_write("tokenizer/tokenizer.json", "{oops"), ("tokenizer",)),
}


def _json_edit(path: Path, **values: Any) -> None:
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data))


def model_folder_cases() -> Iterator[Case]:
    for name, (tamper, names) in TAMPERS.items():
        def setup_api(folder: Path, tamper=tamper) -> Callable[[], Any]:
            shutil.copytree(demo_path(), folder / "model")
            tamper(folder / "model")
            return lambda: _load_and_score(folder / "model")

        def setup_cli_(folder: Path, tamper=tamper) -> list[str]:
            inputs(folder)
            shutil.copytree(demo_path(), folder / "model")
            tamper(folder / "model")
            return ["generate", "image", "--model", "model", "--prompts", "prompts.txt", "--out", "out", "--steps", "2",
                    "--device", "cpu"]

        expect = "any" if name == "model/config.json auto_map to code" else "error"
        yield Case("model-folder-api", name, setup_api, expect=expect, names=names)
        yield Case("model-folder-cli", name, setup_cli_, expect=expect, names=names)


def _load_and_score(folder: Path) -> Any:
    from medim import MeDiMPipeline

    pipe = MeDiMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.score([phantom(0)], ["No focal lesion."], num_samples=2).scores


# ------------------------------------------------------------------------------- checkpoints


def _escape_manifest(path: Path, folder: Path, how: str = "relative") -> None:
    import hashlib

    secret = folder / "outside" / "secret.txt"
    data = secret.read_bytes()
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = json.loads((path / "manifest.json").read_text())
    if how == "relative":
        rel = Path(*[".."] * len(path.relative_to(folder).parts)) / "outside" / "secret.txt"
        manifest["files"][str(rel)] = entry
    elif how == "absolute":
        manifest["files"][str(secret)] = entry
    elif how == "link":
        (path / "config.yaml").unlink()
        (path / "config.yaml").symlink_to(secret)
        manifest["files"]["config.yaml"] = entry
    elif how == "list":
        manifest["files"] = list(manifest["files"])
    elif how == "bad entry":
        manifest["files"]["config.yaml"] = {"bytes": "5", "sha256": 3}
    elif how == "no files":
        manifest.pop("files")
    (path / "manifest.json").write_text(json.dumps(manifest))


def checkpoint_cases() -> Iterator[Case]:
    for how in ("relative", "absolute", "link", "list", "bad entry", "no files", "not JSON", "missing"):
        for call in ("verify_checkpoint", "load_checkpoint"):
            def setup(folder: Path, how=how, call=call) -> Callable[[], Any]:
                import torch

                from medim.training import checkpoint as ckpt

                model = torch.nn.Linear(3, 2)
                path = ckpt.save_checkpoint(folder / "run" / "checkpoints", 1, model_state=model.state_dict(),
                                            optim_state={"state": {}, "param_groups": []}, trainer_state={"step": 1},
                                            rng_states=[ckpt.capture_rng()], config_yaml="a: 1\n")
                if how == "not JSON":
                    (path / "manifest.json").write_text("{oops")
                elif how == "missing":
                    (path / "manifest.json").unlink()
                else:
                    _escape_manifest(path, folder, how)
                return lambda: getattr(ckpt, call)(path)

            yield Case("checkpoint", f"{call}: manifest {how}", setup, names=("manifest", "config.yaml", "files",
                                                                                "checkpoint"))


# ---------------------------------------------------------------------------------- the API


@functools.cache
def demo_pipe():
    from medim import MeDiMPipeline

    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAST = {"num_inference_steps": 2}
SAMPLER_BAD: dict[str, list[Any]] = {
    "num_inference_steps": [0, -1, 1.5, "4", True, math.nan, 10**9],
    "strategy": ["greedy", None, 3],
    "schedule": ["x", None],
    "noise_schedule": ["x", {"name": "loglinear", "eps": 5.0}, {"name": "loglinear", "rate": 1}, 3],
    "confidence_temperature": [-1, math.nan, "x"],
    "threshold": [-0.1, 1.5, math.nan],
    "min_per_step": [0, -1, "x", 1.5],
    "guidance_scale": [-1, math.nan, math.inf, "x"],
    "guidance_schedule": ["x", None],
    "temperature": [-1, math.nan, "x"],
    "top_k": [0, -1, 1.5, "x"],
    "top_p": [0, 1.5, math.nan, "x"],
    "time_eps": [0, 1, -1, math.nan],
    "order": ["x", None],
    "cache_interval": [0, -1, "x", 1.5],
}


def sampler_cases() -> Iterator[Case]:
    for name, values in SAMPLER_BAD.items():
        for value in values:
            def config(folder: Path, name=name, value=value) -> Callable[[], Any]:
                from medim.diffusion import SamplerConfig

                return lambda: SamplerConfig(**{name: value})

            def call(folder: Path, name=name, value=value) -> Callable[[], Any]:
                options = {**FAST, name: value}
                return lambda: demo_pipe().text_to_image(["No focal lesion."], **options)

            def assign(folder: Path, name=name, value=value) -> Callable[[], Any]:
                def run() -> Any:
                    pipe = demo_pipe()
                    saved = pipe.sampler_config
                    try:
                        pipe.sampler_config = {name: value}
                        return pipe.text_to_image(["No focal lesion."], num_inference_steps=2)
                    finally:
                        pipe.sampler_config = saved

                return run

            for how, setup in (("SamplerConfig", config), ("text_to_image", call), ("sampler_config =", assign)):
                yield Case("api-sampler", f"{how} {name}={value!r}", setup, names=(name,))


def _api(call: Callable[[Any], Any]) -> Callable[[Path], Callable[[], Any]]:
    def setup(folder: Path) -> Callable[[], Any]:
        inputs(folder)
        garbage(folder)
        return lambda: call(demo_pipe())

    return setup


def api_cases() -> Iterator[Case]:
    im = [phantom(0)]
    mask = np.zeros((64, 64), bool)
    mask[:20, :20] = True
    prompts_bad = {"a string": ("No focal lesion.", "prompts"), "[1]": ([1], "prompts"), "[None]": ([None], "prompts"),
                   "[]": ([], "prompts"), "None": (None, "prompts"), "a set": ({"a"}, "prompts")}
    for label, (value, name) in prompts_bad.items():
        yield Case("api-tasks", f"text_to_image(prompts={label})", _api(lambda p, v=value: p.text_to_image(v, **FAST)),
                   names=(name,))
        yield Case("api-tasks", f"generate_pairs(prompts={label})", _api(lambda p, v=value: p.generate_pairs(
            v, **FAST)), names=(name,), expect="any" if label == "[]" else "error")
    images_bad = {"None": None, "[]": [], "[None]": [None], "'missing.png'": "missing.png", "'text.png'": "text.png",
                  "'trunc.png'": "trunc.png", "'nopixels.dcm'": "nopixels.dcm", "3": 3, "array (5,)": np.zeros(5),
                  "array NaN": np.full((8, 8), np.nan), "array (8, 8, 2)": np.zeros((8, 8, 2), np.uint8),
                  "0x0 image": Image.new("RGB", (0, 0)), "a folder": "emptydir"}
    for label, value in images_bad.items():
        yield Case("api-tasks", f"image_to_report(images={label})", _api(lambda p, v=value: p.image_to_report(
            v, **FAST)), names=("image", str(value)[:20]))
        yield Case("api-tasks", f"inpaint(images={label})", _api(lambda p, v=value: p.inpaint(
            v, [mask], ["a"], **FAST)), names=("image", str(value)[:20]))
        yield Case("api-tasks", f"score(images={label})", _api(lambda p, v=value: p.score(
            v, ["a"], num_samples=2)), names=("image", str(value)[:20]))
    for label, value in {"3": 3, "None": None, "'a'": "a", "[]": []}.items():
        yield Case("api-tasks", f"image_to_report(prompt={label})", _api(lambda p, v=value: p.image_to_report(
            im, prompt=v, **FAST)), names=("prompt",), expect="any" if value is None or value == "a" else "error")
    yield Case("api-tasks", "image_to_report 2 prompts for 1 image", _api(lambda p: p.image_to_report(
        im, prompt=["a", "b"], **FAST)), names=("prompt",))
    masks_bad = {"None": None, "[]": [], "two masks": [mask, mask], "other size": [np.ones((8, 8), bool)],
                 "empty": [np.zeros((64, 64), bool)], "'missing.png'": ["missing.png"], "'text.png'": ["text.png"],
                 "3": [3], "transparent RGBA": [Image.new("RGBA", (64, 64), (255, 255, 255, 0))]}
    for label, value in masks_bad.items():
        yield Case("api-tasks", f"inpaint(masks={label})", _api(lambda p, v=value: p.inpaint(im, v, ["a"], **FAST)),
                   names=("mask",), expect="any" if label == "other size" else "error")
    for label, value in {"-1": -1, "'x'": "x", "1.5": 1.5, "100": 100}.items():
        yield Case("api-tasks", f"inpaint(mask_dilation={label})", _api(lambda p, v=value: p.inpaint(
            im, [mask], ["a"], mask_dilation=v, **FAST)), names=("mask_dilation",),
            expect="any" if value == 100 else "error")
    yield Case("api-tasks", "inpaint a 64x32 image keeps its size", _api(lambda p: p.inpaint(
        [phantom(0).resize((64, 32))], [np.ones((32, 64), bool)], ["a"], **FAST)), expect="ok",
        check=lambda f, out: None if out.images[0].size == (64, 32) else f"returned {out.images[0].size}")
    common = {"image_size": [(0, 0), (-1, 64), "64", (64,)], "batch_size": [0, -1, "x", 1.5],
              "generator": ["x", [None, None, None]], "output_type": ["x", None], "return_dict": ["yes"],
              "callback_on_step_end": [3], "sampler": ["x", 3], "foo": [1]}
    for name, values in common.items():
        for value in values:
            for task in ("text_to_image", "generate_pairs"):
                yield Case("api-tasks", f"{task}({name}={value!r})", _api(lambda p, n=name, v=value, t=task: getattr(
                    p, t)(["a"], **{**FAST, n: v})), names=(name,))
    for name, value in (("num_pairs_per_prompt", 0), ("num_pairs_per_prompt", -1), ("num_pairs_per_prompt", "2"),
                        ("num_pairs_per_prompt", 10**9)):
        yield Case("api-tasks", f"generate_pairs({name}={value!r})", _api(lambda p, n=name, v=value: p.generate_pairs(
            ["a"], **{**FAST, n: v})), names=(name,))
    for label, (templates, expect) in {"[]": ([], "error"), "no mask": (["no mask here"], "any"),
                                       "[MASK:0]": (["a [MASK:0] b"], "error"), "[MASK:-1]": (["a [MASK:-1]"], "any"),
                                       "[MASK:x]": (["a [MASK:x]"], "any"), "[MASK:100000]": (["[MASK:100000]"],
                                                                                            "error"),
                                       "3": (3, "error"), "[3]": ([3], "error")}.items():
        yield Case("api-tasks", f"infill(templates={label})", _api(lambda p, t=templates: p.infill(
            t, num_samples=2, **FAST)), names=("template", "MASK"), expect=expect)
    for name, value in (("num_samples", 0), ("num_samples", -1), ("num_samples", 10**9), ("exact_lengths", "x")):
        yield Case("api-tasks", f"infill({name}={value!r})", _api(lambda p, n=name, v=value: p.infill(
            ["a [MASK:2]"], **{**FAST, n: v})), names=(name,))
    for name, value in (("num_samples", 0), ("num_samples", -1), ("num_samples", "x"), ("num_samples", 10**9),
                        ("direction", "x"), ("batch_size", 0), ("image_size", (0, 0)), ("generator", "x")):
        for task in ("score", "rank"):
            kwargs = {"num_samples": 2, name: value}
            if task == "rank" and name == "image_size":
                continue
            yield Case("api-tasks", f"{task}({name}={value!r})", _api(lambda p, t=task, k=kwargs: getattr(p, t)(
                im, ["a"], **k)), names=(name,))
    for label, reports in {"None": None, "[]": [], "['']": [""], "[3]": [3], "two for one": ["a", "b"],
                           "'a'": "a"}.items():
        yield Case("api-tasks", f"score(reports={label})", _api(lambda p, r=reports: p.score(im, r, num_samples=2)),
                   names=("report",))
    yield Case("api-tasks", "score(None, None)", _api(lambda p: p.score(None, None)), names=("images", "reports"))
    yield from api_pipeline_cases()


def api_pipeline_cases() -> Iterator[Case]:
    from medim import MeDiMPipeline

    for label, value in {"3": 3, "None": None, "'missing-folder'": "missing-folder", "'prompts.txt'": "prompts.txt",
                         "'emptydir'": "emptydir", "''": ""}.items():
        yield Case("api-pipeline", f"from_pretrained({label})", _api(lambda p, v=value: MeDiMPipeline.from_pretrained(
            v)), names=("repo_or_dir", str(value)))
    for label, (kwargs, names) in {"device='tpu'": ({"device": "tpu"}, ("tpu", "device")),
                                   "dtype='x'": ({"dtype": "x"}, ("dtype",)),
                                   "device=3": ({"device": 3}, ("device",))}.items():
        yield Case("api-pipeline", f"to({label})", _api(lambda p, k=kwargs: p.to(**k)), names=names)
    yield Case("api-pipeline", "compile(mode='x')", _api(lambda p: p.compile(mode="x")), names=("mode",))

    def save(overwrite: bool, user: str) -> Callable[[Path], Callable[[], Any]]:
        def setup(folder: Path) -> Callable[[], Any]:
            (folder / "saved").mkdir()
            (folder / "saved" / user).parent.mkdir(parents=True, exist_ok=True)
            (folder / "saved" / user).write_text("the user's own file\n")
            return lambda: demo_pipe().save_pretrained(folder / "saved", overwrite=overwrite)

        return setup

    for user in ("notes.txt", "model/notes.txt", "model_index.json"):
        yield Case("api-pipeline", f"save_pretrained into a folder with the user's {user}", save(False, user),
                   names=("saved", "overwrite"))
        yield Case("api-pipeline", f"save_pretrained(overwrite=True) into a folder with the user's {user}",
                   save(True, user), expect="any", names=("saved", "overwrite"))
    yield Case("api-pipeline", "save_pretrained onto a file", _api(lambda p: p.save_pretrained("prompts.txt")),
               names=("prompts.txt",))
    yield Case("api-pipeline", "load_lora_weights('missing')", _api(lambda p: p.load_lora_weights("missing")),
               names=("missing",))
    yield Case("api-pipeline", "load_lora_weights(a plain file)", _api(lambda p: p.load_lora_weights("prompts.txt")),
               names=("prompts.txt",))


# ------------------------------------------------------------------------- real processes


def process_cases() -> Iterator[Case]:
    argvs = {"generate --steps x": gen("image", "--steps", "x"),
             "generate --out holding the user's 000000.png": gen("image"),
             "score --seed 2**64": score_argv("--seed", "18446744073709551616"),
             "evaluate reports --pred missing": ["evaluate", "reports", "--pred", "nope", "--ref", "nope"],
             "train optim.lr=nan": ["train", "model.init=x", "data.cache=y", "optim.lr=nan"]}
    for name, argv in argvs.items():
        def prepare(folder: Path, name=name) -> None:
            if "000000" in name:
                (folder / "out").mkdir()
                (folder / "out" / "000000.png").write_text("the user's file\n")

        yield Case("process", name, setup_cli(*argv, prepare=prepare), process=True)


def control_cases() -> list[tuple[Case, str]]:
    """Cases whose class is known, run first: the probe's detectors must see them (`kind` each)."""
    import subprocess

    def read_outside(folder: Path) -> Callable[[], Any]:
        return lambda: (folder / "outside" / "secret.txt").read_text()

    def read_outside_elsewhere(folder: Path) -> Callable[[], Any]:  # not through Python's open: the access time
        return lambda: subprocess.run(["cat", str(folder / "outside" / "secret.txt")], capture_output=True)

    def delete_input(folder: Path) -> Callable[[], Any]:
        inputs(folder)
        return lambda: (folder / "prompts.txt").unlink()

    def deep_error(folder: Path) -> Callable[[], Any]:
        return lambda: [][1]

    return [(Case("control", "reads outside/ with open", read_outside, expect="any"), "outside-read"),
            (Case("control", "reads outside/ in another process", read_outside_elsewhere, expect="any"),
             "outside-read"),
            (Case("control", "deletes the user's prompts.txt", delete_input, expect="any"), "data-loss"),
            (Case("control", "an IndexError from deep inside", deep_error), "traceback"),
            (Case("control", "accepts a bad input", lambda f: lambda: None), "silent-wrong"),
            (Case("control", "CLI: a bad --steps", setup_cli(*gen("image", "--steps", "x", steps=False)),
                  names=("--steps",)), "clean")]


def all_cases(shared: Path) -> list[Case]:
    """Every case, in groups (`shared`: where the tiny training run is built once)."""
    return [*generate_option_cases(), *generate_file_cases(), *output_cases(), *score_cases(), *evaluate_cases(),
            *other_command_cases(), *overwrite_cases(shared), *train_cases(shared), *model_folder_cases(),
            *checkpoint_cases(), *sampler_cases(), *api_cases(), *process_cases()]
