"""Hugging Face datasets as a training source: a dataset made here (PIL images, report columns), saved
with save_to_disk and written as parquet, cached by `medim cache --dataset hf` and trained on; the
column template, streaming (and its resume), and the refusals: a resume on changed data, bad options
before anything is encoded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medim.data.cache import TokenCacheDataset, build_token_cache
from medim.data.datasets import build_dataset
from medim.data.synthetic import make_dataset
from medim.models.vqgan import VQGAN
from tests.helpers.training import tiny_config, tiny_layout, tiny_run, tiny_tokenizer, tiny_vqgan

datasets = pytest.importorskip("datasets")

TEMPLATE = "FINDINGS: {findings} IMPRESSION: {impression}"


def phantom_table(n: int = 12, changed: bool = False) -> datasets.Dataset:
    """Phantom pairs (the same as build_dataset("phantom", n=n, seed=0, size=32)) as an image column
    and a findings column, plus an impression column; `changed` alters one report."""
    pairs = make_dataset(n, seed=0, size=32)
    findings = [report for _, report, _ in pairs]
    if changed:
        findings[-1] = findings[0]
    features = datasets.Features({"image": datasets.Image(), "findings": datasets.Value("string"),
                                  "impression": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [image for image, _, _ in pairs], "findings": findings,
                                       "impression": ["No lesion."] * n}, features=features)


def saved(path: Path, **kwargs) -> Path:
    phantom_table(**kwargs).save_to_disk(str(path))
    return path


def parquet(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    phantom_table(**kwargs).to_parquet(str(path))
    return path


def cache_cli(base: Path, out: Path, *args: str) -> int:
    from medim.cli import main

    return main(["cache", "--dataset", "hf", *args, "--model", str(base), "--out", str(out), "--shard-size", "5",
                 "--batch-size", "4", "--device", "cpu"])


def tiny_build(dataset, out: Path, **kwargs):
    return build_token_cache(dataset, out, vqgan=tiny_vqgan(), tokenizer=tiny_tokenizer(), layout=tiny_layout(),
                             shard_size=5, batch_size=4, show_progress=False, **kwargs)


def same_cache(a: TokenCacheDataset, b: TokenCacheDataset) -> bool:
    return a.ids == b.ids and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


@pytest.mark.parametrize("form", ["save_to_disk", "parquet"])
def test_cache_and_train_two_steps(tmp_path, form, capsys):
    from medim.training import Trainer

    base, phantom_cache = tiny_run(tmp_path)  # its cache: the same phantom pairs, built from the phantom source
    out = tmp_path / "hf-cache"
    if form == "save_to_disk":
        args = ["--data-root", str(saved(tmp_path / "saved")),
                "--dataset-args", '{"report_column": "findings", "token": "hf_secret"}']
    else:
        options = {"path": "parquet", "data_files": str(parquet(tmp_path / "pq" / "train.parquet")),
                   "report_column": "findings", "cache_dir": str(tmp_path / "hf-datasets")}
        args = ["--dataset-args", json.dumps(options)]
    assert cache_cli(base, out, *args) == 0
    assert "12 items cached" in capsys.readouterr().out
    data, phantom = TokenCacheDataset(out), TokenCacheDataset(phantom_cache)
    assert data.ids == [str(i) for i in range(12)]
    # Same pairs, same tokens: the images went through the Image feature (PNG) and back unchanged.
    assert all(torch.equal(data.tensors[k], phantom.tensors[k][:12]) for k in data.tensors)
    index = data.index
    assert index["source"]["kind"] == "hf" and index["num_items"] == 12
    assert index["dataset_fingerprint"]["report_column"] == "findings"
    assert ("dataset" if form == "save_to_disk" else "config") in index["dataset_fingerprint"]
    assert "hf_secret" not in (out / "index.json").read_text()  # a token is not recorded

    trainer = Trainer(tiny_config(tmp_path, "run", f"data.cache={out}", "train.max_steps=2", "log.every=1",
                                  "eval.every=0", "data.val_size=4"))
    result = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    assert (result.final_dir / "model_index.json").is_file()


def test_template_and_streaming(tmp_path, monkeypatch):
    file = parquet(tmp_path / "pq" / "train.parquet")
    options = dict(path="parquet", data_files=str(file), report_template=TEMPLATE)
    loaded = build_dataset("hf", **options, cache_dir=str(tmp_path / "hf-datasets"))
    tiny_build(loaded, tmp_path / "loaded")
    reports = [f"FINDINGS: {report} IMPRESSION: No lesion." for _, report, _ in make_dataset(12, seed=0, size=32)]
    assert [loaded[i]["report"] for i in range(12)] == reports
    reference = TokenCacheDataset(tmp_path / "loaded")
    layout, tok = tiny_layout(), tiny_tokenizer()
    assert torch.equal(reference.tensors["text_ids"].long(), layout.encode_reports(tok, reports))

    # Streamed: the same cache, no length; interrupted, it resumes where it stopped.
    real_encode, calls = VQGAN.encode, []

    def crashing_encode(self, pixels):
        calls.append(pixels.shape[0])
        if len(calls) == 3:  # shard 0 takes 2 batches (4 + 1 items); crash inside shard 1
            raise KeyboardInterrupt
        return real_encode(self, pixels)

    monkeypatch.setattr(VQGAN, "encode", crashing_encode)
    with pytest.raises(KeyboardInterrupt):
        tiny_build(build_dataset("hf", **options, streaming=True), tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / "index.json").read_text())
    assert index["num_items"] is None and len(index["shards"]) == 1
    assert index["dataset_fingerprint"]["config"] == loaded.fingerprint["config"]
    calls.clear()
    monkeypatch.setattr(VQGAN, "encode", lambda self, p: calls.append(p.shape[0]) or real_encode(self, p))
    summary = tiny_build(build_dataset("hf", **options, streaming=True), tmp_path / "streamed")
    assert (summary.shards_reused, summary.shards_written, summary.num_items) == (1, 2, 12)
    assert sum(calls) == 12 - 5  # the stream resumed after the finished shard
    assert same_cache(TokenCacheDataset(tmp_path / "streamed"), reference)


def test_resume_on_changed_data_is_refused(tmp_path, monkeypatch):
    base, _ = tiny_run(tmp_path)
    folder, file = saved(tmp_path / "saved"), parquet(tmp_path / "pq" / "train.parquet")
    parquet_args = json.dumps({"path": "parquet", "data_files": str(file), "report_column": "findings",
                               "cache_dir": str(tmp_path / "hf-datasets")})
    real_encode = VQGAN.encode
    for name, args, rewrite, differs in [
        ("disk", ["--data-root", str(folder), "--dataset-args", '{"report_column": "findings"}'],
         lambda: saved(tmp_path / "saved", changed=True), r"dataset_fingerprint\.dataset: "),
        ("parquet", ["--dataset-args", parquet_args],
         lambda: parquet(file, changed=True), r"dataset_fingerprint\.config: "),
    ]:
        out, calls = tmp_path / f"cache-{name}", []

        def crashing_encode(self, pixels, calls=calls):
            calls.append(1)
            if len(calls) == 3:  # inside shard 1
                raise KeyboardInterrupt
            return real_encode(self, pixels)

        monkeypatch.setattr(VQGAN, "encode", crashing_encode)
        with pytest.raises(KeyboardInterrupt):
            cache_cli(base, out, *args)
        monkeypatch.setattr(VQGAN, "encode", real_encode)
        before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
        rewrite()  # same path, same arguments, other data
        with pytest.raises(SystemExit, match=f"(?s)built from other inputs.*{differs}.*--overwrite"):
            cache_cli(base, out, *args)
        assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before  # nothing written
        assert cache_cli(base, out, *args, "--overwrite") == 0
        assert TokenCacheDataset(out).ids == [str(i) for i in range(12)]


def test_stream_without_fingerprint_is_not_resumed(tmp_path, monkeypatch):
    from medim.data.hf_dataset import HFColumns, HFStreamingPairs

    def stream():
        return HFStreamingPairs(phantom_table().to_iterable_dataset(), HFColumns(report_column="findings"))

    assert stream().fingerprint is None
    real_encode, calls = VQGAN.encode, []

    def crashing_encode(self, pixels):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(self, pixels)

    monkeypatch.setattr(VQGAN, "encode", crashing_encode)
    with pytest.raises(KeyboardInterrupt):
        tiny_build(stream(), tmp_path / "cache")
    monkeypatch.setattr(VQGAN, "encode", real_encode)
    with pytest.raises(ValueError, match="streamed dataset without a fingerprint.*overwrite=True"):
        tiny_build(stream(), tmp_path / "cache")
    assert tiny_build(stream(), tmp_path / "cache", overwrite=True).num_items == 12


def test_bad_options_refused_before_encoding(tmp_path, monkeypatch):
    base, _ = tiny_run(tmp_path)
    folder, file = saved(tmp_path / "saved"), parquet(tmp_path / "pq" / "train.parquet")

    def no_encoding(self, pixels):
        raise AssertionError("encoded before the options were checked")

    monkeypatch.setattr(VQGAN, "encode", no_encoding)
    out = tmp_path / "out"
    files = {"path": "parquet", "data_files": str(file), "cache_dir": str(tmp_path / "hf-datasets")}
    for args, message in [
        (["--data-root", str(folder)], "report_column: .* has no column 'report'; its columns: image, findings, "
                                       "impression"),
        (["--data-root", str(folder), "--dataset-args", '{"report_template": "{findings} {notes}"}'],
         "report_template: .* has no column 'notes'"),
        (["--data-root", str(folder), "--dataset-args", '{"image_column": "img", "report_column": "findings"}'],
         "image_column: .* has no column 'img'"),
        (["--dataset-args", json.dumps({**files, "report_column": "findings", "split": "test"})],
         "split 'test': parquet has the splits train"),
        (["--dataset-args", json.dumps({**files, "report_column": "findings", "split": "train[:0]"})],
         r"split 'train\[:0\]'"),
        (["--dataset-args", json.dumps({**files, "report_column": "findings", "streaming": 1})],
         "streaming must be a bool"),
        (["--data-root", str(folder), "--dataset-args", '{"report_column": "findings", "colums": {}}'],
         r"build_dataset\('hf'\) got unknown arguments \['colums'\]"),
        # Not a local folder: a Hub id, kept as written (the Hub is unreachable here).
        (["--data-root", "someone/no-such-data", "--dataset-args", '{"report_column": "findings"}'],
         ".*'someone/no-such-data'"),
    ]:
        with pytest.raises(SystemExit, match=f"^medim cache: {message}"):
            cache_cli(base, out, *args)
        assert not out.exists()
