"""Token cache: contents equal direct encoding, resume without redoing shards, bad files counted."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_training import TEXT_VOCAB, make_cache, tiny_layout, tiny_tokenizer, tiny_vqgan
from PIL import Image

from medim.data.cache import TokenCacheDataset, build_token_cache, first_sentence_length
from medim.data.datasets import build_dataset
from medim.data.images import preprocess
from medim.data.synthetic import make_dataset
from medim.models.vqgan import VQGAN


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


def test_first_sentence_length():
    layout, tok = tiny_layout(), tiny_tokenizer()
    reports = ["Frontal view. No lesion.", "Frontal view", "Frontal view.No lesion."]
    got = first_sentence_length(layout, tok, reports).tolist()
    assert got == [3, 2, 6]  # "Frontal view ." | no '.' at all | "view.No" is not a sentence end


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
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_cache(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="medim cache"):
        TokenCacheDataset(tmp_path / "nowhere")
