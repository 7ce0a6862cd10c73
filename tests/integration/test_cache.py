"""Token cache: contents equal direct encoding, resume without redoing shards, bad files counted."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from medim.data.cache import TokenCacheDataset, build_token_cache, first_sentence_length
from medim.data.datasets import build_dataset
from medim.data.images import preprocess
from medim.data.synthetic import make_dataset
from medim.models.vqgan import VQGAN
from tests.helpers.training import TEXT_VOCAB, make_cache, tiny_layout, tiny_tokenizer, tiny_vqgan


def test_cache_equals_direct_encoding(tmp_path):
    summary = make_cache(tmp_path / "cache")
    assert (summary.num_items, summary.skipped, summary.shards_written) == (12, {}, 3)
    data = TokenCacheDataset(tmp_path / "cache")
    ds = build_dataset("phantom", n=12, seed=0, size=32)
    items = [ds[i] for i in range(12)]
    layout, vqgan, tok = tiny_layout(), tiny_vqgan(), tiny_tokenizer()
    codes = vqgan.encode(preprocess([it["image"] for it in items], size=16))
    text = layout.encode_reports(tok, [it["report"] for it in items])
    assert data.ids == [it["id"] for it in items]
    assert data.tensors["image_codes"].dtype == torch.int16
    assert torch.equal(data.tensors["image_codes"].long(), codes)
    assert torch.equal(data.tensors["text_ids"].long(), text)
    assert data.tensors["sizes"].tolist() == [[32, 32]] * 12
    batch = data.batch([3, 0])
    assert torch.equal(batch["x0"], torch.cat([text[[3, 0]], codes[[3, 0]] + TEXT_VOCAB], 1))
    layout.validate_state(batch["x0"])
    # Only safetensors + JSON on disk.
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json"] + [".safetensors"] * 3


def test_first_sentence_length_is_the_release_rule():
    # The release keeps report[:report.find(".")]: the text before the first "." anywhere, without
    # the period. medim used to keep the period and to need whitespace after it: [3, 2, 6, 2].
    layout, tok = tiny_layout(), tiny_tokenizer()
    reports = ["Frontal view. No lesion.", "Frontal view", "Frontal view.No lesion.", ". No lesion."]
    assert first_sentence_length(layout, tok, reports).tolist() == [2, 2, 2, 0]
    assert [tok.decode(layout.encode_reports(tok, [r])[0, :2]) for r in reports[:3]] == ["Frontal view"] * 3


def test_interrupted_run_resumes_without_redoing_shards(tmp_path, monkeypatch):
    reference = make_cache(tmp_path / "ref")
    calls = []
    real_encode = VQGAN.encode

    def crashing_encode(self, pixels):
        calls.append(pixels.shape[0])
        if len(calls) == 4:  # shard 0 takes 2 batches (3 + 2 items); crash inside shard 1
            raise KeyboardInterrupt
        return real_encode(self, pixels)

    monkeypatch.setattr(VQGAN, "encode", crashing_encode)
    with pytest.raises(KeyboardInterrupt):
        make_cache(tmp_path / "cache")
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert len(index["shards"]) == 1 and not index["complete"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["index.json", "shard_00000.safetensors"]
    with pytest.raises(ValueError, match="unfinished"):
        TokenCacheDataset(tmp_path / "cache")

    calls.clear()
    monkeypatch.setattr(VQGAN, "encode", lambda self, p: calls.append(p.shape[0]) or real_encode(self, p))
    summary = make_cache(tmp_path / "cache")
    assert (summary.shards_reused, summary.shards_written, summary.num_items) == (1, 2, 12)
    assert sum(calls) == 12 - 5  # the finished shard's items were not encoded again
    a, b = TokenCacheDataset(tmp_path / "ref"), TokenCacheDataset(tmp_path / "cache")
    assert a.ids == b.ids and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert all((tmp_path / "ref" / f).read_bytes() == (tmp_path / "cache" / f).read_bytes() for f in files)
    assert reference.num_items == 12
    calls.clear()
    assert make_cache(tmp_path / "cache").shards_written == 0 and not calls  # complete: nothing to do


def test_bad_files_skipped_and_counted(tmp_path):
    root = tmp_path / "pairs"
    root.mkdir()
    for i, (image, report, _) in enumerate(make_dataset(4, seed=1, size=32)):
        image.save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(report)
    (root / "p1.png").write_bytes(b"\x89PNG not really")  # corrupt image
    Image.new("L", (32, 32)).save(root / "orphan.png")  # no report beside it
    ds = build_dataset("folder", root=root)
    summary = build_token_cache(ds, tmp_path / "cache", vqgan=tiny_vqgan(), tokenizer=tiny_tokenizer(),
                                layout=tiny_layout(), shard_size=2, show_progress=False)
    assert summary.num_items == 3
    assert sum(summary.skipped.values()) == 2 and len(summary.skipped) == 2
    assert TokenCacheDataset(tmp_path / "cache").ids == ["p0.png", "p2.png", "p3.png"]


def test_settings_mismatch_and_bad_arguments(tmp_path):
    make_cache(tmp_path / "cache", n=4)
    with pytest.raises(ValueError, match="shard_size"):
        make_cache(tmp_path / "cache", n=4, shard_size=2)
    assert make_cache(tmp_path / "cache", n=4, shard_size=2, overwrite=True).shards_written == 2
    assert len(list((tmp_path / "cache").glob("shard_*"))) == 2
    with pytest.raises(ValueError, match="shard_size must be"):
        make_cache(tmp_path / "other", shard_size=0)
    with pytest.raises(ValueError, match="resize must be one of"):
        make_cache(tmp_path / "other", resize="stretch")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_cache(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="medim cache"):
        TokenCacheDataset(tmp_path / "nowhere")


def saved_parts(root: Path) -> list[str]:
    """A tiny VQGAN, tokenizer and layout saved as `medim cache --vqgan/--tokenizer/--layout` reads them."""
    tiny_vqgan().save_pretrained(root / "vqgan")
    tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    (root / "layout.json").write_text(json.dumps(tiny_layout().to_dict()))
    return ["--vqgan", str(root / "vqgan"), "--tokenizer", str(root / "tokenizer"),
            "--layout", str(root / "layout.json")]


def test_cli_resume_on_other_data_is_refused(tmp_path, monkeypatch):
    # The reported failure: killed while caching seed 1, then re-run with seed 2, the cache held
    # items of both datasets.
    from medim.cli import main

    parts, out = saved_parts(tmp_path), tmp_path / "cache"

    def cli(seed: int) -> int:
        return main(["cache", "--dataset", "phantom", "--dataset-args", json.dumps({"n": 12, "seed": seed, "size": 32}),
                     *parts, "--out", str(out), "--shard-size", "5", "--batch-size", "5", "--device", "cpu"])

    real_encode, calls = VQGAN.encode, []

    def crashing_encode(self, pixels):
        calls.append(1)
        if len(calls) == 2:  # inside shard 1
            raise KeyboardInterrupt
        return real_encode(self, pixels)

    monkeypatch.setattr(VQGAN, "encode", crashing_encode)
    with pytest.raises(KeyboardInterrupt):
        cli(seed=1)
    monkeypatch.setattr(VQGAN, "encode", real_encode)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(SystemExit, match=r"(?s)other inputs.*source\.args\.seed: 1 in the cache, 2 now.*--overwrite"):
        cli(seed=2)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before  # nothing written
    assert cli(seed=1) == 0  # the same command resumes
    assert TokenCacheDataset(out).ids == [f"phantom-1-{i}" for i in range(12)]


PHANTOM = {"kind": "phantom", "args": {"n": 4, "seed": 0, "size": 32}}


def build(out: Path, n: int = 4, source=PHANTOM, **kwargs):
    parts = dict(vqgan=tiny_vqgan(), tokenizer=tiny_tokenizer(), layout=tiny_layout()) | kwargs
    return build_token_cache(build_dataset("phantom", n=n, seed=0, size=32), out, source=source, shard_size=5,
                             show_progress=False, **parts)


def other_tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    return tok


@pytest.mark.parametrize("change, differs", [
    (dict(source={"kind": "phantom", "args": {"n": 4, "seed": 1, "size": 32}}),
     "source.args.seed: 0 in the cache, 1 now"),
    (dict(source=None), 'source: {"kind": "phantom", "args": {"n": 4, "seed": 0, "size": 32}} in the cache, null now'),
    (dict(vqgan=tiny_vqgan(seed=1)), "vqgan_sha256: "),
    (dict(tokenizer=other_tokenizer()), "tokenizer_sha256: "),
    (dict(layout=tiny_layout(text_len=32)), "layout.text_len: 40 in the cache, 32 now"),
    (dict(resize="crop"), 'resize: "pad" in the cache, "crop" now'),
    (dict(n=5), "num_items: 4 in the cache, 5 now"),
])
def test_every_input_is_in_the_fingerprint(tmp_path, change, differs):
    out = tmp_path / "cache"
    build(out)
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 2 and index["source"] == PHANTOM and len(index["vqgan_sha256"]) == 64
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(ValueError, match="(?s)built from other inputs.*" + re.escape(differs) + ".*overwrite=True"):
        build(out, **change)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    # The name a tokenizer was loaded under is not part of it; the same inputs find the cache complete.
    assert build(out, tokenizer_name="elsewhere").shards_written == 0


def test_old_cache_and_bad_source_refused(tmp_path):
    out = tmp_path / "cache"
    make_cache(out, n=4)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "version": 1}))
    with pytest.raises(ValueError, match="version 1, which records no fingerprint"):
        make_cache(out, n=4)
    assert len(TokenCacheDataset(out)) == 4  # still readable for training
    with pytest.raises(TypeError, match="source must be a dict"):
        make_cache(tmp_path / "other", n=4, source="phantom")
    (out / "index.json").write_text("[]")
    with pytest.raises(ValueError, match="not a medim token cache index"):
        TokenCacheDataset(out)


def test_cli_records_the_absolute_data_root(tmp_path, monkeypatch):
    from medim.cli import main

    parts = saved_parts(tmp_path)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i, (image, report, _) in enumerate(make_dataset(3, seed=ord(name), size=32)):
            image.save(tmp_path / name / f"p{i}.png")
            (tmp_path / name / f"p{i}.txt").write_text(report)
    monkeypatch.chdir(tmp_path)
    args = ["cache", "--dataset", "folder", *parts, "--out", "out", "--device", "cpu"]
    assert main([*args, "--data-root", "a"]) == 0
    assert json.loads((tmp_path / "out" / "index.json").read_text())["source"] == {
        "kind": "folder", "args": {"root": str(tmp_path / "a")}}
    with pytest.raises(SystemExit, match=re.escape(f'source.args.root: "{tmp_path / "a"}" in the cache, '
                                                   f'"{tmp_path / "b"}" now')):
        main([*args, "--data-root", "b"])
    # Found by benchmarks/probe_reliability.py: an image rewritten under its name was not noticed.
    shutil.copy(tmp_path / "b" / "p1.png", tmp_path / "a" / "p0.png")
    with pytest.raises(SystemExit, match=r"dataset_fingerprint.records: .* in the cache, .* now"):
        main([*args, "--data-root", "a"])


def test_cli_model_argument(tmp_path, capsys):
    from medim.cli import main

    def cache(model: str) -> int:
        return main(["cache", "--dataset", "phantom", "--dataset-args", '{"n": 2, "seed": 0}', "--model", model,
                     "--out", str(tmp_path / "out"), "--device", "cpu"])

    assert cache("medim-demo") == 0  # the bundled model, by name
    assert "2 items cached" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for model, message in [(tmp_path / "empty", "holds no model_index.json"),
                           (tmp_path / "nope", "nope: no such folder"),
                           ("./nope", r"\./nope: no such folder"), (tmp_path / "file", "is a file, not a folder"),
                           ("nope", "nope: no such folder, and no Hub repo of that name")]:
        with pytest.raises(SystemExit, match=f"^medim cache: --model .*{message}"):
            cache(str(model))
    (tmp_path / "empty" / "model_index.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="model_index.json must hold a JSON object, got a list"):
        cache(str(tmp_path / "empty"))


def test_dataset_fingerprint_recorded_and_compared(tmp_path):
    out, parts = tmp_path / "cache", dict(vqgan=tiny_vqgan(), tokenizer=tiny_tokenizer(), layout=tiny_layout())
    ds = build_dataset("phantom", n=4, seed=0, size=32)
    make_cache(tmp_path / "plain", n=4)
    assert "dataset_fingerprint" not in json.loads((tmp_path / "plain" / "index.json").read_text())
    ds.fingerprint = {"data": "a"}  # e.g. the hf kind's: its data and column mapping
    build_token_cache(ds, out, shard_size=5, show_progress=False, **parts)
    assert json.loads((out / "index.json").read_text())["dataset_fingerprint"] == {"data": "a"}
    ds.fingerprint = {"data": "b"}
    with pytest.raises(ValueError, match='dataset_fingerprint.data: "a" in the cache, "b" now'):
        build_token_cache(ds, out, shard_size=5, show_progress=False, **parts)
    del ds.fingerprint  # a source without one is not taken for the same data either
    with pytest.raises(ValueError, match=re.escape('dataset_fingerprint: {"data": "a"} in the cache, null now')):
        build_token_cache(ds, out, shard_size=5, show_progress=False, **parts)


class Streamed(torch.utils.data.IterableDataset):
    """Phantom pairs as a stream: no length, no fingerprint."""

    def __iter__(self):
        items = build_dataset("phantom", n=12, seed=0, size=32)
        return (items[i] for i in range(len(items)))


def test_streamed_dataset_cached_like_an_indexed_one(tmp_path, monkeypatch):
    make_cache(tmp_path / "ref")

    def build(**kwargs):
        return build_token_cache(Streamed(), tmp_path / "cache", vqgan=tiny_vqgan(), tokenizer=tiny_tokenizer(),
                                 layout=tiny_layout(), shard_size=5, batch_size=3, show_progress=False, **kwargs)

    assert build().num_items == 12
    a, b = TokenCacheDataset(tmp_path / "ref"), TokenCacheDataset(tmp_path / "cache")
    assert a.ids == b.ids and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert b.index["num_items"] is None
    # Interrupted, it is not resumed: nothing says the stream is the same data.
    real_encode, calls = VQGAN.encode, []

    def crashing_encode(self, pixels):
        calls.append(1)
        if len(calls) == 4:  # inside shard 1
            raise KeyboardInterrupt
        return real_encode(self, pixels)

    monkeypatch.setattr(VQGAN, "encode", crashing_encode)
    with pytest.raises(KeyboardInterrupt):
        build(overwrite=True)
    monkeypatch.setattr(VQGAN, "encode", real_encode)
    with pytest.raises(ValueError, match="streamed dataset without a fingerprint"):
        build()
    assert build(overwrite=True).shards_written == 3
