"""Two CPU processes (gloo): training keeps ranks' parameters identical and each rank reads
different samples; DDP and FSDP2 both run through the same trainer; a step that is non-finite on
one rank only is skipped on both."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.training import REPO, leave_worker, tiny_config, tiny_run

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tmp: str, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for mode in ("ddp", "fsdp"):  # one process group, two runs: spawning is the slow part
        _train(rank, Path(tmp), mode)
    leave_worker()


def _train(rank: int, tmp: Path, mode: str) -> None:
    import torch.distributed as dist

    from medim.training import Trainer

    cfg = tiny_config(tmp, mode, "train.max_steps=3", f"train.parallel={mode}", "train.micro_batch_size=2",
                      "eval.every=3", "checkpoint.every=0", "log.every=1")
    trainer = Trainer(cfg)
    seen: list[int] = []
    batch = trainer.data.batch
    trainer.data.batch = lambda idx: seen.extend(idx) or batch(idx)
    if mode == "ddp":  # rank 1 alone sees a NaN loss in the second step
        loss = trainer._loss

        def poisoned(batch, generator):
            out = loss(batch, generator)
            if rank == 1 and trainer.step == 1:
                out.loss = out.loss * math.nan
            return out

        trainer._loss = poisoned
    out = trainer.fit()
    # Every rank gathers the full weights (collective under FSDP) and compares them with rank 0's.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    flat = torch.cat([v.float().flatten() for _, v in sorted(full.items())])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    result = {"seen": seen, "same_as_rank0": bool(torch.equal(flat, ref)), "final": str(out.final_dir),
              "val_loss": [r["val_loss"] for r in out.history if "val_loss" in r],
              "skipped": [r["skipped_steps"] for r in out.history if "skipped_steps" in r]}
    (tmp / f"{mode}-rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_run_copy")
def test_two_process_training(tmp_path):
    tiny_run(tmp_path)  # build the model and cache once, before the ranks start
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)
    for mode in ("ddp", "fsdp"):
        _check(tmp_path, mode)


def _check(tmp_path: Path, mode: str) -> None:
    from medim.pipelines.pipeline import MeDiMPipeline

    results = [json.loads((tmp_path / f"{mode}-rank{r}.json").read_text()) for r in range(WORLD)]
    assert all(r["same_as_rank0"] for r in results)
    a, b = (r["seen"] for r in results)
    train_seen = [i for i in a + b if i < 20]  # 24 items, the last 4 held out for validation
    assert len(train_seen) == 3 * 8 and len(set(train_seen)) == 20  # 24 reads cover all 20 items
    steps_a = [a[i:i + 4] for i in range(0, len(a), 4)]
    steps_b = [b[i:i + 4] for i in range(0, len(b), 4)]
    assert all(not set(x) & set(y) for x, y in zip(steps_a, steps_b))  # distinct samples per step
    assert results[1]["val_loss"] == []  # only rank 0 logs
    assert len(results[0]["val_loss"]) == 1
    assert results[0]["skipped"] == ([0, 1, 1] if mode == "ddp" else [0, 0, 0])  # both ranks skipped it
    MeDiMPipeline.from_pretrained(results[0]["final"])


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_run_copy")
def test_torchrun_fsdp_run_exits_zero_and_says_so_once(tmp_path):
    """`torchrun -m medim.training` under FSDP: exit status 0, the end line printed once (rank 0),
    and everything the run writes complete, though its processes skip the interpreter's teardown
    (medim.commands.common.finish_training_run)."""
    import subprocess
    import sys

    from medim.pipelines.pipeline import MeDiMPipeline

    base, cache = tiny_run(tmp_path)
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medim.training",
         "--config", str(REPO / "configs/tiny.yaml"), f"model.init={base}", f"data.cache={cache}",
         f"train.output_dir={out}", "train.parallel=fsdp", "train.max_steps=2", "train.micro_batch_size=2",
         "eval.every=0", "checkpoint.every=2", "log.every=1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("medim train: finished at step 2; trained pipeline in") == 1
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert (out / "checkpoints" / "checkpoint_00000002").is_dir()
    MeDiMPipeline.from_pretrained(out / "final")
