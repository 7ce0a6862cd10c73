"""Training under faults: non-finite steps and a diverging run, changed settings on resume, damaged
checkpoints and logs, output permissions, and `medim train` killed (SIGKILL) at every stage of a step
and of a checkpoint write, then resumed to the same bits as an uninterrupted run."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medim.training import checkpoint as ckpt
from medim.training.resume import ResumeRefused, check_settings
from medim.utils.hub import atomic_directory, atomic_file
from tests.helpers.training import REPO, tiny_config, tiny_run


def _trainer(tmp_path: Path, out: str, *overrides: str):
    from medim.training import Trainer

    return Trainer(tiny_config(tmp_path, out, "log.every=1", "eval.every=0", *overrides))


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# ---------------------------------------------------------------- non-finite steps (issue 16, item 1)
@pytest.mark.usefixtures("tiny_run_copy")
def test_non_finite_step_is_skipped_and_never_saved(tmp_path, caplog):
    trainer = _trainer(tmp_path, "run", "train.max_steps=6", "checkpoint.every=3", "checkpoint.keep_last=0",
                       "optim.ema_decay=0.9")
    loss = trainer._loss

    def poisoned(batch, generator):  # the third step's loss is NaN, so are its gradients
        out = loss(batch, generator)
        if trainer.step == 2:
            out.loss = out.loss * math.nan
        return out

    trainer._loss = poisoned
    trainer.fit(until_step=2)
    model, ema = _weights(trainer), {k: v.clone() for k, v in trainer.ema.shadow.items()}
    adam = {k: v.clone() for k, v in trainer.optimizer.state[next(trainer.model.parameters())].items()}
    with caplog.at_level(logging.WARNING):
        trainer.fit(until_step=3)
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in model.items())  # no update
    assert all(torch.equal(v, trainer.ema.shadow[k]) for k, v in ema.items())
    state = trainer.optimizer.state[next(trainer.model.parameters())]
    assert all(torch.equal(v, state[k]) for k, v in adam.items())  # moments and AdamW's step count
    assert "step 3: no checkpoint written: the last 1 steps were non-finite" in caplog.text
    out = trainer.fit()
    log = out.history
    assert math.isnan(log[2]["grad_norm"]) and [r["skipped_steps"] for r in log] == [0, 0, 1, 1, 1, 1]
    assert log[2]["lr"] == log[1]["lr"] != log[3]["lr"]  # the schedule waits for the skipped step
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [6]
    saved = ckpt.load_checkpoint(out.checkpoint_dir)["trainer_state"]
    assert (saved["step"], saved["updates"], saved["skipped"]) == (6, 5, 1)


@pytest.mark.usefixtures("tiny_run_copy")
def test_diverging_run_stops_non_zero_and_keeps_its_last_finite_checkpoint(tmp_path):
    base, cache = tiny_run(tmp_path)
    out = tmp_path / "run"
    # keep_last=1 with a checkpoint every step: the setting that used to prune every finite one away.
    cmd = [sys.executable, "-m", "medim", "train", "--config", str(REPO / "configs/tiny.yaml"), f"model.init={base}",
           f"data.cache={cache}", f"train.output_dir={out}", "optim.lr=1e5", "train.max_steps=30",
           "checkpoint.every=1", "checkpoint.keep_last=1", "log.every=1", "eval.every=0", "train.max_bad_steps=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode != 0
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("medim train: training diverged at step") and "train.max_bad_steps=3" in message
    assert not (out / "final").exists()
    latest = ckpt.find_checkpoint(out / "checkpoints", "latest")
    state = ckpt.load_checkpoint(latest)  # verified against its checksums
    assert all(t.isfinite().all() for t in state["model"].values())
    diverged_at = int(message.split("diverged at step ")[1].split(":")[0])
    assert state["trainer_state"]["step"] < diverged_at and str(latest) in message
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] >= 3


# ---------------------------------------------------------------- resume settings (item 6)
@pytest.mark.usefixtures("tiny_run_copy")
def test_resume_refuses_changed_settings_unless_allowed(tmp_path, caplog):
    common = ("train.max_steps=4", "checkpoint.every=2", "optim.scheduler=constant_with_warmup", "optim.warmup_steps=0")
    _trainer(tmp_path, "run", *common).fit(until_step=2)
    resume = (*common, "checkpoint.resume=latest")
    with pytest.raises(ResumeRefused) as refused:
        _trainer(tmp_path, "run", *resume, "optim.lr=1e-3", "train.seed=5", "train.global_batch_size=16",
                 "log.every=2", "checkpoint.keep_last=5", "train.max_steps=6")
    message = str(refused.value)
    listed = [line.strip() for line in message.splitlines() if line.startswith("  ")]
    # log.every and keep_last cannot change the weights; max_steps cannot under a constant schedule.
    assert listed == ["optim.lr: 0.003 -> 0.001", "train.global_batch_size: 8 -> 16", "train.seed: 0 -> 5"]
    assert "checkpoint.allow_changed=[optim.lr,train.global_batch_size,train.seed]" in message
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, "run", *resume, "optim.lr=1e-3", "checkpoint.allow_changed=[optim.lr]")
    assert trainer.step == 2 and "optim.lr: 0.003 -> 0.001" in caplog.text
    trainer.fit(until_step=3)
    assert trainer.history[-1]["lr"] == pytest.approx(1e-3)
    assert trainer.optimizer.param_groups[0]["lr"].item() == pytest.approx(1e-3)  # what the fused kernel used

    path = trainer.last_checkpoint
    cfg, data = trainer.cfg, json.loads((path / "trainer_state.json").read_text())["data"]
    with pytest.raises(ResumeRefused, match=r"world_size: 1 -> 2"):
        check_settings(path, cfg, 2, {"data": data})
    with pytest.raises(ResumeRefused, match=r"data.cache \(contents\)"):
        check_settings(path, cfg, 1, {"data": {**data, "items": 99}})
    cfg.checkpoint.allow_changed = ["optim", "world_size", "data.cache"]
    assert len(check_settings(path, cfg, 2, {"data": {**data, "items": 99}})) == 3


# ---------------------------------------------------------------- damaged checkpoints and logs (item 7)
@pytest.mark.usefixtures("tiny_run_copy")
def test_truncated_latest_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    common = ("train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=0")
    straight = _trainer(tmp_path, "run", *common)
    straight.fit()
    damaged = tmp_path / "run" / "checkpoints" / "checkpoint_00000004" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    log = tmp_path / "run" / "log.jsonl"
    log.write_text(log.read_text() + '{"loss": 4.1, "st')  # a line cut short by a kill
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is damaged"):
        ckpt.load_checkpoint(damaged.parent)  # an explicit checkpoint names the file
    with caplog.at_level(logging.WARNING):
        resumed = _trainer(tmp_path, "run", *common, "checkpoint.resume=latest")
    assert resumed.step == 2 and damaged.exists()  # fell back, the damaged one kept
    assert "checkpoint_00000004: model.safetensors is damaged" in caplog.text
    assert "log.jsonl line 5 is not JSON" in caplog.text
    resumed.fit()
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in straight.model.state_dict().items())
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    ckpt.verify_checkpoint(damaged.parent)  # rewritten whole


def test_checkpoint_checksums_catch_every_kind_of_damage(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def write(step):
        return ckpt.save_checkpoint(tmp_path, step, model_state=model.state_dict(),
                                    optim_state=get_optimizer_state_dict(model, opt), trainer_state={"step": step},
                                    rng_states=[ckpt.capture_rng()], config_yaml="a: 1\n")

    first, second = write(1), write(2)
    manifest = json.loads((second / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                      "trainer_state.json", "config.yaml"}
    opt_file = second / "optimizer.safetensors"
    data = bytearray(opt_file.read_bytes())
    data[-1] ^= 1  # same size, one bit flipped
    opt_file.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors is damaged .*sha256"):
        ckpt.verify_checkpoint(second)
    assert ckpt.find_checkpoint(tmp_path, "latest") == first
    (first / "manifest.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint.*manifest.json is damaged"):
        ckpt.find_checkpoint(tmp_path, "latest")
    (first / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="has no manifest.json"):
        ckpt.find_checkpoint(tmp_path, str(first))
    (second / "trainer_state.json").write_text("{")  # no checksum check: the parse error names the file
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json is damaged or unreadable"):
        ckpt.load_checkpoint(second, verify=False)


# ---------------------------------------------------------------- permissions (item 8)
@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_get_the_umask_permissions(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a.png").write_bytes(b"x")
        with atomic_file(tmp_path / "manifest.jsonl") as f:
            f.write("{}\n")
        model = torch.nn.Linear(2, 2)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        path = ckpt.save_checkpoint(tmp_path / "ckpt", 1, model_state=model.state_dict(),
                                    optim_state=get_optimizer_state_dict(model, torch.optim.AdamW(model.parameters())),
                                    trainer_state={"step": 1}, rng_states=[ckpt.capture_rng()], config_yaml="a: 1\n")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "out") == mode(path) == dir_mode
    assert {mode(p) for p in [tmp_path / "out" / "a.png", tmp_path / "manifest.jsonl", *path.iterdir(),
                              tmp_path / "ckpt" / "latest"]} == {file_mode}


# ---------------------------------------------------------------- SIGKILL at every stage
DRIVER = textwrap.dedent('''
    """Run `medim train ARGS`, SIGKILLing the process at POINT of step AT: python driver.py POINT AT ARGS."""
    import os, signal, sys, types
    from pathlib import Path

    import torch

    from medim.cli import main
    from medim.models.vqgan import VQGAN
    from medim.training import checkpoint as ckpt, trainer as tr

    point, at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, before=None, after=None):
        original = getattr(owner, name)
        def wrapped(*a, **k):
            if before and before(*a, **k):
                die()
            out = original(*a, **k)
            if after and after(*a, **k):
                die()
            return out
        setattr(owner, name, wrapped)

    if point == "step":  # between two steps: `at` steps done, nothing saved since the last checkpoint
        wrap(tr.Trainer, "train_step", before=lambda self: self.step == at)
    elif point == "model-file":  # inside the checkpoint write: model.safetensors written, the rest not
        wrap(ckpt, "save_state_dict", after=lambda state, path, metadata=None: (metadata or {}).get("step") == str(at))
    elif point == "manifest":  # every file and the manifest written, the folder not yet renamed into place
        wrap(ckpt, "_write_manifest", after=lambda directory, step: step == at)
    elif point == "latest":  # the folder renamed into place, the `latest` pointer not yet moved to it
        wrap(ckpt, "atomic_file", before=lambda target, mode="w": Path(target).name == "latest"
             and ckpt.list_checkpoints(Path(target).parent)[-1][0] == at)
    elif point == "prune":  # an old checkpoint hidden for deletion, not yet deleted
        ckpt.shutil = types.SimpleNamespace(rmtree=lambda path, ignore_errors=False: ".del-" in str(path) and die())
    elif point == "final":  # inside the final/ export: the model written, the VQGAN not
        wrap(VQGAN, "save_pretrained", before=lambda *a, **k: True)
    sys.exit(main(["train", *args]))
''')


@pytest.mark.slow
@pytest.mark.usefixtures("tiny_run_copy")
def test_sigkill_at_every_stage_resumes_to_the_same_bits(tmp_path):
    base, cache = tiny_run(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def train(out: str, point: str = "none", at: int = 0, resume: bool = True) -> int:
        args = ["--config", str(REPO / "configs/tiny.yaml"), f"model.init={base}", f"data.cache={cache}",
                f"train.output_dir={tmp_path / out}", "train.max_steps=8", "checkpoint.every=2",
                "checkpoint.keep_last=1",
                "log.every=1", "eval.every=0", "optim.ema_decay=0.9", *(["checkpoint.resume=latest"] if resume else [])]
        run = subprocess.run([sys.executable, str(driver), point, str(at), *args], env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode in (0, -signal.SIGKILL), run.stderr[-3000:]
        return run.returncode

    assert train("straight", resume=False) == 0
    # One run, killed again and again; each time resumed with the same command.
    stages = [("step", 3), ("model-file", 4), ("manifest", 4), ("latest", 4), ("prune", 4), ("final", 8)]
    b = tmp_path / "killed"
    for point, at in stages:
        assert train("killed", point, at) == -signal.SIGKILL, (point, at)
        ckpt.load_checkpoint(ckpt.find_checkpoint(b / "checkpoints", "latest"))  # intact after every kill
        if point in ("model-file", "manifest"):  # killed inside the write: only a hidden folder holds it
            assert list((b / "checkpoints").glob(".checkpoint_00000004.tmp-*"))
        if point == "final":
            assert list(b.glob(".final.tmp-*")) and not (b / "final").exists()
    assert train("killed") == 0

    a = tmp_path / "straight"
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["checkpoint_00000008", "latest"]
    for rel in ["checkpoints/checkpoint_00000008/model.safetensors", "checkpoints/checkpoint_00000008/ema.safetensors",
                "checkpoints/checkpoint_00000008/optimizer.safetensors", "final/model/model.safetensors"]:
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}  # noqa: E731
                          for x in (path / "log.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)
