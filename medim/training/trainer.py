"""The training loop: token cache -> masked-diffusion loss -> AdamW, on one process or many.

One optimizer step consumes exactly `train.global_batch_size` samples: `accumulation_steps`
micro-batches of `micro_batch_size` on each of `world_size` ranks. The sample stream is a seeded
permutation per epoch (medim.training.distributed.sample_indices), so the count of samples seen
says where the data stands, and a resumed run reads exactly what the uninterrupted run would have.

Nothing in a step reads a device value back to the host: metrics, the non-finite guard and the
learning rate stay on the device, and are read once per log, eval or checkpoint boundary.
"""

from __future__ import annotations

import contextlib
import logging
import random
import shutil
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
from medim.diffusion.segments import check_tokens
from medim.training import checkpoint as ckpt
from medim.training.config import TrainConfig
from medim.training.distributed import all_mean, compile_blocks, sample_indices, setup_distributed, wrap_model
from medim.training.guard import StepGuard, TrainingDiverged
from medim.training.logs import RunLog, training_summary
from medim.training.lora import apply_lora, export_adapter, peft_config
from medim.training.optim import EMA, apply_hyperparameters, build_optimizer, lr_table
from medim.training.resume import check_output_dir, check_settings, choose_checkpoint, data_identity
from medim.utils.checks import check_state_shapes
from medim.utils.hub import atomic_directory

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainOutput", "TrainingDiverged", "train"]


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
    or in Python (one process, or one per rank under torchrun). `pipeline` and `dataset` replace
    `model.init` and `data.cache` (a dataset is anything with `layout`, `len()` and
    `batch(indices) -> {"x0", "sizes", "prefix_len"}`, like TokenCacheDataset).

    Example:
        >>> from medim.training import Trainer, load_config
        >>> cfg = load_config("configs/tiny.yaml", ["model.init=runs/base", "data.cache=cache/train"])
        >>> out = Trainer(cfg).fit()
        >>> MeDiMPipeline.from_pretrained(out.final_dir)
    """

    distills = False  # reads the `distill` section (medim.training.distill.Distiller)

    def __init__(self, config: TrainConfig, pipeline=None, dataset=None):
        from medim.pipelines.pipeline import MeDiMPipeline

        config.validate()
        if config.distill.teacher and not self.distills:
            raise ValueError("config option distill.teacher is set: this is a distillation; run it with `medim "
                             "distill` or medim.training.Distiller (Trainer would ignore the distill section)")
        self.cfg = cfg = config
        self.info = info = setup_distributed(cfg.train.device)
        self.accum = cfg.accumulation_steps(info.world_size)
        self.out_dir = Path(cfg.train.output_dir)
        check_output_dir(self.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"

        data = dataset if dataset is not None else TokenCacheDataset(cfg.data.cache)
        if cfg.data.val_size >= len(data):
            raise ValueError(f"data.val_size={cfg.data.val_size} must be smaller than the cache ({len(data)} items)")
        self.data = data
        self.num_train = len(data) - cfg.data.val_size
        # Checksums and settings of the checkpoint to resume from, before any model is built.
        resume_from = choose_checkpoint(self.ckpt_dir, cfg.checkpoint.resume, info) if cfg.checkpoint.resume else None
        self.identity = self._identity(data)
        if resume_from is not None:
            check_settings(resume_from, cfg, info.world_size, self.identity)
        elif cfg.checkpoint.resume:
            logger.info("resume=%s: no checkpoint in %s yet, starting from step 0", cfg.checkpoint.resume,
                        self.ckpt_dir)

        # Per-rank seeds: ranks must draw different masks/times, but the same initial weights.
        self._seed_everything(cfg.train.seed * 1000 + info.rank)
        if pipeline is None:
            pipeline = MeDiMPipeline.from_pretrained(
                cfg.model.init, revision=cfg.model.revision, dtype=torch.float32, device=info.device
            )
        self.pipe = pipeline
        self.layout = pipeline.layout
        if self.layout != data.layout:
            raise ValueError(f"data.cache was built for layout {data.layout.to_dict()}, but model.init uses "
                             f"{self.layout.to_dict()}; rebuild the cache with this model")
        self.model = pipeline.model.to(info.device).train()
        self.lora = bool(cfg.lora.r)  # adapters: only they (and lora.modules_to_save) train and are saved
        self.lora_config = peft_config(cfg.lora, pipeline.tokenizer) if self.lora else None
        if self.lora:
            apply_lora(self.model, self.lora_config)
        self.trainable_shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters() if p.requires_grad}
        if cfg.model.gradient_checkpointing:
            self.model.set_activation_checkpointing(True)
        if cfg.train.compile:
            compile_blocks(self.model)
        self.wrapped, self.mode = wrap_model(self.model, cfg.train.parallel, info, cfg.train.precision,
                                             cfg.train.reduce_precision)
        # After wrapping: under FSDP the averages must be sharded like the weights.
        self.ema = EMA(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.optimizer = build_optimizer(self.model, cfg)
        apply_hyperparameters(self.optimizer, cfg, info.device)
        self.fused = self.optimizer.param_groups[0]["fused"]
        self.lrs = lr_table(cfg, info.device)
        self.guard = StepGuard(cfg.train.max_bad_steps, info.device)
        self.generator = torch.Generator(info.device).manual_seed(cfg.train.seed * 1000 + info.rank)
        self.step = 0
        self.samples_seen = 0
        self.last_checkpoint: Path | None = None
        if resume_from is not None:
            self._load(resume_from)
        self.run_log = RunLog(self.out_dir, cfg, self.step) if info.is_main else None

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, rank=self.info.rank, verify=False)  # verified by choose_checkpoint
        if self.lora:  # the checkpoint holds the trainable weights only: exactly those, by name and shape
            check_state_shapes(self.trainable_shapes, {k: tuple(v.shape) for k, v in state["model"].items()},
                               f"checkpoint {path}")
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=not self.lora))
        # The stored param groups replaced the config's: put back this run's (allowed) values.
        apply_hyperparameters(self.optimizer, self.cfg, self.info.device)
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"optim.ema_decay is set but checkpoint {path} has no ema.safetensors")
            self.ema.load_full_state_dict(state["ema"])
        trainer_state = state["trainer_state"]
        self.step = trainer_state["step"]
        self.samples_seen = trainer_state.get("samples_seen", self.step * self.cfg.train.global_batch_size)
        self.guard["updates"].fill_(trainer_state.get("updates", self.step))
        self.guard["skipped"].fill_(trainer_state.get("skipped", 0))
        if state["rng"] is None:
            logger.warning("checkpoint %s was written by fewer ranks: rank %d keeps fresh RNG seeds", path,
                           self.info.rank)
        else:
            ckpt.restore_rng(state["rng"], self.generator)
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop
    def _denoiser(self, x, sigma, positions, **kwargs):
        return self.wrapped(x, sigma, positions=positions, **kwargs).logprobs

    def _next_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Micro-batch k of this rank in the current step (host work, then the copy to the device)."""
        cfg, info, m = self.cfg, self.info, self.cfg.train.micro_batch_size
        start = self.samples_seen + k * m * info.world_size
        return self._device_batch(
            sample_indices(self.num_train, start, m, seed=cfg.train.seed, shuffle=cfg.data.shuffle, rank=info.rank,
                           world_size=info.world_size))

    def _device_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The host side of a micro-batch: read, check the tokens, build the layout's condition, copy
        to the device (pinned and non-blocking on CUDA, so the host runs ahead of the GPU)."""
        batch = self.data.batch(indices)
        check_tokens(batch["x0"], None, self.layout.segments, f"training items {indices}")
        sizes = [tuple(size) for size in batch["sizes"].tolist()]
        tensors = {"x0": batch["x0"], "prefix_len": batch["prefix_len"],
                   **self.layout.condition(self.pipe.tokenizer, sizes)}
        if self.info.device.type == "cuda":
            return {k: v.pin_memory().to(self.info.device, non_blocking=True) for k, v in tensors.items()}
        return {k: v.to(self.info.device) for k, v in tensors.items()}

    def _identity(self, data) -> dict:
        """What a checkpoint records about the run's inputs beyond its options, and a resume must match
        (`resume.check_settings`): the training data."""
        return {"data": data_identity(data)}

    def _loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator,
              known: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
        """The diffusion loss of a micro-batch. `known` [B, N]: each row's given positions (a task per
        row, as a distillation draws them), in place of the random keep/drop options of `diffusion`;
        `hidden` [B, N]: positions masked and not scored (see `diffusion_loss`)."""
        x0 = batch["x0"]
        condition = {k: v for k, v in batch.items() if k not in ("x0", "prefix_len")}
        d = self.cfg.diffusion
        tasks = {"known": known, "hidden": hidden} if known is not None else dict(
            keep_prefix_prob=d.keep_prefix_prob, prefix_len=batch["prefix_len"], cond_drop_prob=d.cond_drop_prob,
            cond_keep_prob=d.cond_keep_prob)
        autocast = torch.autocast(self.info.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.precision == "bf16")
        with autocast:
            return diffusion_loss(
                self._denoiser, x0, self.layout.segments, self.layout.mask_id,
                schedule=d.schedule,
                loss_mask=None if self.layout.supervise_padding else x0 != self.layout.pad_id,
                generator=generator,
                model_kwargs=condition,
                validate_tokens=False,  # checked on the host in _device_batch: no sync here
                **tasks,
            )

    def _sync_context(self, last: bool):
        # Gradients are averaged across ranks only on the last micro-batch of a step.
        if self.mode == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.mode == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over one global batch; returns detached metric tensors (on the device).

        A step whose loss or gradient norm is not finite is skipped on the device: no weight, AdamW,
        LR-schedule or EMA update (the fused AdamW kernel's `found_inf`), counted in `self.guard`.
        """
        cfg, info = self.cfg, self.info
        sums = {"loss": torch.zeros((), device=info.device)}
        for k in range(self.accum):
            batch = self._next_batch(k)
            with self._sync_context(last=k == self.accum - 1):
                out = self._loss(batch, self.generator)
                (out.loss / self.accum).backward()
            sums["loss"] += out.loss.detach() / self.accum
            for name, v in out.per_modality.items():
                sums[f"loss_{name}"] = sums.get(f"loss_{name}", 0.0) + v.float() / self.accum
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        bad = ~(torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm))
        if info.world_size > 1:  # the losses are per rank: skip on every rank if any saw one
            bad = all_mean(bad.float()) > 0
        self._update(bad)
        self.step += 1
        self.samples_seen += cfg.train.global_batch_size
        return {**sums, "grad_norm": grad_norm.detach()}

    def _update(self, bad: torch.Tensor) -> None:
        g = self.guard
        lr = self.lrs.index_select(0, g["updates"].clamp(max=len(self.lrs) - 1).view(1)).squeeze(0)
        if self.fused:
            for group in self.optimizer.param_groups:
                group["lr"].copy_(lr)
            self.optimizer.found_inf = bad.float()  # the fused kernel's skip flag (as GradScaler sets it)
            self.optimizer.step()
        elif not bool(bad):  # no fused kernel for this device: skipping costs one host sync per step
            for group in self.optimizer.param_groups:
                group["lr"] = float(lr)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model, applied=~bad)
        g.record(bad, self.step + 1)

    def _read(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics (averaged over ranks), the guard and the LR of the next update, in one host read."""
        names = list(metrics)
        mean = all_mean(torch.stack([metrics[n].float() for n in names]))
        lr = self.lrs.index_select(0, self.guard["updates"].clamp(max=len(self.lrs) - 1).view(1))
        host = torch.cat([mean.double(), self.guard.values(), lr.double()]).tolist()  # the one sync of a boundary
        return dict(zip([*names, *StepGuard.NAMES, "lr"], host))

    def fit(self, until_step: int | None = None) -> TrainOutput:
        """Train to `train.max_steps` (or stop early at `until_step`, e.g. to split a run), logging,
        validating and checkpointing on the configured schedules. Every rank must call it.

        Raises TrainingDiverged after `train.max_bad_steps` non-finite steps in a row (checked at
        each log boundary), or when the run ends on non-finite steps; no checkpoint or final/ is
        written from them.
        """
        cfg = self.cfg
        stop = min(until_step or cfg.train.max_steps, cfg.train.max_steps)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", disable=not self.info.is_main)
        window_start, window_tokens = time.perf_counter(), 0.0
        try:
            while self.step < stop:
                metrics = self.train_step()
                bar.update(1)
                window_tokens += float(cfg.train.global_batch_size * self.layout.state_len)
                log_now = self.step % cfg.log.every == 0 or self.step == stop
                eval_now = bool(cfg.eval.every) and self.step % cfg.eval.every == 0
                save_now = ((cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0)
                            or self.step == cfg.train.max_steps)
                if log_now or eval_now or save_now:
                    values = self._read(metrics)
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    record = {k: values[k] for k in (*metrics, "lr")}
                    record.update(step=self.step, skipped_steps=int(values["skipped"]),
                                  tokens_per_s=window_tokens / max(elapsed, 1e-9), samples_seen=self.samples_seen)
                    self._log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    window_start, window_tokens = time.perf_counter(), 0.0
                if log_now or eval_now or save_now:
                    self.guard.check(values, self.last_checkpoint)  # after the log line that shows it
                if eval_now:
                    self.validate()
                if save_now:
                    self.save_checkpoint()
            final = self.export(self.out_dir / "final") if self.step >= cfg.train.max_steps else None
        except BaseException:
            self._close_log()
            raise
        finally:
            bar.close()
        if final is not None:
            self._close_log()
        return TrainOutput(step=self.step, final_dir=final, checkpoint_dir=self.last_checkpoint,
                           history=self.history)

    @property
    def history(self) -> list[dict]:
        """The records logged so far (main rank; empty on the others)."""
        return self.run_log.history if self.run_log is not None else []

    def _log(self, record: dict) -> None:
        if self.run_log is not None:
            self.run_log.write(record)

    def _close_log(self) -> None:
        if self.run_log is not None:
            self.run_log.close()


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
                total += self._loss(self._device_batch(rows), g).loss.float() * len(rows)
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
        # With LoRA: the trainable weights only (the frozen base comes from model.init again).
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.lora))
        if self.lora:  # a frozen tied weight (lm_head) escapes ignore_frozen_params
            model_state = {k: v for k, v in model_state.items() if k in self.trainable_shapes}
        return model_state, optim_state

    def _unsafe_to_save(self) -> str | None:
        tensors = list(self.model.parameters()) + (list(self.ema.shadow.values()) if self.ema is not None else [])
        return self.guard.unsafe_to_save(tensors)

    def save_checkpoint(self) -> Path | None:
        """Write checkpoint_<step> (every rank must call it; rank 0 writes). Skipped, with a warning,
        while a run of non-finite steps goes on or a weight is not finite: the previous checkpoint stays
        the newest."""
        reason = self._unsafe_to_save()
        if reason is not None:
            logger.warning("step %d: no checkpoint written: %s", self.step, reason)
            return None
        model_state, optim_state = self._full_state()
        ema_state = self.ema.full_state_dict() if self.ema is not None else None
        rng = ckpt.capture_rng(self.generator)
        rng_states = [rng]
        if self.info.world_size > 1:
            rng_states = [None] * self.info.world_size
            dist.all_gather_object(rng_states, rng)
        updates, skipped = (int(v) for v in torch.stack([self.guard["updates"], self.guard["skipped"]]).tolist())
        path = None
        if self.info.is_main:
            trainer_state = {"step": self.step, "samples_seen": self.samples_seen, "updates": updates,
                             "skipped": skipped, "world_size": self.info.world_size, **self.identity}
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
        """Save the trained model (the EMA weights when EMA is on) as a MeDiMPipeline directory, or
        with LoRA as a PEFT adapter folder (`pipe.load_lora_weights(directory)` on the base).
        Raises TrainingDiverged instead when the weights are unsafe (see `save_checkpoint`)."""
        reason = self._unsafe_to_save()
        if reason is not None:
            where = f"; the newest checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
            raise TrainingDiverged(f"step {self.step}: {directory} not written: {reason}{where}")
        model_state, _ = self._full_state()
        if self.ema is not None:
            model_state = {**model_state, **self.ema.full_state_dict()}
        directory = Path(directory)
        if self.info.is_main:
            for leftover in directory.parent.glob(f".{directory.name}.tmp-*"):  # of an export killed earlier
                shutil.rmtree(leftover, ignore_errors=True)
            summary = training_summary(self.history, self.step, self.cfg, self.num_train)
            if self.lora:
                export_adapter(directory, self.model, self.lora_config, state=model_state,
                               base_model=self.cfg.model.init, training=summary)
                logger.info("saved the trained LoRA adapter to %s", directory)
            else:
                self._export_pipeline(directory, model_state, summary)
        if dist.is_initialized():
            dist.barrier()
        return directory

    def _export_pipeline(self, directory: Path, model_state: dict, summary: dict) -> None:
        from medim.pipelines.model_card import hub_repo_id
        from medim.pipelines.pipeline import MeDiMPipeline

        pipe = self.pipe
        if self.mode == "fsdp":
            # The live model is sharded: fill a fresh CPU copy with the gathered weights.
            pipe = MeDiMPipeline.from_pretrained(self.cfg.model.init, revision=self.cfg.model.revision,
                                                 dtype=torch.float32, device="cpu")
        if self.mode == "fsdp" or self.ema is not None:
            pipe.model.load_state_dict(model_state)
        card = self._model_card(pipe, {"base_model": hub_repo_id(self.cfg.model.init), "training": summary})
        pipe.save_pretrained(directory, overwrite=True, overwrite_card=True, model_card=card)
        logger.info("saved the trained pipeline to %s", directory)

    def _model_card(self, pipe, card: dict) -> dict:
        """The exported pipeline's card (`save_pretrained`'s model_card); a subclass may also set
        what `pipe` saves with it, e.g. its sampler settings (medim.training.distill)."""
        return card


def train(config: TrainConfig) -> TrainOutput:
    """Run a whole training job (what `medim train` and `python -m medim.training` call; with
    `distill.teacher` set they call `medim.training.distill.distill` instead)."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
