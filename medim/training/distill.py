"""Few-step students on the trainer, by one of two methods (`distill.method`, docs/training.md,
"Distillation").

A `Distiller` is a `Trainer` whose loss is the distillation objective; everything else (config and
overrides, torchrun DDP/FSDP2, bf16, the non-finite guard, checksummed checkpoints, bit-exact
resume, the token cache, final/) is the trainer's.

`sequence` (sequence-level knowledge distillation, medim.training.sequence): before training, the
teacher writes every training image's report under one shared noise draw (one phrasing per
finding); the loss is the diffusion loss on them, one task per row. A student that samples a pair
report first (`student_sampler.order: text_first`) learns its pair rows with the image hidden.

`sdtt` (self-distillation through time; Deschenaux & Gulcehre, "Beyond Autoregression: Fast LLMs
via Self-Distillation Through Time", ICLR 2025). One loss evaluation, per micro-batch:

1. each row of cached (clean) data becomes a task, drawn with `distill.task_mix`: text-to-image
   (report given), image-to-report (image given) or a pair (the report's first sentence given);
2. each row gets a student step j in [0, student_steps) (stratified: every step has its share of
   rows) and is masked as the sampler would have it before that step: `masked_before` tokens of
   its unknown ones, chosen at random;
3. the teacher runs the k = teacher_steps / student_steps sampler steps that one student step
   replaces (`medim.diffusion.rollout`: the sampler's own steps, guidance included), recording
   for every masked position the distribution it was drawn from when it was committed;
4. the student, in one forward at the same state and time, is pulled towards those
   distributions: KL(teacher || student) (or the squared log-prob error) over the masked positions.
Rounds of SDTT (32 -> 16 -> 8 -> 4) are successive runs, each student the next teacher.

The student starts from the teacher's weights and its exported pipeline samples with the
teacher's settings at `student_steps` steps, unguided (guidance the targets had is folded in),
with `distill.student_sampler` over them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from medim.data.cache import TokenCacheDataset, state_sha256
from medim.diffusion.config import SamplerConfig
from medim.diffusion.draw import ranks
from medim.diffusion.loss import LossOutput
from medim.diffusion.sampler import masked_before, rollout
from medim.models.denoiser import ModelDenoiser
from medim.training.config import TrainConfig
from medim.training.sequence import TARGETS, build_targets
from medim.training.trainer import Trainer, TrainOutput

logger = logging.getLogger(__name__)

__all__ = ["Distiller", "distill", "METHODS"]

# distill.method -> what the model card says.
METHODS = {"sdtt": "SDTT (self-distillation through time, Deschenaux & Gulcehre 2025)",
           "sequence": "sequence-level knowledge distillation (Kim & Rush 2016) of reports the teacher writes "
                       "under shared noise"}


class Distiller(Trainer):
    """Distil `distill.teacher` into a student sampling in `distill.student_steps` steps.

    Launch like training: `medim distill --config configs/distill_demo.yaml`, `torchrun -m
    medim.training --config ...` (a config with `distill.teacher` set), or in Python. `pipeline`
    and `dataset` as for `Trainer` (the student and the data). `evaluate(pipe) -> {name: value}`,
    given, scores the student before export (main rank; e.g. with `medim.demo.evaluate_demo`) and
    the values go into its model card.

    Example:
        >>> from medim.training import Distiller, load_config
        >>> cfg = load_config("configs/distill_demo.yaml", ["data.cache=cache/demo"])
        >>> out = Distiller(cfg).fit()
        >>> MeDiMPipeline.from_pretrained(out.final_dir).sampler_config.num_inference_steps
        4
    """

    distills = True

    def __init__(self, config: TrainConfig, pipeline=None, dataset=None,
                 evaluate: Callable[..., Mapping[str, float]] | None = None):
        d = config.distill
        if not d.teacher:
            raise ValueError("config option distill.teacher: expected the pipeline to distil (a folder, a bundled "
                             "name such as medim-demo, or a Hub id)")
        super().__init__(config, pipeline=pipeline, dataset=dataset)  # loads the teacher: see _identity
        teacher = self._teacher
        if teacher.layout != self.layout:
            raise ValueError(f"distill.teacher uses layout {teacher.layout.to_dict()}, the student (model.init) "
                             f"{self.layout.to_dict()}: a student must share its teacher's layout")
        self.teacher = teacher.model.to(self.info.device).eval().requires_grad_(False)
        self.teacher_config, self.student_config = sampler_configs(teacher.sampler_config, config)
        if d.method == "sequence":
            # The targets hold the images and the teacher's reports; of the cache, only its own
            # reports are kept (for text-to-image rows), not a second copy of the image codes.
            targets = self._sequence_targets(teacher)
            self.data_text, self.data = self.data.tensors["text_ids"], targets
        del self._teacher  # its VQGAN is not needed
        self.evaluate = evaluate
        self.pipe.sampler_config = self.student_config  # validation samples (eval.prompts) as the student will
        mix = torch.tensor(d.task_mix, dtype=torch.float64)
        self.task_edges = (mix.cumsum(0) / mix.sum()).float()[:-1].to(self.info.device)
        if d.method == "sdtt":
            self.k = d.teacher_steps // d.student_steps  # teacher steps per student step
            logger.info("distilling %s: %d teacher steps -> %d student steps (k=%d), guidance %g%s", d.teacher,
                        d.teacher_steps, d.student_steps, self.k, self.teacher_config.guidance_scale,
                        " folded in" if self.teacher_config.guidance_scale else "")
        else:
            logger.info("distilling %s into %d student steps on its reports (%s), guidance %g%s", d.teacher,
                        d.student_steps, self.out_dir / TARGETS, self.teacher_config.guidance_scale,
                        " folded in" if self.teacher_config.guidance_scale else "")

    def _identity(self, data) -> dict:
        """The trainer's, and the teacher's weights: a resume with another teacher (a folder or Hub
        revision that changed) would not continue the run. So the teacher is loaded here, once the
        output folder and the checkpoint to resume are known and before the checkpoint is compared."""
        from medim.pipelines.pipeline import MeDiMPipeline

        d = self.cfg.distill
        self._teacher = MeDiMPipeline.from_pretrained(d.teacher, revision=d.teacher_revision, dtype=torch.float32,
                                                      device=self.info.device)
        return {**super()._identity(data), "teacher": {"weights_sha256": state_sha256(self._teacher.model)}}

    def _sequence_targets(self, teacher) -> TokenCacheDataset:
        """distill.method=sequence: the training data becomes the cache's images with the reports the
        teacher writes for them (medim.training.sequence), in train.output_dir/targets."""
        d = self.cfg.distill
        if not isinstance(self.data, TokenCacheDataset):
            raise ValueError("distill.method=sequence: the teacher writes reports for the images of a token cache; "
                             "give data.cache")
        return build_targets(teacher, self.data, self.out_dir / TARGETS, noise_scale=d.noise_scale,
                             noise_seed=d.noise_seed, teacher_sha256=self.identity["teacher"]["weights_sha256"],
                             guidance_scale=self.teacher_config.guidance_scale,
                             guidance_schedule=self.teacher_config.guidance_schedule, is_main=self.info.is_main)

    # ------------------------------------------------------------------ the objective
    def _device_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = super()._device_batch(indices)
        if self.cfg.distill.method == "sequence":  # the cache's own reports, for text-to-image rows
            batch["data_text"] = self.data_text[torch.as_tensor(indices)].long().to(self.info.device)
        return batch

    def _loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossOutput:
        if self.cfg.distill.method == "sequence":
            return self._sequence_loss(batch, generator)
        x0 = batch["x0"]
        condition = {k: v for k, v in batch.items() if k not in ("x0", "prefix_len")}
        known, _ = self._task_known(x0, batch["prefix_len"], generator)
        # Student steps stratified over the rows (row r: step (r + offset) mod student_steps), so every
        # micro-batch covers the whole trajectory; the teacher runs one window per step.
        steps = self.cfg.distill.student_steps
        offset = int(self._rand((), generator) * steps)
        x, sigma, groups = x0.clone(), torch.empty(x0.shape[0], device=x0.device), []
        autocast = torch.autocast(self.info.device.type, dtype=torch.bfloat16,
                                  enabled=self.cfg.train.precision == "bf16")
        for j in range(steps):
            rows = torch.arange((j - offset) % steps, x0.shape[0], steps, device=x0.device)
            if not len(rows):
                continue
            x[rows] = self._masked_state(x0[rows], known[rows], self.k * j, generator)
            with autocast:
                target = rollout(ModelDenoiser(self.teacher), x[rows], known[rows], segments=self.layout.segments,
                                 mask_id=self.layout.mask_id, config=self.teacher_config, start=self.k * j,
                                 stop=self.k * (j + 1), generator=generator,
                                 model_kwargs={k: v[rows] for k, v in condition.items()})
            sigma[rows] = target.sigma
            groups.append((rows, target))
        with autocast:
            student = self.wrapped(x, sigma, **condition).logprobs
        masked = x == self.layout.mask_id
        return distill_loss([({k: v[rows] for k, v in student.items()}, t.logprobs, t.positions, masked[rows])
                             for rows, t in groups], self.layout.segments, self.cfg.distill.divergence)

    def _sequence_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossOutput:
        """The diffusion loss, one task per row (`distill.task_mix`): image-to-report and pair rows
        on the teacher's reports; text-to-image rows on the cache's own, so the student keeps
        reading reports phrased every way (the prompts people write)."""
        known, task = self._task_known(batch["x0"], batch["prefix_len"], generator)
        text, image = self.layout.text_segment, self.layout.image_segment
        x0 = batch["x0"].clone()
        x0[:, text.start : text.stop] = torch.where((task == 0)[:, None], batch["data_text"],
                                                    x0[:, text.start : text.stop])
        hidden = None
        if self.student_config.order == "text_first":
            # The student writes a pair's report with the image hidden, then draws the image as
            # text-to-image: its pair rows are those report states.
            hidden = torch.zeros_like(known)
            hidden[:, image.start : image.stop] = (task == 2)[:, None]
        rest = {k: v for k, v in batch.items() if k not in ("x0", "data_text")}
        return super()._loss({**rest, "x0": x0}, generator, known=known, hidden=hidden)

    def _rand(self, shape: tuple, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device).to(self.info.device)

    def _task_known(self, x0: torch.Tensor, prefix_len: torch.Tensor,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's task, drawn with `distill.task_mix`: its given positions [B, N] and its index
        into DISTILL_TASKS [B]."""
        text, image = self.layout.segments
        # An index into DISTILL_TASKS: 0 text-to-image, 1 image-to-report, 2 pairs.
        task = torch.bucketize(self._rand((x0.shape[0],), generator), self.task_edges, right=True)
        pos = torch.arange(x0.shape[1], device=x0.device)
        in_text = (pos >= text.start) & (pos < text.stop)
        in_image = (pos >= image.start) & (pos < image.stop)
        prefix = in_text & (pos - text.start < prefix_len[:, None])
        known = torch.where((task == 0)[:, None], in_text, torch.where((task == 1)[:, None], in_image, prefix))
        return known, task

    def _masked_state(self, x0: torch.Tensor, known: torch.Tensor, step: int,
                      generator: torch.Generator) -> torch.Tensor:
        """`x0` with as many unknown tokens per row masked, chosen uniformly, as the teacher's
        sampler still has masked before `step`."""
        count = masked_before(known, self.teacher_config, step)
        score = torch.where(known, -1.0, self._rand(x0.shape, generator))  # known: never among the first
        return torch.where(ranks(score) < count[:, None], self.layout.mask_id, x0)

    # ------------------------------------------------------------------ the result
    def _model_card(self, pipe, card: dict) -> dict:
        """The student saves its own sampler settings, and its card names the teacher, the
        method, the steps and, with `evaluate`, the measured quality."""
        d = self.cfg.distill
        pipe.sampler_config = self.student_config
        training = {**card["training"], "teacher": d.teacher, "method": METHODS[d.method],
                    "student_steps": d.student_steps}
        training["teacher_guidance_scale"] = self.teacher_config.guidance_scale
        if d.method == "sdtt":
            training |= {"teacher_steps": d.teacher_steps, "divergence": d.divergence}
        else:
            training |= {"noise_scale": d.noise_scale, "noise_seed": d.noise_seed}
        if self.evaluate is not None:
            was_training = pipe.model.training
            pipe.model.eval()
            training |= {f"measured {k}": float(v) for k, v in self.evaluate(pipe).items()}
            pipe.model.train(was_training)
        return {**card, "training": training}


def sampler_configs(teacher: SamplerConfig, config: TrainConfig) -> tuple[SamplerConfig, SamplerConfig]:
    """The teacher's settings for the targets (its own, at `distill.teacher_steps`, guided by
    `distill.guidance_scale` when set) and the student's (the same at `distill.student_steps`,
    unguided, with `distill.student_sampler` over them)."""
    d = config.distill
    if teacher.strategy == "threshold":
        raise ValueError("distill.teacher samples with strategy='threshold', whose steps commit adaptively: "
                         "distillation needs maskgit or ddpm (set the teacher's sampler_config and save it)")
    guidance = teacher.guidance_scale if d.guidance_scale is None else d.guidance_scale
    teacher_config = teacher.replace(num_inference_steps=d.teacher_steps, guidance_scale=guidance,
                                     cache_interval=None)
    # Unguided: the student learnt the targets' distributions, guided (folded in) or not.
    student_config = teacher.replace(num_inference_steps=d.student_steps, guidance_scale=0.0,
                                     **dict(d.student_sampler))
    for who, c in (("the teacher's sampler", teacher_config), ("distill.student_sampler", student_config)):
        if d.method == "sdtt" and c.strategy == "maskgit" and c.order != "confidence":
            raise ValueError(f"distill.method=sdtt: {who} has order={c.order!r}, but sdtt's student replaces windows "
                             "of one joint commit order; use order='confidence' or distill.method=sequence")
    return teacher_config, student_config


def distill_loss(groups: list[tuple[Mapping, Mapping, Mapping, torch.Tensor]], segments,
                 divergence: str) -> LossOutput:
    """The student's log-probs against the teacher's, averaged over the masked positions of every
    group of rows. A group: (student log-probs at every position, `{segment: [b, L_s, V_s]}`; the
    teacher's, `{segment: [b, K_s, V_s]}` at `positions`, `{segment: [K_s]}` (a `rollout`'s);
    masked [b, N], the positions that count).

    kl: sum_v p_T (log p_T - log p_S), zero exactly when the student gives the teacher's
    distribution; mse: the mean over the vocabulary of (log p_S - log p_T)^2.

    Example:
        >>> rolled = rollout(teacher, x, known, ...)
        >>> distill_loss([(student_logprobs, rolled.logprobs, rolled.positions, x == mask_id)],
        ...              layout.segments, "kl").loss
    """
    # Every segment, present or not: each rank logs the same metrics.
    sums = {seg.name: torch.zeros((), device=groups[0][3].device) for seg in segments}
    counts = {seg.name: torch.zeros((), dtype=torch.long, device=groups[0][3].device) for seg in segments}
    for student, target, positions, masked in groups:
        for seg in segments:
            pos = positions.get(seg.name)
            if pos is None:
                continue
            lp_s = student[seg.name][:, pos - seg.start].float()
            lp_t = target[seg.name]
            if divergence == "kl":  # where(): a teacher probability of 0 contributes 0, not 0 * inf
                p_t = lp_t.exp()
                per = torch.where(p_t > 0, p_t * (lp_t - lp_s), 0.0).sum(-1)
            else:
                per = (lp_s.clamp(min=-100) - lp_t.clamp(min=-100)).square().mean(-1)
            where = masked[:, pos]
            sums[seg.name] = sums[seg.name] + torch.where(where, per, 0.0).sum()
            counts[seg.name] = counts[seg.name] + where.sum()
    total = sum(counts.values()).clamp(min=1)
    return LossOutput(loss=sum(sums.values()) / total,
                      per_modality={k: (v / counts[k].clamp(min=1)).detach() for k, v in sums.items()},
                      num_tokens=total, num_masked=total)


def distill(config: TrainConfig, evaluate: Callable[..., Mapping[str, float]] | None = None) -> TrainOutput:
    """Run a whole distillation (what `medim distill` calls; `train` calls it for a config with
    `distill.teacher` set). `evaluate` as for `Distiller`."""
    distiller = Distiller(config, evaluate=evaluate)
    try:
        return distiller.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

