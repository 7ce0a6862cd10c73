"""Training configuration: nested dataclasses filled by OmegaConf from YAML and `section.key=value` overrides.

Every option is a dataclass field with a comment; `configs/medim_paper.yaml` is the paper's recipe.
Unknown keys, wrong types and out-of-range values raise ValueError naming the option before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medim.diffusion.config import MAX_STEPS, SamplerConfig
from medim.diffusion.schedule import SCHEDULES
from medim.utils.checks import check_int, check_number

__all__ = ["TrainConfig", "load_config", "resume_differences", "SCHEDULERS", "PARALLEL_MODES", "PRECISIONS",
           "FREE_ON_RESUME", "LORA_TARGETS", "DIVERGENCES", "DISTILL_TASKS"]

# transformers.get_scheduler names we support (the release used warmup + cosine with restarts).
SCHEDULERS = ("constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
PRECISIONS = ("bf16", "fp32")
# Options that cannot change the trained weights, so a resumed run may change them freely (a name ending
# in "." is a whole section). Every other option must match the checkpoint's unless it is named in
# checkpoint.allow_changed (docs/training.md, "Resuming", has the table).
# Distillation (medim distill): how a student's step distribution is compared with its teacher's, and
# the tasks whose rows `distill.task_mix` weighs, in its order.
DIVERGENCES = ("kl", "mse")
DISTILL_METHODS = ("sdtt", "sequence")
DISTILL_TASKS = ("text_to_image", "image_to_report", "pairs")
FREE_ON_RESUME = ("log.", "eval.", "checkpoint.", "train.output_dir", "train.max_bad_steps", "distill.student_sampler.")
# ... except the student's commit order: it decides what a distillation's pair rows are (distill.py).
BOUND_ON_RESUME = ("distill.student_sampler.order",)


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

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML and OmegaConf < 2.4 hand over a list


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
    compile: bool = False  # torch.compile each transformer block (one graph, reused by every layer)
    reduce_precision: str = "fp32"  # one of PRECISIONS: FSDP's gradient reduce-scatter under bf16 (bf16 halves it)
    max_bad_steps: int = 10  # stop (non-zero exit) after this many non-finite steps in a row; each is skipped


# LoRA targets by default: the backbone's attention and MLP projections and the AdaLN modulation
# (about 16 % of medim-v1's weights; fine-tuning a MeDiM checkpoint adapts it rather than training it in full).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "adaLN_modulation")


@dataclass
class LoraSection:
    r: int = 0  # LoRA rank; 0 = off (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input, in [0, 1)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # modules given an adapter
    # Modules trained in full beside the adapters, e.g. [adaLN_modulation, time_embedder] when starting
    # from a base MLLM such as Liquid, where they are new (then drop adaLN_modulation from target_modules).
    modules_to_save: list[str] = field(default_factory=list)
    # Words or pieces of text whose token rows (embedding and tied head) train in full, e.g. a new
    # finding's name that the tokenizer splits into rarely seen pieces: [",", "pleural effusion"].
    trainable_tokens: list[str] = field(default_factory=list)


@dataclass
class DistillSection:
    """Few-step distillation (`medim distill`, docs/training.md "Distillation"); off while `teacher` is ""."""

    teacher: str = ""  # pipeline to distil: a folder, a bundled name (medim-demo) or a Hub id; "" = plain training
    teacher_revision: str | None = None  # Hub revision of `teacher`
    method: str = "sdtt"  # one of DISTILL_METHODS: sdtt (step distributions) or sequence (the teacher's reports)
    student_steps: int = 4  # sampler steps of the student (saved as its num_inference_steps)
    teacher_steps: int = 32  # teacher steps each run covers: a multiple of student_steps, at least twice it
    guidance_scale: float | None = None  # teacher's CFG weight in the targets (null: its saved one); > 0 is folded in
    divergence: str = "kl"  # one of DIVERGENCES: kl = KL(teacher || student), mse = squared log-prob error
    task_mix: tuple[float, float, float] = (1.0, 1.0, 1.0)  # weights of text-to-image, image-to-report, pair rows
    noise_scale: float = 0.5  # sequence: weight of the shared Gumbel noise the teacher writes reports under
    noise_seed: int = 0  # sequence: seed of that noise (it picks the phrasing the student learns)
    # The student's saved sampler settings over the teacher's at student_steps (e.g. confidence_temperature).
    student_sampler: dict[str, typing.Any] = field(default_factory=dict)


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
    allow_changed: list[str] = field(default_factory=list)  # options (or sections, or world_size) a resume may change


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
    lora: LoraSection = field(default_factory=LoraSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def __post_init__(self) -> None:
        if self.distill.teacher and not self.model.init:  # a student starts from its teacher's weights
            self.model.init = self.distill.teacher
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        _check(bool(self.model.init), "model.init", "a MeDiMPipeline directory or Hub repo id")
        _check(bool(self.data.cache), "data.cache", "a token cache directory (see `medim cache`)")
        _check(self.data.val_size >= 0, "data.val_size", "an integer >= 0")
        _check(self.optim.lr > 0 and math.isfinite(self.optim.lr), "optim.lr", "a finite float > 0")
        # Item types are checked here too: OmegaConf lets a nested list or mapping into a typed list.
        _check(len(self.optim.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in self.optim.betas),
               "optim.betas", "two floats in [0, 1)")
        _check(self.optim.eps > 0, "optim.eps", "a float > 0")
        _check(self.optim.weight_decay >= 0, "optim.weight_decay", "a float >= 0")
        _check(self.optim.grad_clip >= 0, "optim.grad_clip", "a float >= 0 (0 disables)")
        _check(self.optim.scheduler in SCHEDULERS, "optim.scheduler", f"one of {SCHEDULERS}")
        _check(self.optim.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0")
        _check(self.optim.num_cycles >= 1, "optim.num_cycles", "an integer >= 1")
        _check(self.optim.ema_decay is None or 0 < self.optim.ema_decay < 1,
               "optim.ema_decay", "null or a float in (0, 1)")
        _check(isinstance(self.data.shuffle, bool), "data.shuffle", "true or false")
        _check(self.diffusion.schedule in SCHEDULES, "diffusion.schedule", f"one of {sorted(SCHEDULES)}")
        _check(0 <= self.diffusion.keep_prefix_prob <= 1, "diffusion.keep_prefix_prob", "a float in [0, 1]")
        _check(0 <= self.diffusion.cond_drop_prob <= 1, "diffusion.cond_drop_prob", "a float in [0, 1]")
        _check(0 <= self.diffusion.cond_keep_prob <= 1, "diffusion.cond_keep_prob", "a float in [0, 1]")
        _check(self.train.max_steps >= 1, "train.max_steps", "an integer >= 1")
        _check(self.train.micro_batch_size >= 1, "train.micro_batch_size", "an integer >= 1")
        _check(self.train.global_batch_size >= self.train.micro_batch_size, "train.global_batch_size",
               "an integer >= train.micro_batch_size")
        _check(self.train.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}")
        _check(self.train.parallel in PARALLEL_MODES, "train.parallel", f"one of {PARALLEL_MODES}")
        _check(self.train.reduce_precision in PRECISIONS, "train.reduce_precision", f"one of {PRECISIONS}")
        _check(self.train.device == "auto" or _device_name(self.train.device), "train.device",
               "auto, cpu, or a device torch knows and this machine has (e.g. cuda:0)")
        _check(self.train.max_bad_steps >= 1, "train.max_bad_steps", "an integer >= 1")
        _check(self.log.every >= 1, "log.every", "an integer >= 1")
        _check(self.eval.every >= 0, "eval.every", "an integer >= 0")
        _check(all(isinstance(p, str) for p in self.eval.prompts), "eval.prompts", "a list of strings")
        _check(self.eval.num_inference_steps >= 1, "eval.num_inference_steps", "an integer >= 1")
        _check(self.checkpoint.every >= 0, "checkpoint.every", "an integer >= 0")
        _check(self.checkpoint.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0")
        _check(all(isinstance(k, str) for k in self.checkpoint.allow_changed), "checkpoint.allow_changed",
               "a list of option names (strings)")
        self._validate_lora()
        self._validate_distill()
        unknown = [k for k in self.checkpoint.allow_changed if k != "world_size" and _option_type(k) is None]
        _check(not unknown, "checkpoint.allow_changed",
               f"option names (e.g. optim.lr), section names or world_size; unknown: {unknown}")

    def _validate_lora(self) -> None:
        lora = self.lora
        try:
            check_int(lora.r, "lora.r", minimum=0)
            check_number(lora.alpha, "lora.alpha", minimum=0)
            check_number(lora.dropout, "lora.dropout", minimum=0, maximum=1)
        except ValueError as e:
            raise ValueError(f"config option {e}") from None
        _check(lora.alpha > 0, "lora.alpha", "a float > 0")
        _check(lora.dropout < 1, "lora.dropout", "a float in [0, 1)")
        _check(all(isinstance(t, str) and t.strip() for t in lora.trainable_tokens), "lora.trainable_tokens",
               "a list of words or pieces of text (e.g. [',', 'pleural effusion'])")
        _check(len(set(lora.trainable_tokens)) == len(lora.trainable_tokens), "lora.trainable_tokens",
               f"pieces listed once, got {list(lora.trainable_tokens)}")
        for name in ("target_modules", "modules_to_save"):
            names = getattr(lora, name)
            _check(all(isinstance(n, str) and n.strip() and n == n.strip() for n in names), f"lora.{name}",
                   "a list of module names (e.g. q_proj, adaLN_modulation)")
            _check(len(set(names)) == len(names), f"lora.{name}", f"names listed once, got {list(names)}")
        _check(not self.lora.r or bool(lora.target_modules), "lora.target_modules", "at least one module name")
        both = sorted(set(lora.target_modules) & set(lora.modules_to_save))
        _check(not self.lora.r or not both, "lora.modules_to_save",
               f"names not in lora.target_modules (a module gets an adapter or is trained in full); both: {both}")

    def _validate_distill(self) -> None:
        d = self.distill
        try:
            check_int(d.student_steps, "distill.student_steps", minimum=1, maximum=MAX_STEPS)
            check_int(d.teacher_steps, "distill.teacher_steps", minimum=1, maximum=MAX_STEPS)
            check_number(d.guidance_scale, "distill.guidance_scale", minimum=0, allow_none=True)
            check_number(d.noise_scale, "distill.noise_scale", minimum=0)
            check_int(d.noise_seed, "distill.noise_seed", minimum=0)
        except ValueError as e:
            raise ValueError(f"config option {e}") from None
        _check(d.teacher_steps % d.student_steps == 0 and d.teacher_steps >= 2 * d.student_steps,
               "distill.teacher_steps", f"a multiple of distill.student_steps={d.student_steps}, at least twice it "
               f"(each student step replaces teacher_steps / student_steps teacher steps), got {d.teacher_steps}")
        _check(d.method in DISTILL_METHODS, "distill.method", f"one of {DISTILL_METHODS}")
        fields = {f.name for f in dataclasses.fields(SamplerConfig)} - {"num_inference_steps"}
        _check(isinstance(d.student_sampler, dict) and set(d.student_sampler) <= fields, "distill.student_sampler",
               f"a mapping of sampler settings, of {sorted(fields)} (the steps are distill.student_steps)")
        try:
            SamplerConfig(num_inference_steps=d.student_steps, **d.student_sampler)
        except ValueError as e:
            raise ValueError(f"config option distill.student_sampler: {e}") from None
        _check(d.divergence in DIVERGENCES, "distill.divergence", f"one of {DIVERGENCES}")
        _check(len(d.task_mix) == 3 and all(_is_number(w) and w >= 0 and math.isfinite(w) for w in d.task_mix)
               and sum(d.task_mix) > 0, "distill.task_mix",
               f"three weights >= 0, not all 0, for {list(DISTILL_TASKS)}, got {list(d.task_mix)}")
        _check(not (d.teacher and self.lora.r), "lora.r",
               "0 when distill.teacher is set (a student is a whole pipeline; distil, then adapt it)")

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


def resume_differences(saved: dict, config: TrainConfig) -> list[tuple[str, object, object]]:
    """The options whose value in `config` differs from the checkpoint's `saved` config (a dict as
    stored in its config.yaml) and that can change the trained weights: [(option, old, new)].

    `train.max_steps` only matters through the LR schedule, so it is free under constant_with_warmup.
    Options the saved config lacks (older medim) count with their defaults.
    """
    old, new = _flatten(_defaults(TrainConfig)) | _flatten(saved), _flatten(config.to_dict())
    free = FREE_ON_RESUME
    if old.get("optim.scheduler") == new["optim.scheduler"] == "constant_with_warmup":
        free = (*free, "train.max_steps")
    def is_free(key: str) -> bool:
        return key not in BOUND_ON_RESUME and any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)

    return [(key, old.get(key), value) for key, value in new.items() if old.get(key) != value and not is_free(key)]


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:  # YAML gives lists where the dataclasses hold tuples
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _defaults(tp) -> dict:
    out = {}
    for f in dataclasses.fields(tp):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = _defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def _check(ok: bool, name: str, accepted: str) -> None:
    if not ok:
        raise ValueError(f"config option {name}: expected {accepted}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _device_name(name: str) -> bool:
    """Whether `name` is a device torch parses and, for CUDA, one this machine has."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index is None or device.index < torch.cuda.device_count())
    return device.type != "meta"


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Read a YAML config (or start from defaults), apply `section.key=value` overrides, validate.

    OmegaConf does the reading, merging and type conversion against the dataclasses above (so
    `lr: 1e-5` is a float, `eval.prompts=[a, b]` a list and `${train.seed}` an interpolation);
    `TrainConfig.validate` then checks the ranges.

    Example:
        >>> cfg = load_config("configs/medim_paper.yaml", ["model.init=runs/base", "data.cache=cache/"])
    """
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError as e:
        raise ImportError("medim train needs omegaconf: pip install 'medim-diffusion[train]'") from e

    pieces: list[tuple[str, object, object]] = []  # (option key, value as written, config setting it)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = OmegaConf.create(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, DictConfig):
            raise ValueError(f"config file {path}: expected a mapping of sections at the top level")
        pieces += _file_options(OmegaConf.to_container(data))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {override!r}: expected section.key=value (e.g. optim.lr=1e-4)")
        pieces.append((key.strip(), raw, OmegaConf.from_dotlist([f"{key.strip()}={raw}"])))

    # One option per merge, so that every error names its option: OmegaConf leaves the key out of some
    # (a bad tuple item). Cost, measured: ~20 ms per call (~10 ms of it these merges) plus ~40 ms to
    # import omegaconf, where the former hand-written reader took ~3 ms; paid once per run.
    config = OmegaConf.structured(TrainConfig)
    for key, value, piece in pieces:
        try:
            config.merge_with(piece)
        except OmegaConfBaseException as e:
            raise _option_error(e, key, value) from None
    try:
        return OmegaConf.to_object(config)  # builds TrainConfig, whose __post_init__ validates
    except OmegaConfBaseException as e:  # e.g. an interpolation that does not resolve
        raise _option_error(e, None, None) from None


def _file_options(data: dict) -> Iterator[tuple[str, object, dict]]:
    for section, body in data.items():
        if isinstance(body, dict):
            for key, value in body.items():
                yield f"{section}.{key}", value, {section: {key: value}}
        elif body is not None:  # a section left empty (all keys commented out) keeps its defaults
            yield str(section), body, {section: body}


def _option_type(key: str):
    """The annotated type of option `key` ("optim.lr"), or None when TrainConfig has no such option."""
    tp = TrainConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


_ACCEPTED = {int: ("an integer", "integers"), float: ("a float", "floats"), bool: ("true or false", "booleans"),
             str: ("a string", "strings")}


def _accepted(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {[f.name for f in dataclasses.fields(tp)]}"
    args = typing.get_args(tp)
    if type(None) in args:
        return "null or " + _accepted(next(a for a in args if a is not type(None)))
    if typing.get_origin(tp) is list:
        return f"a list of {_ACCEPTED[args[0]][1]}"
    if typing.get_origin(tp) is tuple:
        return f"a list of {len(args)} {_ACCEPTED[args[0]][1]}"
    return _ACCEPTED[tp][0]


def _option_error(e: Exception, key: str | None, value) -> ValueError:
    """Turn an OmegaConf exception into a ValueError that names the option and what it accepts."""
    from omegaconf.errors import ValidationError

    full_key = getattr(e, "full_key", None)
    if full_key:  # an item's error ("optim.betas[1]") is reported for its option
        key = full_key.partition("[")[0]
    reason = str(e).splitlines()[0]
    if key is None:
        return ValueError(f"config error: {reason}")
    tp = _option_type(key)
    if tp is None:
        section, _, name = key.rpartition(".")
        owner = _option_type(section) if section else TrainConfig
        if not dataclasses.is_dataclass(owner):
            return ValueError(f"config option {section}: takes no sub-key {name!r}")
        names = [f.name for f in dataclasses.fields(owner)]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {section + '.' if section else ''}{close[0]}?)" if close else ""
        return ValueError(f"unknown config key {key!r}{hint}; accepted: {names}")
    got = "" if value is None else f", got {value!r}"
    if isinstance(e, ValidationError):
        return ValueError(f"config option {key}: expected {_accepted(tp)}{got}")
    return ValueError(f"config option {key}: {reason}{got}")
