"""What a user meets first: `medim --version` names the distribution, and a Hub model that cannot be
reached fails in seconds with one message and no output folder (issue 28)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import medim
from medim.utils import hub

REPO = Path(__file__).resolve().parents[2]
# Generous for a loaded machine: before, the same command spent about a minute in the Hub's retries.
FAIL_FAST_S = 30


def medim_cli(*argv: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(REPO), "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "medim", *argv], cwd=cwd, env=env, capture_output=True, text=True)


def test_version_names_the_distribution(tmp_path):
    done = medim_cli("--version", cwd=tmp_path, env=dict(os.environ))
    assert done.returncode == 0 and done.stdout.strip() == f"medim-diffusion {medim.__version__}"
    assert medim.DISTRIBUTION == "medim-diffusion"


@pytest.mark.parametrize("offline", ["0", "1"])
def test_generate_without_the_hub_fails_fast(tmp_path, offline):
    """The default --model is the released checkpoint on the Hub. With no route to it (an endpoint
    nothing listens on stands in for an offline machine) or with HF_HUB_OFFLINE=1, and nothing in the
    cache: one line naming the ways out, in seconds, and no output folder."""
    (tmp_path / "p.txt").write_text("Frontal chest radiograph.\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE=offline, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    start = time.monotonic()
    done = medim_cli("generate", "pairs", "--prompts", "p.txt", "--out", "x", cwd=tmp_path, env=env)
    seconds = time.monotonic() - start
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("medim generate: cannot load --model JiaMao/medim_ckpts: not in the local Hugging Face "
                               "cache")
    assert "--model medim-demo" in lines[0] and "a folder" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert ("HF_HUB_OFFLINE=1 forbids" if offline == "1" else "the Hub cannot be reached") in lines[0]
    assert seconds < FAIL_FAST_S
    assert not (tmp_path / "x").exists()


def test_a_cached_repo_loads_from_the_cache_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_unreachable", lambda endpoint: "the Hub cannot be reached (test)")
    options = hub.HubOptions(cache_dir=tmp_path)
    with pytest.raises(hub.HubUnreachableError, match="org/model: not in the local Hugging Face cache"):
        hub.hub_fetch_options("org/model", options)
    (tmp_path / "models--org--model" / "snapshots" / "abc").mkdir(parents=True)
    assert hub.hub_fetch_options("org/model", options).local_files_only
    with pytest.raises(hub.HubUnreachableError):  # a dataset of that name is not cached
        hub.hub_fetch_options("org/model", options, repo_type="dataset")
    monkeypatch.setattr(hub, "_unreachable", lambda endpoint: None)  # the Hub answers: the options as given
    assert hub.hub_fetch_options("org/other", options) == options


def test_train_says_where_final_is_and_the_last_losses(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    import medim.training
    from medim.cli import main

    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "loss_text": 1.25}, {"step": 2, "val_loss": 1.75}]
    out = SimpleNamespace(step=2, final_dir=tmp_path / "final", history=history)
    config = SimpleNamespace(train=SimpleNamespace(output_dir=str(tmp_path / "run"), parallel="auto"),
                             distill=SimpleNamespace(teacher=""), lora=SimpleNamespace(r=0))
    monkeypatch.setattr(medim.training, "load_config", lambda path, overrides: config)
    monkeypatch.setattr(medim.training, "train", lambda config: out)
    assert main(["train"]) == 0
    assert capsys.readouterr().out == (f"medim train: finished at step 2; trained pipeline in {tmp_path / 'final'} "
                                       "(last logged: loss 1.5, loss_text 1.25, val_loss 1.75)\n")
    config.lora.r = 16  # a LoRA run's final/ is an adapter, used with --lora
    assert main(["train"]) == 0
    assert capsys.readouterr().out.startswith(f"medim train: finished at step 2; LoRA adapter in {tmp_path / 'final'} "
                                              f"(use it with --lora {tmp_path / 'final'})")
    # Under torchrun every rank has final/; only rank 0 says so. A process that ran a process group
    # then leaves without the interpreter's teardown (gloo's threads abort it there at random).
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append((code, capsys.readouterr().out)))
    for rank, parallel in (("1", "auto"), ("0", "fsdp")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2" if parallel == "auto" else "1")
        config.train.parallel = parallel
        assert main(["train"]) == 0
    assert [code for code, _ in exits] == [0, 0]
    assert exits[0][1] == "" and exits[1][1].startswith("medim train: finished at step 2; LoRA adapter")
    monkeypatch.setenv("WORLD_SIZE", "1")
    config.train.parallel = "none"
    assert main(["train"]) == 0 and len(exits) == 2  # no group: the usual exit
