"""Sequence-level distillation (`distill.method=sequence`): the teacher writes the report of every
training image once, and the student learns those reports with the ordinary diffusion loss.

Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP
2016) is how parallel decoders are trained in machine translation (Gu et al. 2018; Zhou et al.,
"Understanding Knowledge Distillation in Non-autoregressive Machine Translation", ICLR 2020): the
teacher's outputs have fewer modes than the data, and a decoder that writes many tokens at once
can only be coherent where each step's tokens are nearly decided by what is already written.

A report sampled in 4 steps commits up to 16 tokens in a step, each drawn on its own. The same
findings come in many phrasings, so per-position distributions mix them ("in in right right");
matching the teacher's step distributions (SDTT) keeps that mixture. Here the teacher writes each
report left to right, one position per forward, taking argmax(log p + noise_scale * g) with one
Gumbel draw g per (position, token) shared by every image: a single phrasing decision, made the
same way for all images, while the findings still come from each image (docs/training.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from medim.data.cache import (
    FORMAT,
    VERSION,
    TokenCacheDataset,
    append_shard,
    first_sentence_length,
    read_index,
    write_index,
)
from medim.diffusion import tasks
from medim.diffusion.sampler import guidance_weight
from medim.diffusion.schedule import get_schedule
from medim.models.denoiser import ModelDenoiser
from medim.training.resume import data_identity

logger = logging.getLogger(__name__)

TARGETS = "targets"  # the folder in train.output_dir that holds the teacher's reports
# Settings a targets folder was written with, beside the source cache's (format, layout, VQGAN, ...).
_COPIED = ("layout", "tokenizer", "tokenizer_sha256", "vqgan", "vqgan_sha256", "image_size", "resize")


def shared_noise(text_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Gumbel noise [text_len, vocab_size] (float32, CPU), the same for every image."""
    u = torch.rand(text_len, vocab_size, generator=torch.Generator().manual_seed(seed))
    return -torch.log(-torch.log(u.clamp(min=1e-20)))


@torch.no_grad()
def write_reports(model: torch.nn.Module, image_codes: torch.LongTensor, noise: torch.Tensor, noise_scale: float,
                  *, guidance_scale: float = 0.0, guidance_schedule: str = "linear", noise_schedule: str = "loglinear",
                  **condition: torch.Tensor) -> torch.LongTensor:
    """The text part [B, text_len] of the reports `model` writes for `image_codes` [B, image_len],
    left to right: one forward per position, token argmax(log p + noise_scale * noise[position]);
    padding after the end of the report. With `guidance_scale` w > 0, p is the sampler's guided mix
    (1 + w_t) log p(. | image) - w_t log p(. | image hidden), normalised, with w_t = w (1 - t) on the
    "linear" schedule (t: the share of the report still masked) or w on "constant"; both halves run
    as one batch.

    Example:
        >>> g = shared_noise(layout.text_len, layout.text_segment.vocab_size, seed=0)
        >>> layout.decode_reports(tokenizer, write_reports(pipe.model, codes, g, 0.5))
    """
    layout = model.layout
    text = layout.text_segment
    task = tasks.image_to_report(layout, image_codes)
    denoiser, schedule, rows = ModelDenoiser(model), get_schedule(noise_schedule), task.x.shape[0]
    # The state the model reads, built once: with guidance [conditional; unconditional], the image
    # hidden in the second half as in the sampler's guided batch; each written token goes to both.
    state = torch.cat([task.x, torch.where(task.known, layout.mask_id, task.x)]) if guidance_scale else task.x
    if guidance_scale:
        condition = {k: torch.cat([v, v]) for k, v in condition.items()}
    halves = state.shape[0] // rows
    noise = noise.to(state.device)
    ended = torch.zeros(rows, dtype=torch.bool, device=state.device)
    for i in range(text.length):
        # The time of a state whose report is masked from position i on.
        t = (text.length - i) / text.length
        sigma = schedule.sigma(torch.full((state.shape[0],), t, device=state.device))
        logp = denoiser(state, sigma, {text.name: torch.tensor([text.start + i], device=state.device)},
                        **condition)[text.name][:, 0].float().log_softmax(-1)
        if guidance_scale:
            w = guidance_weight(guidance_scale, guidance_schedule, t)
            cond, uncond = logp.chunk(2)
            logp = ((1 + w) * cond - w * uncond).log_softmax(-1)
        token = (logp + noise_scale * noise[i]).argmax(-1) + text.vocab_start
        state[:, text.start + i] = torch.where(ended, layout.pad_id, token).repeat(halves)
        if layout.report_end_id is not None:
            ended |= token == layout.report_end_id
            if bool(ended.all()):  # a host read per position: this is a one-off data pass, not the sampler
                state[:, text.start + i + 1 : text.stop] = layout.pad_id
                break
    return state[:rows, text.start : text.stop]


def build_targets(teacher, data: TokenCacheDataset, out: Path, *, noise_scale: float, noise_seed: int,
                  teacher_sha256: str, guidance_scale: float = 0.0, guidance_schedule: str = "linear",
                  is_main: bool = True, batch_size: int = 256) -> TokenCacheDataset:
    """A token cache in `out` holding `data`'s images with the reports `teacher` (a pipeline) writes
    for them (`write_reports`, guided when `guidance_scale` > 0), built shard by shard (a killed run
    continues after the last whole shard) on the main rank while the others wait. A folder written
    with other settings is refused.
    """
    guidance = {"guidance_scale": guidance_scale, "guidance_schedule": guidance_schedule} if guidance_scale else {}
    source = {"kind": "teacher-reports", "cache": data_identity(data), "teacher_weights_sha256": teacher_sha256,
              "noise_scale": noise_scale, "noise_seed": noise_seed, **guidance}
    header = {"format": FORMAT, "version": VERSION, "source": source, "num_items": len(data),
              **{k: data.index.get(k) for k in _COPIED}, "shard_size": 1024}
    if is_main:
        _write_targets(teacher, data, out, header, noise_scale=noise_scale, noise_seed=noise_seed, guidance=guidance,
                       batch_size=batch_size)
    if dist.is_initialized():
        dist.barrier()
    return TokenCacheDataset(out)


def _write_targets(teacher, data: TokenCacheDataset, out: Path, header: dict, *, noise_scale: float,
                   noise_seed: int, guidance: dict, batch_size: int) -> None:
    index = read_index(out)
    if index is not None and {k: index.get(k) for k in header} != header:
        raise ValueError(f"{out} holds teacher reports written from another cache, teacher, noise or guidance; "
                         "delete the folder to write them again")
    if index is None:
        index = {**header, "shards": [], "complete": False}
        out.mkdir(parents=True, exist_ok=True)
        write_index(out, index)
    if index["complete"]:
        return
    model, layout, size = teacher.model, teacher.layout, header["shard_size"]
    image = layout.image_segment
    noise = shared_noise(layout.text_len, layout.text_segment.vocab_size, noise_seed)
    start = len(index["shards"]) * size
    bar = tqdm(total=len(data), initial=start, desc="teacher reports", unit="report")
    for first in range(start, len(data), size):
        rows = list(range(first, min(first + size, len(data))))
        texts = []
        for chunk in range(0, len(rows), batch_size):
            batch = data.batch(rows[chunk : chunk + batch_size])
            condition = layout.condition(teacher.tokenizer, [tuple(size) for size in batch["sizes"].tolist()])
            codes = batch["x0"][:, image.start : image.stop] - image.vocab_start
            texts.append(write_reports(model, codes.to(model.device), noise, noise_scale, **guidance,
                                       **{k: v.to(model.device) for k, v in condition.items()}).cpu())
            bar.update(codes.shape[0])
        text_ids = torch.cat(texts)
        reports = layout.decode_reports(teacher.tokenizer, text_ids)
        own = data.tensors
        tensors = {"text_ids": text_ids.to(own["text_ids"].dtype), "image_codes": own["image_codes"][rows],
                   "sizes": own["sizes"][rows],
                   "prefix_len": first_sentence_length(layout, teacher.tokenizer, reports).to(own["prefix_len"].dtype)}
        append_shard(out, index, tensors, [data.ids[r] for r in rows], items_read=len(rows), skipped={})
    bar.close()
    index["complete"] = True
    write_index(out, index)
    logger.info("teacher reports for %d images in %s", len(data), out)
