"""Building the demo from scratch: a tokenizer trained on phantom reports, a tiny Llama backbone, and
`build_demo`, which trains the whole pipeline with medim's own token cache and trainer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from medim.demo.settings import DEMO_NAME, DEMO_SAMPLER, IMAGE_SIZE, TEXT_LEN, BuildSettings
from medim.demo.vqgan import lesion_rich_pixels, train_vqgan
from medim.utils.hub import atomic_directory

logger = logging.getLogger(__name__)

__all__ = ["train_tokenizer", "build_demo"]


def train_tokenizer(reports: list[str]):
    """A byte-level BPE tokenizer trained on the phantom report corpus (every word becomes one
    token), with Llama-style special ids: <pad> 0, </s> 1, <s> 2.

    Example:
        >>> tok = train_tokenizer(["No focal lesion.", "A small dark nodule in the left upper zone."])
        >>> tok.pad_token_id, tok.eos_token_id
        (0, 1)
    """
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


def build_demo(out: str | os.PathLike, settings: BuildSettings | None = None, device: str | None = None,
               overwrite: bool = False, vqgan: str | os.PathLike | None = None) -> Path:
    """Retrain the demo pipeline from scratch and save it to `out` (atomically).

    The steps are medim's own code paths: a tiny VQGAN of the real `VQGAN` class, a tokenizer
    trained on the report corpus, a tiny Llama-style backbone turned into MeDiM by
    `MeDiMPipeline.from_base_models` (native layout), the token cache and `medim.training`.
    `vqgan`: a VQGAN folder to reuse (e.g. the `vqgan/` of an earlier build) instead of training
    one, to retrain only the MeDiM part; build.json records it. Build times: docs/demo.md.

    Example:
        >>> build_demo("my-demo", BuildSettings(num_train=2000, vqgan_steps=300, model_steps=500))
        PosixPath('my-demo')
    """
    from medim.data.cache import build_token_cache
    from medim.data.datasets import PhantomDataset
    from medim.pipelines.pipeline import MeDiMPipeline
    from medim.training import Trainer
    from medim.training.logs import training_summary

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
        vq, pipe = _initial_pipeline(tmp, data, s, dev, reused)
        build_token_cache(data, tmp / "cache", vqgan=vq.to(dev), tokenizer=pipe.tokenizer, layout=pipe.layout,
                          batch_size=256, show_progress=False)
        config = _train_config(tmp, s, dev)
        result = Trainer(config).fit()
        trained = MeDiMPipeline.from_pretrained(result.final_dir)
        trained.sampler_config = trained.sampler_config.replace(**DEMO_SAMPLER)
        held_out = config.data.val_size
        card = {"license": "mit", "repo_id": DEMO_NAME,
                "training": training_summary(result.history, result.step, config, s.num_train - held_out)}
        trained.save_pretrained(final, overwrite=True, model_card=card)
        record = _build_record(s, final, reused, vqgan, dev)
        record["seconds"] = round(time.perf_counter() - start, 1)
        record["torch"] = torch.__version__
        record["loss_history"] = [{k: r[k] for k in ("step", "loss") if k in r} for r in result.history]
        (final / "build.json").write_text(json.dumps(record, indent=1))
    logger.info("demo built in %.0f s -> %s", time.perf_counter() - start, out)
    return out


def _initial_pipeline(tmp: Path, data, s: BuildSettings, dev: torch.device, reused):
    """The untrained pipeline, saved to `tmp/init`: the VQGAN (trained on lesion-rich phantoms, or
    `reused`), a tokenizer trained on the reports and a fresh backbone. Returns (VQGAN, pipeline)."""
    from medim.pipelines.pipeline import MeDiMPipeline

    if reused is None:
        vq = train_vqgan(lesion_rich_pixels(min(s.num_train, 4000), s.seed), s.vqgan_steps, dev,
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
    return vq, pipe


def _train_config(tmp: Path, s: BuildSettings, dev: torch.device):
    """The `medim.training` run of the build: the token cache in `tmp`, fp32, no checkpoints kept."""
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

    return TrainConfig(
        model=ModelConfig(init=str(tmp / "init")),
        data=DataConfig(cache=str(tmp / "cache"), val_size=min(256, s.num_train // 10)),
        optim=OptimConfig(lr=s.lr, scheduler="cosine", warmup_steps=min(200, s.model_steps // 10)),
        diffusion=DiffusionConfig(cond_drop_prob=s.cond_drop_prob, cond_keep_prob=s.cond_keep_prob),
        train=TrainSection(output_dir=str(tmp / "run"), max_steps=s.model_steps, seed=s.seed,
                           global_batch_size=s.batch_size, micro_batch_size=s.batch_size,
                           precision="fp32", device=str(dev)),
        log=LogConfig(every=100), eval=EvalConfig(every=0), checkpoint=CheckpointConfig(every=0, keep_last=1),
    )


def _build_record(s: BuildSettings, final: Path, reused, vqgan: str | os.PathLike | None, dev: torch.device) -> dict:
    """The start of build.json: the settings that applied and, for a reused VQGAN, its folder name
    and the sha256 of its weights (its own training settings did not apply)."""
    recorded, source = asdict(s), None
    if reused is not None:
        del recorded["vqgan_steps"], recorded["vqgan_batch_size"]
        recorded["vqgan_codes"] = reused.config.n_embed
        digest = hashlib.sha256((final / "vqgan" / "model.safetensors").read_bytes()).hexdigest()
        source = {"reused": Path(vqgan).name, "sha256": digest}
    return {"settings": recorded, "vqgan": source, "device": str(dev)}
