"""Training config: presets, overrides, OmegaConf type conversion, and the errors for bad options."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medim.training.config import DataConfig, ModelConfig, TrainConfig, load_config
from medim.training.optim import build_optimizer

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ["model.init=m", "data.cache=c"]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_config_presets_and_overrides():
    cfg = load_config(REPO / "configs/medim_paper.yaml", REQUIRED)
    o = cfg.optim
    assert (o.lr, o.betas, o.weight_decay, o.grad_clip) == (1e-5, (0.9, 0.999), 0.0, 1.0)
    assert (o.scheduler, o.warmup_steps) == ("cosine_with_restarts", 10_000)
    assert (cfg.train.global_batch_size, cfg.diffusion.schedule,
            cfg.diffusion.keep_prefix_prob) == (512, "loglinear", 0.1)
    assert (cfg.train.parallel, cfg.checkpoint.resume, cfg.optim.ema_decay) == ("fsdp", "latest", None)
    assert cfg.accumulation_steps(8) == 8
    cfg = load_config(REPO / "configs/tiny.yaml", [*REQUIRED, "optim.lr=1e-4", "eval.prompts=[a, b]"])
    assert cfg.optim.lr == 1e-4 and cfg.eval.prompts == ["a", "b"]
    assert (cfg.train.max_steps, cfg.train.precision, cfg.optim.scheduler) == (60, "fp32", "cosine")


def test_defaults_without_a_file():
    cfg = load_config(None, REQUIRED)
    assert cfg == TrainConfig(model=ModelConfig(init="m"), data=DataConfig(cache="c"))


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], r"unknown config key 'optim.lrr' \(did you mean optim.lr\?\); accepted: \['lr', 'betas'"),
    (["trian.seed=1"], r"unknown config key 'trian' \(did you mean train\?\)"),
    (["eval.prompts.x=1"], "config option eval.prompts: takes no sub-key 'x'"),
    (["optim.lr=-1"], "optim.lr: expected a finite float > 0"),
    (["optim.lr=fast"], "optim.lr: expected a float, got 'fast'"),
    (["optim.scheduler=step"], "optim.scheduler: expected one of"),
    (["train.max_steps=1.5"], "train.max_steps: expected an integer, got '1.5'"),
    (["train.max_steps=ten"], "train.max_steps: expected an integer, got 'ten'"),
    (["train.precision=fp16"], "train.precision: expected one of"),
    (["log.tensorboard=maybe"], "log.tensorboard: expected true or false"),
    (["data.cache="], "data.cache: expected a string"),
    (["model.init=null"], "model.init: expected a string"),
    (["optim.ema_decay=high"], "optim.ema_decay: expected null or a float"),
    (["optim.ema_decay=1"], r"optim.ema_decay: expected null or a float in \(0, 1\)"),
    (["eval.prompts=hello"], "eval.prompts: expected a list of strings, got 'hello'"),
    (["eval.prompts=[a, [b]]"], "eval.prompts: expected a list of strings"),
    (["optim.betas=0.9"], "optim.betas: expected a list of 2 floats"),
    (["optim.betas=[0.9, x]"], "optim.betas: expected a list of 2 floats"),
    (["optim.betas=[0.9, [0.99]]"], r"optim.betas: expected two floats in \[0, 1\)"),
    (["optim.betas=[0.9, 1.0]"], r"optim.betas: expected two floats in \[0, 1\)"),
    (["optim=3"], r"config option optim: expected a mapping of \['lr'"),
    (["diffusion.cond_keep_prob=1.5"], r"diffusion.cond_keep_prob: expected a float in \[0, 1\]"),
    (["diffusion.cond_keep_prob=-0.1"], r"diffusion.cond_keep_prob: expected a float in \[0, 1\]"),
    (["train.output_dir=runs/${nope}"], "config option train.output_dir: .*nope"),
    (["optim"], "expected section.key=value"),
    (["=3"], "expected section.key=value"),
])
def test_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(REPO / "configs/tiny.yaml", [*REQUIRED, *override])


def test_betas_three_items_rejected():
    # OmegaConf >= 2.4 rejects the length itself, 2.3 leaves it to validate(); both name the option.
    with pytest.raises(ValueError, match="optim.betas: expected"):
        load_config(None, [*REQUIRED, "optim.betas=[0.9, 0.99, 0.999]"])


def test_yaml_file_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim.learning_rate'; accepted: \['lr'"):
        load_config(_yaml(tmp_path, "optim:\n  learning_rate: 1.0e-4\n"), REQUIRED)
    with pytest.raises(ValueError, match=r"unknown config key 'trainer' \(did you mean train\?\); accepted: \['model'"):
        load_config(_yaml(tmp_path, "trainer:\n  max_steps: 3\n"), REQUIRED)
    with pytest.raises(ValueError, match="train.max_steps: expected an integer, got 'many'"):
        load_config(_yaml(tmp_path, "train:\n  max_steps: many\n"), REQUIRED)
    with pytest.raises(ValueError, match=r"optim.betas: expected a list of 2 floats, got \[0.9, 'b'\]"):
        load_config(_yaml(tmp_path, "optim:\n  betas: [0.9, b]\n"), REQUIRED)
    with pytest.raises(ValueError, match="expected a mapping of sections at the top level"):
        load_config(_yaml(tmp_path, "- optim\n"), REQUIRED)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", REQUIRED)


def test_yaml_number_like_strings_null_and_empty_section(tmp_path):
    path = _yaml(tmp_path, (
        "model:\n  revision: null\n"
        "optim:\n  lr: 1e-5\n  eps: '1e-7'\n  warmup_steps: '250'\n  ema_decay: null\n"
        "log:\n"  # every key commented out: the section keeps its defaults
        "eval:\n  prompts: [one, 'two words']\n"
    ))
    cfg = load_config(path, REQUIRED)
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # PyYAML alone would read "1e-5" as a string
    assert cfg.optim.eps == 1e-7 and cfg.optim.warmup_steps == 250 and isinstance(cfg.optim.warmup_steps, int)
    assert cfg.optim.ema_decay is None and cfg.model.revision is None
    assert cfg.log.every == 10 and cfg.eval.prompts == ["one", "two words"]


def test_overrides_types_nulls_lists_and_interpolation():
    cfg = load_config(REPO / "configs/medim_paper.yaml", [
        *REQUIRED, "optim.lr='2e-4'", "train.seed=7", "train.output_dir=runs/seed${train.seed}",
        "checkpoint.resume=null", "optim.ema_decay=0.999", "model.revision=main",
        "eval.prompts=[a chest radiograph, 'no acute findings.']", "optim.betas=[0.8, 0.95]",
    ])
    assert cfg.optim.lr == 2e-4 and cfg.train.output_dir == "runs/seed7"
    assert cfg.checkpoint.resume is None and cfg.optim.ema_decay == 0.999 and cfg.model.revision == "main"
    assert cfg.eval.prompts == ["a chest radiograph", "no acute findings."]
    assert cfg.optim.betas == (0.8, 0.95) and isinstance(cfg.optim.betas, tuple)
    assert load_config(REPO / "configs/medim_paper.yaml", [*REQUIRED, "eval.prompts=[]"]).eval.prompts == []


def test_save_roundtrip(tmp_path):
    cfg = load_config(REPO / "configs/medim_paper.yaml", [*REQUIRED, "eval.prompts=[a, b]", "optim.ema_decay=0.99"])
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_accumulation_must_divide():
    cfg = load_config(REPO / "configs/tiny.yaml", [*REQUIRED, "train.global_batch_size=12"])
    with pytest.raises(ValueError, match="multiple of train.micro_batch_size"):
        cfg.accumulation_steps(2)


def test_direct_construction_validates():
    cfg = TrainConfig(model=ModelConfig(init="m"), data=DataConfig(cache="c"))
    assert cfg.optim.betas == (0.9, 0.999)
    with pytest.raises(ValueError, match="model.init"):
        TrainConfig(data=DataConfig(cache="c"))


def test_missing_omegaconf_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # makes `import omegaconf` raise ImportError
    with pytest.raises(ImportError, match=r"medim train needs omegaconf: pip install 'medim-diffusion\[train\]'"):
        load_config(REPO / "configs/tiny.yaml", REQUIRED)
    assert TrainConfig(model=ModelConfig(init="m"), data=DataConfig(cache="c")).train.max_steps == 1000


def test_config_module_imports_without_omegaconf():
    code = ("import sys; sys.modules['omegaconf'] = None\n"
            "from medim.training.config import DataConfig, ModelConfig, TrainConfig\n"
            "print(TrainConfig(model=ModelConfig(init='m'), data=DataConfig(cache='c')).optim.lr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1e-05"


def test_build_optimizer_uses_config():
    cfg = load_config(REPO / "configs/medim_paper.yaml", REQUIRED)
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (1e-5, (0.9, 0.999), 0.0)
    assert math.isclose(g["eps"], 1e-8)
