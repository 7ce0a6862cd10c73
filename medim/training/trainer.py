"""The training loop: token cache -> masked-diffusion loss -> AdamW, on one process or many.

One optimizer step consumes exactly `train.global_batch_size` samples: `accumulation_steps`
micro-batches of `micro_batch_size` on each of `world_size` ranks. The sample stream is a seeded
permutation per epoch (medim.training.distributed.sample_indices), so the step number alone says
where the data stands, and a resumed run reads exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from medim.data.cache import TokenCacheDataset
from medim.diffusion.loss import diffusion_loss
from medim.hub import atomic_directory
from medim.training import checkpoint as ckpt
from medim.training.config import TrainConfig
from medim.training.distributed import all_mean, sample_indices, setup_distributed, wrap_model
from medim.training.optim import EMA, build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainOutput", "train"]


@dataclass
class TrainOutput:
    """What `Trainer.fit` returns: the step reached, the exported pipeline directory (None until
    max_steps is reached), the last checkpoint and the logged metrics (main rank only)."""

    step: int
    final_dir: Path | None
    checkpoint_dir: Path | None
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Train a MeDiMPipeline's model on a token cache.

    Launch with `torchrun --nproc_per_node N -m medim.training --config cfg.yaml`, `medim train`,
    or in Python (one process, or one per rank under torchrun):

    Example:
        >>> from medim.training import Trainer, load_config
        >>> cfg = load_config("configs/tiny.yaml", ["model.init=runs/base", "data.cache=cache/train"])
        >>> out = Trainer(cfg).fit()
        >>> MeDiMPipeline.from_pretrained(out.final_dir)
    """

    def __init__(self, config: TrainConfig, pipeline=None):
        from medim.pipeline import MeDiMPipeline

        config.validate()
        self.cfg = cfg = config
        self.info = setup_distributed(cfg.train.device)
        self.accum = cfg.accumulation_steps(self.info.world_size)
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        data = TokenCacheDataset(cfg.data.cache)
        if cfg.data.val_size >= len(data):
            raise ValueError(f"data.val_size={cfg.data.val_size} must be smaller than the cache ({len(data)} items)")
        self.data = data
        self.num_train = len(data) - cfg.data.val_size

        # Per-rank seeds: ranks must draw different masks/times, but the same initial weights.
        self._seed_everything(cfg.train.seed * 1000 + self.info.rank)
        if pipeline is None:
            pipeline = MeDiMPipeline.from_pretrained(
                cfg.model.init, revision=cfg.model.revision, dtype=torch.float32, device=self.info.device
            )
        self.pipe = pipeline
        self.layout = pipeline.layout
        if self.layout != data.layout:
            raise ValueError(f"data.cache was built for layout {data.layout.to_dict()}, but model.init uses "
                             f"{self.layout.to_dict()}; rebuild the cache with this model")
        self.model = pipeline.model.to(self.info.device).train()
        if cfg.model.gradient_checkpointing:
            self.model.set_activation_checkpointing(True)
        self.wrapped, self.mode = wrap_model(self.model, cfg.train.parallel, self.info)
        # After wrapping: under FSDP the averages must be sharded like the weights.
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.generator = torch.Generator(self.info.device).manual_seed(cfg.train.seed * 1000 + self.info.rank)
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self._writers: list = []
        if cfg.checkpoint.resume:
            self._resume(cfg.checkpoint.resume)
        if self.info.is_main:
            self._open_logs()

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _open_logs(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir / "log.jsonl"
        if self.log_path.is_file():
            # A resumed run redoes the steps after its checkpoint: drop their old lines.
            lines = [ln for ln in self.log_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            self.log_path.write_text("".join(ln + "\n" for ln in kept))
        if self.cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log.tensorboard=true needs `pip install tensorboard`") from e
            self._writers.append(("tb", SummaryWriter(str(self.out_dir / "tensorboard"))))
        if self.cfg.log.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("log.wandb_project needs `pip install wandb`") from e
            self._writers.append(("wandb", wandb.init(project=self.cfg.log.wandb_project, config=self.cfg.to_dict())))

    def _resume(self, resume: str) -> None:
        path = ckpt.find_checkpoint(self.ckpt_dir, resume)
        if path is None:
            logger.info("resume=latest: no checkpoint in %s yet, starting from step 0", self.ckpt_dir)
            return
        state = ckpt.load_checkpoint(path, rank=self.info.rank)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"optim.ema_decay is set but checkpoint {path} has no ema.safetensors")
            self.ema.load_full_state_dict(state["ema"])
        trainer_state = state["trainer_state"]
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.step = trainer_state["step"]
        if state["rng"] is None:
            logger.warning("checkpoint %s was written by fewer ranks: rank %d keeps fresh RNG seeds", path, self.info.rank)
        else:
            ckpt.restore_rng(state["rng"], self.generator)
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop
    def _denoiser(self, x, sigma, positions, **kwargs):
        return self.wrapped(x, sigma, positions=positions, **kwargs).logprobs

    def _loss(self, batch: dict, generator: torch.Generator):
        x0 = batch["x0"].to(self.info.device)
        sizes = [tuple(int(v) for v in s) for s in batch["sizes"]]
        condition = {k: v.to(self.info.device) for k, v in self.layout.condition(self.pipe.tokenizer, sizes).items()}
        d = self.cfg.diffusion
        autocast = torch.autocast(self.info.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.precision == "bf16")
        with autocast:
            return diffusion_loss(
                self._denoiser, x0, self.layout.segments, self.layout.mask_id,
                schedule=d.schedule,
                loss_mask=None if self.layout.supervise_padding else x0 != self.layout.pad_id,
                keep_prefix_prob=d.keep_prefix_prob,
                prefix_len=batch["prefix_len"].to(self.info.device),
                cond_drop_prob=d.cond_drop_prob,
                cond_keep_prob=d.cond_keep_prob,
                generator=generator,
                model_kwargs=condition,
            )

    def _sync_context(self, last: bool):
        # Gradients are averaged across ranks only on the last micro-batch of a step.
        if self.mode == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over one global batch; returns detached metric tensors."""
        cfg, info = self.cfg, self.info
        m = cfg.train.micro_batch_size
        per_pass = m * info.world_size
        sums = {"loss": torch.zeros((), device=info.device)}
        tokens = torch.zeros((), device=info.device)
        for k in range(self.accum):
            start = self.step * cfg.train.global_batch_size + k * per_pass
            idx = sample_indices(self.num_train, cfg.train.seed, cfg.data.shuffle, start, m, info.rank, info.world_size)
            with self._sync_context(last=k == self.accum - 1):
                out = self._loss(self.data.batch(idx), self.generator)
                (out.loss / self.accum).backward()
            sums["loss"] += out.loss.detach() / self.accum
            for name, v in out.per_modality.items():
                sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0.0) + v.float() / self.accum
            tokens += out.num_tokens
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return {**sums, "grad_norm": grad_norm.detach(), "tokens": tokens}

    def fit(self, until_step: int | None = None) -> TrainOutput:
        """Train to `train.max_steps` (or stop early at `until_step`, e.g. to split a run), logging,
        validating and checkpointing on the configured schedules. Every rank must call it."""
        cfg = self.cfg
        stop = min(until_step or cfg.train.max_steps, cfg.train.max_steps)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", disable=not self.info.is_main)
        window_start, window_tokens = time.perf_counter(), 0.0
        while self.step < stop:
            metrics = self.train_step()
            bar.update(1)
            window_tokens += float(self.cfg.train.global_batch_size * self.layout.state_len)
            if self.step % cfg.log.every == 0 or self.step == stop:
                elapsed = time.perf_counter() - window_start
                record = {k: float(all_mean(v.float())) for k, v in metrics.items() if k != "tokens"}
                record.update(step=self.step, lr=self.scheduler.get_last_lr()[0],
                              tokens_per_s=window_tokens / max(elapsed, 1e-9),
                              samples_seen=self.step * cfg.train.global_batch_size)
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window_start, window_tokens = time.perf_counter(), 0.0
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                self.validate()
            if (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0) or self.step == cfg.train.max_steps:
                self.save_checkpoint()
        bar.close()
        final = self.export(self.out_dir / "final") if self.step >= cfg.train.max_steps else None
        if self.info.is_main:
            for kind, writer in self._writers:
                writer.close() if kind == "tb" else writer.finish()
        return TrainOutput(step=self.step, final_dir=final, checkpoint_dir=self.last_checkpoint,
                           history=self.history)

    def _log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        self.history.append(record)
        logger.info("step %d: %s", record["step"],
                    " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for kind, writer in self._writers:
            if kind == "tb":
                for k, v in record.items():
                    if k != "step":
                        writer.add_scalar(f"train/{k}" if not k.startswith("val") else k, v, record["step"])
            else:
                writer.log(record, step=record["step"])

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss on the held-out items (same masks every time: a fixed generator) and, when
        `eval.prompts` is set, sampled image-report pairs saved under samples/step_<n>/."""
        cfg, info = self.cfg, self.info
        self.model.eval()
        val_loss = None
        if cfg.data.val_size:
            # Equal work on every rank (FSDP needs every rank in every forward): wrap around.
            per_rank = -(-cfg.data.val_size // info.world_size)
            m = cfg.train.micro_batch_size
            g = torch.Generator(info.device).manual_seed(cfg.train.seed + 12345 + info.rank)
            total = torch.zeros((), device=info.device)
            for start in range(0, per_rank, m):
                rows = [self.num_train + (info.rank * per_rank + j) % cfg.data.val_size
                        for j in range(start, min(start + m, per_rank))]
                total += self._loss(self.data.batch(rows), g).loss.float() * len(rows)
            val_loss = float(all_mean(total / per_rank))
            self._log({"step": self.step, "val_loss": val_loss})
        if cfg.eval.prompts:
            out = self.pipe.generate_pairs(
                list(cfg.eval.prompts), num_inference_steps=cfg.eval.num_inference_steps,
                generator=torch.Generator().manual_seed(cfg.train.seed),
            )
            if info.is_main:
                with atomic_directory(self.out_dir / "samples" / f"step_{self.step:08d}", overwrite=True) as tmp:
                    for i, (image, report) in enumerate(zip(out.images, out.reports)):
                        image.save(tmp / f"{i:03d}.png")
                        (tmp / f"{i:03d}.txt").write_text(report + "\n")
        self.model.train()
        return val_loss

    # ------------------------------------------------------------------ saving
    def _full_state(self) -> tuple[dict, dict]:
        # Collective under FSDP: every rank gathers, only rank 0 keeps CPU copies.
        return get_state_dict(self.model, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint_<step> (every rank must call it; rank 0 writes)."""
        model_state, optim_state = self._full_state()
        ema_state = self.ema.full_state_dict() if self.ema is not None else None
        rng = ckpt.capture_rng(self.generator)
        rng_states = [rng]
        if self.info.world_size > 1:
            rng_states = [None] * self.info.world_size
            dist.all_gather_object(rng_states, rng)
        path = None
        if self.info.is_main:
            trainer_state = {"step": self.step, "samples_seen": self.step * self.cfg.train.global_batch_size,
                             "world_size": self.info.world_size, "scheduler": self.scheduler.state_dict()}
            path = ckpt.save_checkpoint(
                self.ckpt_dir, self.step, model_state=model_state, optim_state=optim_state,
                trainer_state=trainer_state, rng_states=rng_states, ema_state=ema_state,
                config_yaml=yaml.safe_dump(self.cfg.to_dict(), sort_keys=False),
                keep_last=self.cfg.checkpoint.keep_last,
            )
            logger.info("saved %s", path)
        self.last_checkpoint = path or self.ckpt_dir / ckpt.checkpoint_name(self.step)
        if dist.is_initialized():
            dist.barrier()
        return path

    def export(self, directory: str | Path) -> Path:
        """Save the trained model (the EMA weights when EMA is on) as a MeDiMPipeline directory."""
        from medim.pipeline import MeDiMPipeline

        model_state, _ = self._full_state()
        if self.ema is not None:
            model_state = {**model_state, **self.ema.full_state_dict()}
        directory = Path(directory)
        if self.info.is_main:
            pipe = self.pipe
            if self.mode == "fsdp":
                # The live model is sharded: fill a fresh CPU copy with the gathered weights.
                pipe = MeDiMPipeline.from_pretrained(self.cfg.model.init, revision=self.cfg.model.revision,
                                                     dtype=torch.float32, device="cpu")
            if self.mode == "fsdp" or self.ema is not None:
                pipe.model.load_state_dict(model_state)
            pipe.save_pretrained(directory, overwrite=True)
            logger.info("saved the trained pipeline to %s", directory)
        if dist.is_initialized():
            dist.barrier()
        return directory


def train(config: TrainConfig) -> TrainOutput:
    """Run a whole training job (what `medim train` and `python -m medim.training` call)."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
