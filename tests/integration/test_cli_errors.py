"""The command line's one error boundary (issue 27): expected errors as `medim COMMAND: message`
without a traceback, unexpected ones said to be bugs, `--debug` / MEDIM_DEBUG=1 for the traceback;
and the `medim evaluate`, `medim train` and `medim generate` cases that used to end in tracebacks."""

import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from medim.cli import main
from medim.commands import evaluate as evaluate_command


def stop(*argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        main([*map(str, argv)])
    assert stopped.value.code not in (0, None)
    return str(stopped.value.code)


def test_expected_and_unexpected_errors(tmp_path, monkeypatch):
    message = stop("evaluate", "reports", "--pred", tmp_path / "nope", "--ref", tmp_path / "nope")
    assert message == f"medim evaluate: {tmp_path / 'nope'} is not a folder or a manifest.jsonl"

    def broken(args):
        raise RuntimeError("an internal slip")

    monkeypatch.setattr(evaluate_command, "run", broken)
    message = stop("evaluate", "reports", "--pred", "a", "--ref", "b")
    assert message.startswith("medim evaluate: unexpected RuntimeError: an internal slip\nThis is a bug in medim")
    assert "medim --debug evaluate" in message and "MEDIM_DEBUG=1" in message
    with pytest.raises(RuntimeError, match="an internal slip"):
        main(["--debug", "evaluate", "reports", "--pred", "a", "--ref", "b"])
    monkeypatch.setenv("MEDIM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="an internal slip"):
        main(["evaluate", "reports", "--pred", "a", "--ref", "b"])


def test_a_real_process_prints_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("MEDIM_DEBUG", None)
    run = subprocess.run([sys.executable, "-m", "medim", "evaluate", "reports", "--pred", str(tmp_path / "x"),
                          "--ref", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"medim evaluate: {tmp_path / 'x'} is not a folder or a manifest.jsonl"


def _folder(path, n=3):
    path.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


@pytest.mark.parametrize("weights, match", [
    ("missing.pth", "missing.pth"),
    ("garbage.pth", "is not a readable PyTorch state dict of tensors"),
    ("pickled.pth", "is not a readable PyTorch state dict of tensors"),
    ("list.pth", "does not hold a state dict of tensors"),
    ("garbage.safetensors", "is not a readable safetensors file"),
])
def test_evaluate_fid_bad_weights(weights, match, tmp_path):
    real, fake = _folder(tmp_path / "real"), _folder(tmp_path / "fake")
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage" * 10)
    torch.save({"w": datetime.datetime(2020, 1, 1)}, tmp_path / "pickled.pth")  # an object weights_only refuses
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    message = stop("evaluate", "fid", "--real", real, "--fake", fake, "--weights", tmp_path / weights,
                   "--device", "cpu")
    assert message.startswith("medim evaluate: ") and match in message
    assert "weights_only=False" not in message and "\n" not in message


def test_evaluate_folders_reports_and_output(tmp_path):
    real = _folder(tmp_path / "real")
    (tmp_path / "empty").mkdir()
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    assert "holds no images" in stop("evaluate", "fid", "--real", real, "--fake", tmp_path / "empty",
                                     "--weights", weights)
    assert "is not a folder of images" in stop("evaluate", "fid", "--real", real, "--fake", tmp_path / "nope",
                                               "--weights", weights)
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "a.txt").write_bytes("no p\xe9nible finding".encode("latin-1"))
    message = stop("evaluate", "reports", "--pred", pred, "--ref", pred, "--wordnet", "none")
    assert message.startswith(f"medim evaluate: {pred / 'a.txt'} is not valid UTF-8")
    (pred / "a.txt").write_text("no finding")
    assert f"--output: {tmp_path} is a folder" in stop("evaluate", "reports", "--pred", pred, "--ref", pred,
                                                      "--wordnet", "none", "--output", tmp_path)
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"id": "a", "report": "x"}\n\xff\xfe\n')
    assert f"{manifest}: not valid UTF-8" in stop("evaluate", "reports", "--pred", manifest, "--ref", pred,
                                                  "--wordnet", "none")


def test_fid_names_an_unreadable_image(tmp_path):
    from medim.evaluation.fid import fid

    real, fake = _folder(tmp_path / "real"), _folder(tmp_path / "fake")
    whole = (fake / "1.png").read_bytes()
    (fake / "1.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"{fake / '1.png'}.*remove or replace it"):
        fid(real, fake, feature_extractor=lambda x: x.mean((2, 3)), device="cpu")


@pytest.mark.parametrize("override, match", [
    ("optim.lr=nan", "optim.lr: expected a finite float > 0"),
    ("optim.lr=-1", "optim.lr: expected a finite float > 0"),
    ("optim.lr=inf", "optim.lr: expected a finite float > 0"),
    ("train.max_bad_steps=0", "train.max_bad_steps: expected an integer >= 1"),
    ("train.max_bad_steps=-1", "train.max_bad_steps: expected an integer >= 1"),
    ("train.max_bad_steps=1.5", "train.max_bad_steps: expected an integer"),
    ("train.max_bad_steps=x", "train.max_bad_steps: expected an integer"),
    ("train.max_bad_steps=null", "train.max_bad_steps: expected an integer"),
    ("checkpoint.allow_changed=x", "checkpoint.allow_changed: expected a list of strings"),
    ("checkpoint.allow_changed=[[1]]", "checkpoint.allow_changed: expected a list of option names"),
    ("checkpoint.allow_changed=[optim.lrr]", "unknown: \\['optim.lrr'\\]"),
    ("diffusion.schedule=x", "diffusion.schedule: expected one of \\['cosine', 'linear', 'loglinear'\\]"),
    ("data.shuffle=maybe", "data.shuffle"),
    ("train.device=tpu", "train.device: expected auto, cpu, or a device torch knows and this machine has"),
    ("train.device=cuda:99", "train.device: expected auto, cpu, or a device"),
])
def test_train_config_values_are_checked_when_read(override, match):
    message = stop("train", "model.init=x", "data.cache=y", override)
    assert message.startswith("medim train: config option") and pytest.importorskip("re").search(match, message)


def test_train_log_and_checkpoint_state_errors(tmp_path):
    from medim.training import checkpoint as ckpt
    from medim.training.config import load_config
    from medim.training.logs import RunLog

    cfg = load_config(None, ["model.init=x", "data.cache=y"])
    (tmp_path / "run" / "log.jsonl").mkdir(parents=True)
    with pytest.raises(ValueError, match="log.jsonl is not a file"):
        RunLog(tmp_path / "run", cfg, 0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "log.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": "abc"}\n{"step": 9}\n')
    RunLog(tmp_path / "other", cfg, 5)  # bad bytes and a bad step dropped, later steps trimmed
    assert (tmp_path / "other" / "log.jsonl").read_text() == '{"step": 1}\n'

    model = torch.nn.Linear(3, 2)
    path = ckpt.save_checkpoint(tmp_path / "c", 1, model_state=model.state_dict(),
                                optim_state={"state": {}, "param_groups": []}, trainer_state={"step": "abc"},
                                rng_states=[ckpt.capture_rng()], config_yaml="a: 1\n")
    with pytest.raises(ckpt.CheckpointError, match="trainer_state.json is damaged .*\"step\" must be an integer"):
        ckpt.load_checkpoint(path)


def test_generate_empty_mask_is_named_by_file_before_the_model_loads(tmp_path, monkeypatch):
    from medim.pipelines.pipeline import MeDiMPipeline

    Image.new("L", (64, 64), 128).save(tmp_path / "image.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "blank.png")
    monkeypatch.setattr(MeDiMPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    message = stop("generate", "inpaint", "--model", "medim-demo", "--images", tmp_path / "image.png",
                   "--masks", tmp_path / "blank.png", "--out", tmp_path / "o")
    assert message.startswith(f"--masks: {tmp_path / 'blank.png'} selects nothing")


# ---- found by benchmarks/probe_reliability.py ------------------------------------------------------


def test_result_files_are_written_only_over_medims_own(tmp_path):
    """`score --out` and `evaluate --output` named a user's file: it was replaced. Now refused
    before any compute; a previous result of medim's is replaced."""
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "a.txt").write_text("no finding")
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "own results"}\n')
    args = ["evaluate", "reports", "--pred", pred, "--ref", pred, "--wordnet", "none", "--output"]
    assert "--output: " + str(mine) + " exists and is not a result medim wrote" in stop(*args, mine)
    assert mine.read_text() == '{"my": "own results"}\n'
    result = tmp_path / "result.json"
    assert main([*map(str, args), str(result)]) == 0
    assert json.loads(result.read_text())["medim"] == "evaluate reports"
    assert main([*map(str, args), str(result)]) == 0  # medim's own result: replaced
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    (tmp_path / "r.txt").write_text("no finding\n")
    scores = tmp_path / "scores.jsonl"
    scores.write_text("my scores\n")
    score = ["score", "--model", "medim-demo", "--images", tmp_path / "a.png", "--reports", tmp_path / "r.txt",
             "--num-samples", "2", "--device", "cpu", "--out", scores]
    assert "exists and is not a result medim wrote" in stop(*score)
    assert scores.read_text() == "my scores\n"
    scores.unlink()
    assert main(list(map(str, score))) == 0 and main(list(map(str, score))) == 0
    assert json.loads(scores.read_text().splitlines()[0])["medim"] == "score"


def test_evaluate_refuses_an_empty_metric_list_and_an_unknown_device(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "a.txt").write_text("no finding")
    assert "--metrics ',' names no metric" in stop("evaluate", "reports", "--pred", pred, "--ref", pred, "--metrics",
                                                   ",")
    assert "--device: device must be a torch.device" in stop("evaluate", "fid", "--real", pred, "--fake", pred,
                                                             "--device", "tpu")


@pytest.mark.parametrize("name, text", [("log.jsonl", "my log\n"), ("final/README.md", "my notes\n"),
                                        ("checkpoints/notes.txt", "my notes\n"), ("notes.txt", "my notes\n")])
def test_train_output_dir_holding_a_users_files_is_refused(name, text, tmp_path, monkeypatch):
    from medim import training

    monkeypatch.setattr(training, "train", lambda cfg: pytest.fail("training started"))
    (tmp_path / "run" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / name).write_text(text)
    message = stop("train", "model.init=x", "data.cache=y", f"train.output_dir={tmp_path / 'run'}")
    assert message.startswith("medim train: config option train.output_dir:") and "did not write" in message
    assert (tmp_path / "run" / name).read_text() == text


def test_train_output_dir_of_a_run_is_accepted(tmp_path):
    from medim.training.resume import check_output_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint_00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("checkpoint_00000002\n")
    (run / "final").mkdir()
    (run / "final" / "model_index.json").write_text("{}")
    (run / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (run / "samples" / "step_00000002").mkdir(parents=True)
    check_output_dir(run)
    (run / "log.jsonl").write_text('"a step"\n')  # JSON, but not a run log's line
    with pytest.raises(ValueError, match="holds log.jsonl"):
        check_output_dir(run)


def test_train_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    assert f"config file {tmp_path / 'bad.yaml'} is not valid YAML" in stop("train", "--config", tmp_path / "bad.yaml")
    (tmp_path / "latin.yaml").write_bytes("optim: {lr: 1}\n# l\xe9sion\n".encode("latin-1"))
    assert f"config file {tmp_path / 'latin.yaml'} is not valid UTF-8" in stop("train", "--config",
                                                                               tmp_path / "latin.yaml")


def test_a_taming_config_that_is_not_one_names_its_file(tmp_path):
    from medim.models.vqgan import VQGANConfig

    (tmp_path / "notes.txt").write_text("just text\n")
    with pytest.raises(ValueError, match=f"taming config {tmp_path / 'notes.txt'} must be a mapping, got str"):
        VQGANConfig.from_taming(tmp_path / "notes.txt")
    (tmp_path / "list.yaml").write_text("model: [1, 2]\n")
    with pytest.raises(ValueError, match="has no model.params.ddconfig section"):
        VQGANConfig.from_taming(tmp_path / "list.yaml")
