"""The embedded demo: a tiny MeDiM trained on synthetic phantom pairs, shipped inside the package.

Real MeDiM weights are gigabytes and under other licences, so medim ships a model of its own,
trained only on phantoms (`medim.data.synthetic`) whose truth is known. That makes the demo an
honest end-to-end measure too: the phantom readers check whether a generated image shows what
its report says.

- `build_demo(out)` retrains it from scratch with medim's own code paths: a tiny VQGAN of the real
  `VQGAN` class, a tokenizer trained on the report corpus, a tiny Llama-style backbone turned into
  MeDiM by `MeDiMPipeline.from_base_models` (native layout), the token cache and `medim.training`.
- `evaluate_demo(pipe)` scores the three tasks on held-out phantoms with the readers.
- `run_demo(out)` is what `medim demo` does: a few results of each task written to a folder.

Example:
    >>> from medim import MeDiMPipeline
    >>> pipe = MeDiMPipeline.from_pretrained("medim-demo")   # no network: it ships with medim
    >>> pipe.text_to_image(["A large dense nodule in the right upper zone."]).images[0]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from medim.data import synthetic
from medim.data.images import preprocess
from medim.hub import atomic_directory

logger = logging.getLogger(__name__)

__all__ = ["DEMO_NAME", "demo_path", "build_demo", "evaluate_demo", "run_demo", "DemoScores"]

DEMO_NAME = "medim-demo"
IMAGE_SIZE = 64  # phantom side in pixels; the VQGAN turns it into an 8 x 8 grid of codes
TEXT_LEN = 40  # report slots: the longest phantom report is about 35 tokens with its end mark
# Sampler settings saved with the demo, chosen on held-out phantoms: 64 image codes need far
# fewer steps than 1024; this small model reads best unguided (guidance 5 drops image-to-report
# from ~0.85 to ~0.75); a low confidence noise orders commits by confidence, but at 0 every
# generated pair collapses to "no lesion", while 3 keeps about the data's share of lesions.
DEMO_SAMPLER = {"num_steps": 32, "guidance_scale": 0.0, "confidence_temperature": 3.0}
# Held-out phantoms are drawn with this seed; training uses `seed` (0 by default), never this one.
EVAL_SEED = 10_000


def demo_path() -> Path:
    """Where the shipped demo pipeline lives (package data)."""
    return Path(__file__).resolve().parent / "demo_model"


# ---------------------------------------------------------------------------------------- build


def _lesion_rich_pixels(n: int, seed: int, lesion_prob: float = 0.75) -> torch.Tensor:
    """Phantoms with a lesion in each quadrant with probability `lesion_prob` (VQGAN training only).

    In report-distributed phantoms lesions cover ~5% of the pixels, less than the tissue-level
    jitter costs in MSE, so a VQGAN trained on them spends its codes on tissue first and erases
    every lesion for thousands of steps (seen on CPU builds). Lesion-rich images make lesions a
    large share of the loss: reconstructions read back right after a few hundred steps.
    """
    rng = np.random.default_rng([seed, 1])
    images = []
    for _ in range(n):
        lesions = tuple(synthetic.Lesion(side, level, synthetic.SIZES[rng.integers(2)],
                                         synthetic.DENSITIES[rng.integers(2)])
                        for side in synthetic.SIDES for level in synthetic.LEVELS if rng.random() < lesion_prob)
        images.append(synthetic.make_pair(rng, IMAGE_SIZE, spec=synthetic.PhantomSpec(lesions))[0])
    return preprocess(images, size=IMAGE_SIZE)


def _kmeans(pool: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """k centres of `pool`: k-means++ seeding (each new centre drawn far from those already drawn,
    so rare vectors such as a lesion's get centres of their own) refined by Lloyd iterations."""
    idx = [int(torch.randint(0, len(pool), (1,)))]
    dist = (pool - pool[idx[0]]).pow(2).sum(1)
    for _ in range(k - 1):
        idx.append(int(torch.multinomial(dist + 1e-12, 1)))
        dist = torch.minimum(dist, (pool - pool[idx[-1]]).pow(2).sum(1))
    centres = pool[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(pool, centres).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, pool)
        filled = counts > 0  # an empty cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled, None]
    return centres


def train_vqgan(pixels: torch.Tensor, steps: int, device: torch.device, batch_size: int = 64, seed: int = 0,
                n_embed: int = 128):
    """Train a small VQGAN (the real `VQGAN` class) on phantom pixels.

    Plain VQ-VAE training is enough for phantoms (flat regions and round lesions): MSE
    reconstruction, codebook and commitment losses with a straight-through estimator, no GAN.
    The first quarter of the steps trains a plain autoencoder; the codebook is then set by k-means
    on the encoder outputs of up to 1024 images, and later unused codes are re-seeded from the
    worst-quantised vectors. Quantising earlier, or seeding from one batch, sometimes leaves the
    lesions without codes of their own: the encoder then learns to drop them and never recovers
    (seen on CPU builds, where a run either reads lesions back or erases all of them).
    """
    from medim.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(seed)
    config = VQGANConfig(embed_dim=16, n_embed=n_embed, z_channels=64, resolution=IMAGE_SIZE, ch=32,
                         ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    vq = VQGAN(config).to(device).train()
    pixels = pixels.to(device)
    batch_size = min(batch_size, len(pixels))
    opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    book = vq.quantize.embedding.weight
    warmup, refresh = max(steps // 4, 1), max(steps // 20, 1)
    usage = torch.zeros(config.n_embed, device=device)
    for step in range(steps):
        x = pixels[torch.randint(0, len(pixels), (batch_size,), device=device)]
        z = vq.quant_conv(vq.encoder(x))
        flat = z.permute(0, 2, 3, 1).reshape(-1, config.embed_dim)
        if step < warmup:  # autoencoder warm-up: the codebook is seeded from what it learns
            zq, vq_loss = flat, 0.0
        else:
            codes = vq._nearest_code(flat.detach())
            usage += torch.bincount(codes, minlength=config.n_embed)
            e = book[codes]
            vq_loss = F.mse_loss(e, flat.detach()) + 0.25 * F.mse_loss(flat, e.detach())
            zq = flat + (e - flat).detach()
        zq = zq.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        loss = F.mse_loss(vq.decoder(vq.post_quant_conv(zq)), x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            if step + 1 == warmup:
                sample = pixels[torch.randperm(len(pixels), device=device)[:1024]]
                latents = torch.cat([vq.quant_conv(vq.encoder(chunk)) for chunk in sample.split(128)])
                book.copy_(_kmeans(latents.permute(0, 2, 3, 1).reshape(-1, config.embed_dim), config.n_embed))
                usage.zero_()
            elif step >= warmup and (step + 1) % refresh == 0 and step < steps * 0.8:
                dead, pool = (usage == 0).nonzero().flatten(), flat.detach()
                if len(dead):
                    error = (pool - book[vq._nearest_code(pool)]).pow(2).sum(1)
                    book[dead] = pool[torch.multinomial(error + 1e-12, len(dead), replacement=len(dead) > len(pool))]
                usage.zero_()
        if (step + 1) % max(steps // 10, 1) == 0:
            logger.info("vqgan step %d/%d loss %.4f", step + 1, steps, loss.item())
    return vq.eval()


def train_tokenizer(reports: list[str]):
    """A byte-level BPE tokenizer trained on the phantom report corpus (every word becomes one
    token), with Llama-style special ids: <pad> 0, </s> 1, <s> 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(reports, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def _write_backbone(directory: Path, vocab_size: int, hidden: int, layers: int, seed: int,
                    rope_theta: float = 10_000.0) -> None:
    """A randomly initialised tiny Llama in the usual transformers format (config + safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, rope_theta=rope_theta, tie_word_embeddings=True,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)


@dataclass
class BuildSettings:
    """Everything `build_demo` trains with (saved next to the model as build.json).

    The defaults are the shipped model's recipe (README, "The demo"), sized for a 2-core CPU: about
    12 minutes of VQGAN and 94 of token cache + MeDiM (640k pairs). At 6500 steps of 32 (the
    earlier recipe) text-to-image was still at the "no lesion" baseline, so cut `model_steps` only
    for smoke runs; on a GPU raise `batch_size` instead.
    """

    seed: int = 0
    num_train: int = 100_000  # phantom pairs in the token cache
    vqgan_steps: int = 600
    vqgan_batch_size: int = 16
    vqgan_codes: int = 128
    model_steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    hidden: int = 128
    layers: int = 4
    cond_drop_prob: float = 0.1  # for classifier-free guidance
    cond_keep_prob: float = 0.5  # pure conditional rows: see medim.diffusion.diffusion_loss
    rope_theta: float = 10_000.0  # the backbone's RoPE base


def build_demo(out: str | os.PathLike, settings: BuildSettings | None = None, device: str | None = None,
               overwrite: bool = False, vqgan: str | os.PathLike | None = None) -> Path:
    """Retrain the demo pipeline from scratch and save it to `out` (atomically).

    `vqgan`: a VQGAN folder to reuse (e.g. the `vqgan/` of an earlier build) instead of training
    one, to retrain only the MeDiM part; build.json records it.

    Takes about 1 h 45 min on two CPU cores with the default settings.

    Example:
        >>> build_demo("my-demo", BuildSettings(num_train=2000, vqgan_steps=300, model_steps=500))
    """
    from medim.data.cache import build_token_cache
    from medim.data.datasets import PhantomDataset
    from medim.pipeline import MeDiMPipeline
    from medim.training import Trainer
    from medim.training.config import (
        CheckpointConfig,
        DataConfig,
        DiffusionConfig,
        EvalConfig,
        LogConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        TrainSection,
    )

    s = settings or BuildSettings()
    reused = None
    if vqgan is not None:  # a bad folder fails here, before any phantom is drawn
        from medim.models.vqgan import VQGAN

        reused = VQGAN.from_pretrained(vqgan)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    start = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite) as final, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        logger.info("phantoms: %d training pairs", s.num_train)
        data = PhantomDataset(s.num_train, seed=s.seed, size=IMAGE_SIZE)
        if reused is None:
            vq = train_vqgan(_lesion_rich_pixels(min(s.num_train, 4000), s.seed), s.vqgan_steps, dev,
                             batch_size=s.vqgan_batch_size, seed=s.seed, n_embed=s.vqgan_codes)
        else:
            vq = reused.to(dev)
        vq.cpu().save_pretrained(tmp / "vqgan")
        tokenizer = train_tokenizer([data[i]["report"] for i in range(min(s.num_train, 4000))])
        tokenizer.save_pretrained(tmp / "tokenizer")
        _write_backbone(tmp / "backbone", len(tokenizer), s.hidden, s.layers, s.seed, s.rope_theta)
        pipe = MeDiMPipeline.from_base_models(
            tmp / "backbone", vqgan=tmp / "vqgan", tokenizer=tmp / "tokenizer", num_layers=s.layers,
            layout="native", vqgan_subfolder=None, vqgan_repo_type=None, text_len=TEXT_LEN,
            image_len=(IMAGE_SIZE // vq.downsample_factor) ** 2, image_offset=None,
        )
        pipe.save_pretrained(tmp / "init")
        build_token_cache(data, tmp / "cache", vqgan=vq.to(dev), tokenizer=pipe.tokenizer, layout=pipe.layout,
                          batch_size=256, show_progress=False)
        config = TrainConfig(
            model=ModelConfig(init=str(tmp / "init")),
            data=DataConfig(cache=str(tmp / "cache"), val_size=min(256, s.num_train // 10)),
            optim=OptimConfig(lr=s.lr, scheduler="cosine", warmup_steps=min(200, s.model_steps // 10)),
            diffusion=DiffusionConfig(cond_drop_prob=s.cond_drop_prob, cond_keep_prob=s.cond_keep_prob),
            train=TrainSection(output_dir=str(tmp / "run"), max_steps=s.model_steps, seed=s.seed,
                               global_batch_size=s.batch_size, micro_batch_size=s.batch_size,
                               precision="fp32", device=str(dev)),
            log=LogConfig(every=100), eval=EvalConfig(every=0), checkpoint=CheckpointConfig(every=0, keep_last=1),
        )
        result = Trainer(config).fit()
        trained = MeDiMPipeline.from_pretrained(result.final_dir)
        trained.sampler_config = trained.sampler_config.replace(**DEMO_SAMPLER)
        trained.save_pretrained(final, overwrite=True)
        history = [{k: r[k] for k in ("step", "loss") if k in r} for r in result.history]
        recorded, source = asdict(s), None
        if reused is not None:  # the VQGAN settings did not apply: name the weights that did
            del recorded["vqgan_steps"], recorded["vqgan_batch_size"]
            recorded["vqgan_codes"] = reused.config.n_embed
            digest = hashlib.sha256((final / "vqgan" / "model.safetensors").read_bytes()).hexdigest()
            source = {"reused": Path(vqgan).name, "sha256": digest}
        (final / "build.json").write_text(json.dumps(
            {"settings": recorded, "vqgan": source, "device": str(dev), "seconds": round(time.perf_counter() - start, 1),
             "torch": torch.__version__, "loss_history": history}, indent=1))
    logger.info("demo built in %.0f s -> %s", time.perf_counter() - start, out)
    return out


# ------------------------------------------------------------------------------------- evaluate


@dataclass
class DemoScores:
    """Accuracies of the three tasks on held-out phantoms, measured by the phantom readers.

    Attribute accuracy is the fraction of the 4 quadrants x n images whose whole description
    (no lesion, or a lesion of the right size and density) matches.
    """

    n: int
    num_inference_steps: int  # as run: the pipeline's saved default when none was given
    image_to_report: float  # report written for a phantom vs the phantom's truth
    text_to_image: float  # image generated from a held-out report vs that report's truth
    pairs: float  # generated image vs its generated report
    pairs_with_lesions: float  # generated reports that describe a lesion (phantoms: 2/3); a model
    # that always answers "no lesion" has fully consistent pairs, this shows it
    exact: dict  # per task: fraction of images whose every quadrant matches
    nfe: dict
    seconds: dict


def quadrant_accuracy(predicted: list[synthetic.PhantomSpec], reference: list[synthetic.PhantomSpec]) -> float:
    """Fraction of quadrants whose description (absent, or size + density) matches."""
    hits = sum(p.at(side, level) == r.at(side, level) for p, r in zip(predicted, reference)
               for side in synthetic.SIDES for level in synthetic.LEVELS)
    return hits / (4 * len(reference))


def _exact(predicted: list[synthetic.PhantomSpec], reference: list[synthetic.PhantomSpec]) -> float:
    return sum(p == r for p, r in zip(predicted, reference)) / len(reference)


def _read_report(text: str) -> synthetic.PhantomSpec:
    try:
        return synthetic.parse_report(text, strict=False)
    except ValueError:  # unreadable text counts as "no lesion described"
        return synthetic.PhantomSpec(())


PAIR_PROMPTS = ("Frontal view of the chest.", "Frontal chest radiograph.")


def evaluate_demo(pipe=None, n: int = 200, num_inference_steps: int | None = None, seed: int = 0,
                  batch_size: int = 50) -> DemoScores:
    """Score the demo (or any phantom-trained pipeline) on `n` held-out phantoms (fixed seed), with
    the pipeline's saved sampler settings (`num_inference_steps` overrides their step count).

    Example:
        >>> evaluate_demo(n=50).image_to_report
    """
    from medim.pipeline import MeDiMPipeline

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    pipe = pipe or MeDiMPipeline.from_pretrained(DEMO_NAME)
    if num_inference_steps is None:
        num_inference_steps = pipe.sampler_config.num_steps
    held_out = synthetic.make_dataset(n, seed=EVAL_SEED, size=IMAGE_SIZE)
    images, reports, truth = zip(*held_out)
    truth = list(truth)
    common = dict(num_inference_steps=num_inference_steps, batch_size=batch_size)

    def gen(i):
        return torch.Generator().manual_seed(seed * 1_000_003 + i)

    seconds, nfe = {}, {}
    t = time.perf_counter()
    out = pipe.image_to_report(list(images), generator=[gen(i) for i in range(n)], **common)
    seconds["image_to_report"], nfe["image_to_report"] = time.perf_counter() - t, out.nfe
    read = [_read_report(r) for r in out.reports]
    i2r, exact = quadrant_accuracy(read, truth), {"image_to_report": _exact(read, truth)}

    t = time.perf_counter()
    out = pipe.text_to_image(list(reports), generator=[gen(i) for i in range(n)], **common)
    seconds["text_to_image"], nfe["text_to_image"] = time.perf_counter() - t, out.nfe
    read = [synthetic.read_image(im) for im in out.images]
    t2i, exact["text_to_image"] = quadrant_accuracy(read, truth), _exact(read, truth)

    t = time.perf_counter()
    prompts = [PAIR_PROMPTS[i % len(PAIR_PROMPTS)] for i in range(n)]
    out = pipe.generate_pairs(prompts, generator=[gen(i) for i in range(n)], **common)
    seconds["pairs"], nfe["pairs"] = time.perf_counter() - t, out.nfe
    read, said = [synthetic.read_image(im) for im in out.images], [_read_report(r) for r in out.reports]
    pairs, exact["pairs"] = quadrant_accuracy(read, said), _exact(read, said)
    with_lesions = sum(bool(spec.lesions) for spec in said) / n
    return DemoScores(n=n, num_inference_steps=num_inference_steps, image_to_report=i2r, text_to_image=t2i,
                      pairs=pairs, pairs_with_lesions=with_lesions, exact=exact, nfe=nfe,
                      seconds={k: round(v, 2) for k, v in seconds.items()})


# ------------------------------------------------------------------------------------------ run

# Phrased like the training reports (their words, findings in reading order): the tiny model
# knows no other wording.
DEMO_PROMPTS = (
    "A large dense nodule in the right upper zone.",
    "A small lucent lesion in the left lower zone.",
    "No focal lesion.",
    "The right lower zone shows a small bright focus. A large dark nodule in the left upper zone.",
)


def _grid(images: list[Image.Image], captions: list[str], scale: int = 3) -> Image.Image:
    """Images side by side, each with its caption wrapped underneath."""
    side = IMAGE_SIZE * scale
    lines = [_wrap(c, 26) for c in captions]
    text_h = 12 * max(len(c) for c in lines) + 8
    sheet = Image.new("RGB", (side * len(images), side + text_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, wrapped) in enumerate(zip(images, lines)):
        sheet.paste(image.convert("RGB").resize((side, side), Image.Resampling.NEAREST), (i * side, 0))
        for j, line in enumerate(wrapped):
            draw.text((i * side + 4, side + 4 + 12 * j), line, fill="black")
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines or [""]


def run_demo(out: str | os.PathLike = "medim-demo", num_inference_steps: int | None = None, seed: int = 0,
             overwrite: bool = False, model: str | os.PathLike = DEMO_NAME) -> dict:
    """Load the shipped model and write a few results of each task to `out`:
    text_to_image.png, image_to_report.png (+ reports.txt) and pairs.png, plus summary.json.
    Sampling uses the model's saved settings (`num_inference_steps` overrides their step count).
    Returns the summary (also printed by `medim demo`)."""
    from medim.pipeline import MeDiMPipeline

    start = time.perf_counter()
    pipe = MeDiMPipeline.from_pretrained(model)
    if num_inference_steps is None:
        num_inference_steps = pipe.sampler_config.num_steps
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True (--overwrite) to replace its files")
    out.mkdir(parents=True, exist_ok=True)
    common = dict(num_inference_steps=num_inference_steps)

    def gens(k):
        return [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(k)]

    t2i = pipe.text_to_image(list(DEMO_PROMPTS), generator=gens(len(DEMO_PROMPTS)), **common)
    _grid(t2i.images, list(DEMO_PROMPTS)).save(out / "text_to_image.png")
    t2i_ok = [synthetic.read_image(im) == _read_report(p) for im, p in zip(t2i.images, DEMO_PROMPTS)]

    phantoms = synthetic.make_dataset(4, seed=EVAL_SEED + 1, size=IMAGE_SIZE)
    i2r = pipe.image_to_report([im for im, _, _ in phantoms], generator=gens(4), **common)
    _grid([im for im, _, _ in phantoms], i2r.reports).save(out / "image_to_report.png")
    (out / "reports.txt").write_text("".join(f"phantom {i}: {r}\n  truth: {t}\n" for i, (r, (_, t, _))
                                             in enumerate(zip(i2r.reports, phantoms))))
    i2r_ok = [_read_report(r) == spec for r, (_, _, spec) in zip(i2r.reports, phantoms)]

    pairs = pipe.generate_pairs([PAIR_PROMPTS[0]], num_pairs_per_prompt=4, generator=gens(4), **common)
    _grid(pairs.images, pairs.reports).save(out / "pairs.png")
    pair_ok = [synthetic.read_image(im) == _read_report(r) for im, r in zip(pairs.images, pairs.reports)]

    summary = {
        "output_dir": str(out.resolve()),
        "text_to_image": {"prompts": list(DEMO_PROMPTS), "image_matches_prompt": t2i_ok},
        "image_to_report": {"reports": i2r.reports, "report_matches_image": i2r_ok},
        "pairs": {"reports": pairs.reports, "image_matches_report": pair_ok},
        "num_inference_steps": num_inference_steps,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


def scores_table(scores: DemoScores) -> str:
    """A small text table of `evaluate_demo` results."""
    rows = [("image -> report", scores.image_to_report, 0.90), ("text -> image", scores.text_to_image, 0.80),
            ("pairs consistent", scores.pairs, 0.80)]
    keys = ("image_to_report", "text_to_image", "pairs")
    lines = [f"{'task':<18}{'attribute acc.':>15}{'target':>8}{'all 4 right':>13}", "-" * 54]
    lines += [f"{name:<18}{_finite(v):>15.3f}{t:>8.2f}{scores.exact[k]:>13.3f}" for (name, v, t), k in zip(rows, keys)]
    lines.append(f"generated pairs describing a lesion: {scores.pairs_with_lesions:.3f} (phantoms: 0.667)")
    lines.append(f"n={scores.n} held-out phantoms, {scores.num_inference_steps} steps, nfe={scores.nfe}")
    return "\n".join(lines)
