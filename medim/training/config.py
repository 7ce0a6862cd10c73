"""Training configuration: nested dataclasses read from YAML plus `section.key=value` overrides.

Every option is a dataclass field with a comment; `configs/medim_paper.yaml` is the paper's recipe.
Unknown keys, wrong types and out-of-range values raise before anything is built.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["TrainConfig", "load_config", "SCHEDULERS", "PARALLEL_MODES", "PRECISIONS"]

# transformers.get_scheduler names we support (the release used warmup + cosine with restarts).
SCHEDULERS = ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("bf16", "fp32")


@dataclass
class ModelConfig:
    init: str = ""  # MeDiMPipeline directory or Hub repo id to start from (required)
    revision: str | None = None  # Hub revision of `init`
    gradient_checkpointing: bool = False  # recompute block activations in backward (saves memory)


@dataclass
class DataConfig:
    cache: str = ""  # token cache directory written by `medim cache` (required)
    val_size: int = 0  # items held out from the end of the cache for validation loss
    shuffle: bool = True  # reshuffle every epoch (seeded); False reads the cache in order


@dataclass
class OptimConfig:
    lr: float = 1e-5  # peak learning rate of AdamW
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    scheduler: str = "cosine_with_restarts"  # one of SCHEDULERS
    warmup_steps: int = 10_000
    num_cycles: int = 1  # cosine restarts over the run (cosine_with_restarts only)
    ema_decay: float | None = None  # keep an exponential moving average of the weights (e.g. 0.9999)


@dataclass
class DiffusionConfig:
    schedule: str = "loglinear"  # noise schedule name understood by medim.diffusion.schedule
    keep_prefix_prob: float = 0.1  # chance that a report's first sentence stays unmasked
    cond_drop_prob: float = 0.0  # chance that one whole modality is masked and not scored (for CFG)
    cond_keep_prob: float = 0.0  # chance that one whole modality stays clean and is not scored


@dataclass
class TrainSection:
    output_dir: str = "runs/medim"  # checkpoints/, log.jsonl, final/ and samples/ go here
    max_steps: int = 1000  # optimizer steps
    global_batch_size: int = 512  # samples per optimizer step over all ranks
    micro_batch_size: int = 1  # samples per forward on one rank; accumulation fills the rest
    seed: int = 0
    precision: str = "bf16"  # one of PRECISIONS; bf16 = autocast, fp32 master weights
    parallel: str = "auto"  # one of PARALLEL_MODES; auto = DDP when several ranks, else none
    device: str = "auto"  # auto = this rank's CUDA device if present, else cpu


@dataclass
class LogConfig:
    every: int = 10  # optimizer steps between log lines (console + log.jsonl)
    tensorboard: bool = False  # also write TensorBoard events (needs `tensorboard` installed)
    wandb_project: str | None = None  # also log to this W&B project (needs `wandb` installed)


@dataclass
class EvalConfig:
    every: int = 1000  # steps between validations; 0 = never
    prompts: list[str] = field(default_factory=list)  # prompts for sampled image-report pairs
    num_inference_steps: int = 32  # sampler steps for those pairs


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (the last step is always saved); 0 = end only
    keep_last: int = 3  # keep only the newest k checkpoints; 0 keeps all
    resume: str | None = None  # None, "latest" (in output_dir) or a checkpoint directory


@dataclass
class TrainConfig:
    """Everything a training run needs. Build with `load_config(path, overrides)`.

    Example:
        >>> cfg = load_config("configs/tiny.yaml", ["optim.lr=3e-4", "train.max_steps=20"])
        >>> cfg.optim.lr
        0.0003
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        _check(bool(self.model.init), "model.init", "a MeDiMPipeline directory or Hub repo id")
        _check(bool(self.data.cache), "data.cache", "a token cache directory (see `medim cache`)")
        _check(self.data.val_size >= 0, "data.val_size", "an integer >= 0")
        _check(self.optim.lr > 0, "optim.lr", "a float > 0")
        _check(all(0 <= b < 1 for b in self.optim.betas) and len(self.optim.betas) == 2,
               "optim.betas", "two floats in [0, 1)")
        _check(self.optim.eps > 0, "optim.eps", "a float > 0")
        _check(self.optim.weight_decay >= 0, "optim.weight_decay", "a float >= 0")
        _check(self.optim.grad_clip >= 0, "optim.grad_clip", "a float >= 0 (0 disables)")
        _check(self.optim.scheduler in SCHEDULERS, "optim.scheduler", f"one of {SCHEDULERS}")
        _check(self.optim.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0")
        _check(self.optim.num_cycles >= 1, "optim.num_cycles", "an integer >= 1")
        _check(self.optim.ema_decay is None or 0 < self.optim.ema_decay < 1,
               "optim.ema_decay", "null or a float in (0, 1)")
        _check(0 <= self.diffusion.keep_prefix_prob <= 1, "diffusion.keep_prefix_prob", "a float in [0, 1]")
        _check(0 <= self.diffusion.cond_drop_prob <= 1, "diffusion.cond_drop_prob", "a float in [0, 1]")
        _check(self.train.max_steps >= 1, "train.max_steps", "an integer >= 1")
        _check(self.train.micro_batch_size >= 1, "train.micro_batch_size", "an integer >= 1")
        _check(self.train.global_batch_size >= self.train.micro_batch_size, "train.global_batch_size",
               "an integer >= train.micro_batch_size")
        _check(self.train.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}")
        _check(self.train.parallel in PARALLEL_MODES, "train.parallel", f"one of {PARALLEL_MODES}")
        _check(self.log.every >= 1, "log.every", "an integer >= 1")
        _check(self.eval.every >= 0, "eval.every", "an integer >= 0")
        _check(self.eval.num_inference_steps >= 1, "eval.num_inference_steps", "an integer >= 1")
        _check(self.checkpoint.every >= 0, "checkpoint.every", "an integer >= 0")
        _check(self.checkpoint.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0")

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step so that the global batch is reached exactly."""
        per_pass = self.train.micro_batch_size * world_size
        if self.train.global_batch_size % per_pass:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} must be a multiple of "
                f"train.micro_batch_size * world_size = {self.train.micro_batch_size} * {world_size}"
            )
        return self.train.global_batch_size // per_pass

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(ok: bool, name: str, accepted: str) -> None:
    if not ok:
        raise ValueError(f"config option {name}: expected {accepted}")


def _coerce(value, tp, name: str):
    """Convert a YAML value to the field type `tp`, or raise naming the option."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config option {name}: expected a list, got {value!r}")
        item = typing.get_args(tp)[0]
        out = [_coerce(v, item, name) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config option {name}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        # YAML 1.1 reads "1e-5" as a string: accept any number-like string.
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"config option {name}: expected a number, got {value!r}")
        if tp is int:
            if float(number) != int(number):
                raise ValueError(f"config option {name}: expected an integer, got {value!r}")
            return int(number)
        return float(number)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"config option {name}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"config option {name}: unsupported field type {tp}")


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or '<root>'}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; accepted: {names}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, data[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, prefix + name)
    return cls(**kwargs)


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r}: expected section.key=value (e.g. optim.lr=1e-4)")
    *sections, leaf = key.strip().split(".")
    node = data
    for s in sections:
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {s} is not a config section")
    node[leaf] = yaml.safe_load(raw)


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply `section.key=value` overrides, validate.

    Example:
        >>> cfg = load_config("configs/medim_paper.yaml", ["model.init=runs/base", "data.cache=cache/"])
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections at the top level")
    for override in overrides:
        _apply_override(data, override)
    return _from_dict(TrainConfig, data)
