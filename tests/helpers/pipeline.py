"""Tiny upstream-format artefacts for end-to-end pipeline tests (nothing touches the network).

Built on the other helpers: tests/helpers/backbone.py (tiny Liquid, tiny release checkpoint, tiny
word-level tokenizer) and tests/helpers/vqgan.py (tiny taming VQGAN writer). Sizes: text_len 16,
16x16-pixel images -> 4x4 = 16 VQ codes out of 64.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers.backbone import (
    TINY_BASE_VOCAB,
    TINY_IMAGE_VOCAB,
    TINY_TEXT_VOCAB,
    tiny_tokenizer,
    write_tiny_liquid,
    write_tiny_release_checkpoint,
)
from tests.helpers.vqgan import tiny_model, write_taming

TEXT_LEN, IMAGE_LEN, IMAGE_PX = 16, 16, 16
# ch_mult of length 3 -> downsample 4: 16 px -> 4x4 codes.
VQGAN_OVERRIDES = dict(ch_mult=(1, 1, 1), resolution=IMAGE_PX, n_embed=TINY_IMAGE_VOCAB)
V1_LAYOUT = {"name": "medim-v1", "base_vocab_size": TINY_BASE_VOCAB, "text_len": TEXT_LEN, "image_len": IMAGE_LEN,
             "image_vocab_size": TINY_IMAGE_VOCAB}


def write_upstream(root: Path) -> dict[str, Path]:
    """Write every upstream artefact the pipeline loaders read, in the upstream file formats:
    - liquid/: a Liquid_V1_7B-format Gemma checkpoint (sharded) + its fast tokenizer files;
    - llama_tokenizer/: a Llama-2-style fast tokenizer (BOS added, no EOS), 120 ids;
    - space/chameleon/: taming `vqgan.ckpt` + `vqgan.yaml` (as in the Liquid demo Space);
    - release/: the accelerate checkpoints `checkpoint_<step>/model.safetensors` of MeDiM.
    """
    paths = {name: root / name for name in ("liquid", "llama_tokenizer", "space", "release")}
    write_tiny_liquid(paths["liquid"], num_layers=3, shards=2)
    tiny_tokenizer(TINY_TEXT_VOCAB, bos_id=2, eos_id=1).save_pretrained(str(paths["liquid"]))
    tiny_tokenizer(TINY_BASE_VOCAB, bos_id=1, eos_id=2).save_pretrained(str(paths["llama_tokenizer"]))
    write_taming(tiny_model(seed=3, **VQGAN_OVERRIDES), paths["space"] / "chameleon")
    write_tiny_release_checkpoint(paths["release"])
    return paths


def to_hub_cache(cache_dir: Path, repo_id: str, source: Path, repo_type: str = "model",
                 commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """Lay `source`'s files out as huggingface_hub's cache does for `repo_id` at `refs/main`."""
    prefix = {"model": "models", "dataset": "datasets", "space": "spaces"}[repo_type]
    repo = cache_dir / f"{prefix}--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit, dirs_exist_ok=True)
