"""`medim generate` on several processes (torchrun, CPU + gloo): the same bytes as one process, resume
after SIGKILL with another world size, a failing rank; the sharding helpers; and outputs that do
not depend on batching or threads (what makes the byte-identity possible)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medim.cli import main
from medim.commands.manifest import LEFTOVER
from medim.pipelines.pipeline import MeDiMPipeline
from medim.utils.sharding import Shard, current_shard, rank_indices, shard

PROMPTS = "Frontal chest radiograph.\nFrontal view of the chest.\nA large dense nodule in the right upper zone.\n"
# 3 prompts x 6 = 18 samples, 4 steps: a few seconds of work, so a kill lands mid-run.
OPTIONS = ("pairs", "--model", "medim-demo", "--num-per-prompt", "6", "--steps", "4", "--batch-size", "3",
           "--seed", "5", "--device", "cpu")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def command(world_size: int | None, prompts: Path, out: Path, *options: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m medim generate ...` (torchrun is
    `python -m torch.distributed.run`; --standalone picks a free port), or one plain process."""
    launcher = [sys.executable] if world_size is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size)]
    return [*launcher, "-m", "medim", "generate", *(options or OPTIONS), "--prompts", str(prompts), "--out", str(out)]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stamps(folder: Path, indices: set[int]) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("[0-9]*.*")
            if int(p.name.split(".")[0]) in indices}


def finished(folder: Path) -> set[int]:
    """Indices with a complete manifest line in manifest.jsonl or a rank part."""
    import json

    done = set()
    for path in folder.glob("manifest*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                done.add(json.loads(line)["index"])
            except (ValueError, KeyError):  # a line cut short; the header
                pass
    return done


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory) -> dict[str, bytes]:
    """One process, in this test process (all its threads), no interruption."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["generate", *OPTIONS, "--prompts", str(prompts), "--out", str(out)]) == 0
    return files(out)


def test_torchrun_two_processes_make_the_bytes_of_one(prompts, reference, tmp_path):
    out = tmp_path / "two"
    run = subprocess.run(command(2, prompts, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = files(out)
    assert list(got) == list(reference)  # every PNG, TXT and manifest.jsonl; no rank parts left
    assert [name for name in got if got[name] != reference[name]] == []


def kill_after(proc: subprocess.Popen, folder: Path, lines: int) -> set[int]:
    """SIGKILL a run (torchrun and its workers, which run in sessions of their own) once `lines`
    samples are finished; returns the samples finished at the kill."""
    deadline = time.monotonic() + 240
    while len(finished(folder)) < lines:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    for pid in [*descendants(proc.pid), proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return finished(folder)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("first, then", [(2, None), (None, 2)], ids=["2-then-1", "1-then-2"])
def test_killed_run_resumes_with_another_world_size(first, then, prompts, reference, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(command(first, prompts, out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = kill_after(proc, out, lines=4)
    assert 4 <= len(done) < 18
    before = stamps(out, done)

    if then is None:
        assert main(["generate", *OPTIONS, "--prompts", str(prompts), "--out", str(out)]) == 0
    else:
        run = subprocess.run(command(then, prompts, out), env=ENV, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    assert files(out) == reference  # no leftovers of the kill, no rank parts, the same bytes
    assert stamps(out, done) == before  # finished samples were not written again


@pytest.mark.slow
def test_more_processes_than_samples(tmp_path):
    prompts = tmp_path / "one.txt"
    prompts.write_text("Frontal view of the chest.\n")
    options = ("image", "--model", "medim-demo", "--steps", "4", "--device", "cpu")
    assert main(["generate", *options, "--prompts", str(prompts), "--out", str(tmp_path / "one")]) == 0
    run = subprocess.run(command(3, prompts, tmp_path / "three", *options), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert files(tmp_path / "three") == files(tmp_path / "one")


@pytest.mark.slow
def test_a_failing_rank_stops_the_run_cleanly(prompts, reference, tmp_path):
    out = tmp_path / "out"
    (out / "000001.png").mkdir(parents=True)  # rank 1 makes sample 1 first and cannot write it
    (out / "manifest.jsonl").write_text('{"medim": "generate"}\n')  # a medim folder (else refused as not empty)
    run = subprocess.run(command(2, prompts, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "rank 1 of 2 failed while making samples [1, 3, 5]" in run.stderr
    assert "000001.png" in run.stderr
    (out / "000001.png").rmdir()
    left = files(out)
    assert not [name for name in left if LEFTOVER.fullmatch(name)]
    partial = {name: data for name, data in left.items() if not name.startswith(("manifest", "."))}
    assert partial == {name: reference[name] for name in partial}  # whatever was written is whole and right

    assert main(["generate", *OPTIONS, "--prompts", str(prompts), "--out", str(out)]) == 0
    assert files(out) == reference


# ----------------------------------------------------------------------------- the sharding helpers


def test_rank_indices_and_shard():
    assert list(rank_indices(10, rank=1, world_size=4)) == [1, 5, 9]
    assert list(rank_indices(2, rank=3, world_size=4)) == []
    parts = [list(shard(iter("abcdefg"), rank=r, world_size=3)) for r in range(3)]
    assert parts == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert list(rank_indices(5)) == [0, 1, 2, 3, 4]  # a plain process: everything


def test_rank_from_the_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert current_shard() == Shard(rank=2, world_size=3, local_rank=0)
    assert list(rank_indices(8)) == [2, 5]
    assert list(rank_indices(8, rank=0)) == [0, 3, 6]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        current_shard()


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=-1), "n must be an int >= 0"),
    (dict(n=4, rank=2, world_size=2), r"rank must be in \[0, world_size=2\)"),
    (dict(n=4, rank=0, world_size=0), "world_size must be >= 1"),
])
def test_bad_shards(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rank_indices(**kwargs)


# --------------------------------------------------------------- outputs independent of batching


def png_bytes(images) -> list[bytes]:
    out = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def test_pixels_and_codes_do_not_depend_on_batch_size_or_threads():
    pipe = MeDiMPipeline.from_pretrained("medim-demo")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["Frontal view of the chest.", "A large dense nodule in the right upper zone."] * 3

    def pairs(batch_size):
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return pipe.generate_pairs(prompts, generator=generators, batch_size=batch_size, num_inference_steps=2)

    outs = {b: pairs(b) for b in (1, 4, 6)}
    assert all(torch.equal(outs[1].tokens, o.tokens) for o in outs.values())
    pngs = {b: png_bytes(o.images) for b, o in outs.items()}
    assert pngs[1] == pngs[4] == pngs[6]

    threads = torch.get_num_threads()
    try:  # a torchrun worker runs one thread; the decode must not care
        torch.set_num_threads(1 if threads > 1 else 2)
        assert png_bytes(pairs(6).images) == pngs[1]
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads

    codes = {b: pipe.image_to_report(outs[1].images, batch_size=b, output_type="tokens", num_inference_steps=1).images
             for b in (1, 6)}
    assert torch.equal(codes[1], codes[6])
