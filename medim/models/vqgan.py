"""The Chameleon VQGAN: a taming-transformers `VQModel` that turns an image into discrete codes.

Module names match the taming state dict exactly (`encoder.down.0.block.1.conv2.weight`, ...), so
the released `vqgan.ckpt` loads with strict key checking. A 512x512 image becomes 32x32 = 1024 codes
out of 8192 with the released config (`VQGANConfig()`).

Example:
    >>> vqgan = VQGAN.from_taming("Junfeng5/Liquid_demo", repo_type="space", subfolder="chameleon")
    >>> codes = vqgan.encode(pixels)            # [B, 3, 512, 512] in [-1, 1] -> [B, 1024]
    >>> images = vqgan.decode(codes)            # -> [B, 3, 512, 512] in [-1, 1]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import PyTorchModelHubMixin
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn

from medim import __version__
from medim.models.taming import Decoder, Encoder, Quantizer
from medim.utils.checks import check_dtype_device, check_int, check_state_shapes
from medim.utils.hub import HubOptions, atomic_directory, check_replaceable, resolve_file

__all__ = ["VQGAN", "VQGANConfig"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# The parts of a taming VQModel checkpoint that belong to the model; the rest is loss/discriminator.
TAMING_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.")
CODEBOOK_KEY = "quantize.embedding.weight"
# The README.md that `push_to_hub` uploads (huggingface_hub renders it with jinja2, a torch dependency).
MODEL_CARD = """---
{{ card_data }}
---

A taming-transformers VQGAN image tokenizer (Chameleon layout) saved by medim as config.json +
model.safetensors. Install medim with `pip install medim-diffusion` and load it with
`medim.models.vqgan.VQGAN.from_pretrained("{{ repo_id | default("path/to/folder", true) }}")`;
`encode` maps pixels in [-1, 1] to codes, `decode` maps codes back to pixels.
"""


@dataclass
class VQGANConfig:
    """Hyper-parameters of a taming VQGAN, with taming's own names. The defaults are Chameleon's.

    Example:
        >>> VQGANConfig(ch=32, ch_mult=(1, 2), resolution=32, n_embed=64, embed_dim=8, z_channels=8)
    """

    embed_dim: int = 256
    n_embed: int = 8192
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    double_z: bool = False

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        for name in ("embed_dim", "n_embed", "z_channels", "resolution", "in_channels", "out_ch", "ch",
                     "num_res_blocks"):
            check_int(getattr(self, name), f"VQGANConfig.{name}", minimum=1)
        if not self.ch_mult:
            raise ValueError("VQGANConfig.ch_mult must be a non-empty list of positive ints, got ()")
        for i, m in enumerate(self.ch_mult):
            check_int(m, f"VQGANConfig.ch_mult[{i}]", minimum=1)
        # Every GroupNorm has 32 groups, so every channel width must divide by 32.
        if any((self.ch * m) % 32 for m in (1, *self.ch_mult)):
            raise ValueError(f"VQGANConfig.ch * each ch_mult must be a multiple of 32 (GroupNorm(32)), "
                             f"got ch={self.ch}, ch_mult={self.ch_mult}")
        if self.double_z:
            raise ValueError("VQGANConfig.double_z must be False: a VQ model quantizes z_channels, not 2x")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VQGANConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_resolutions"] = list(self.ch_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        """Build from `to_dict()` output; keys starting with "_" (file metadata) are ignored."""
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown VQGANConfig fields {unknown}; accepted: "
                             f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**d)

    @classmethod
    def from_taming(cls, source: str | os.PathLike | dict[str, Any]) -> VQGANConfig:
        """Read a taming yaml (a path, or its parsed dict) as written upstream:
        `model.params.{embed_dim, n_embed, ddconfig}`; the `params` level alone also works."""
        what = "taming config"
        if not isinstance(source, dict):
            what = f"taming config {source}"
            try:
                with open(source, encoding="utf-8") as f:
                    source = yaml.safe_load(f)
            except (UnicodeDecodeError, yaml.YAMLError) as e:
                raise ValueError(f"{what} is not a YAML file: {' '.join(str(e).split())}") from None
        if not isinstance(source, dict):
            raise ValueError(f"{what} must be a mapping, got {type(source).__name__}")
        params = source.get("model", source)
        params = params.get("params", params) if isinstance(params, dict) else params
        if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
            raise ValueError(f"{what} has no model.params.ddconfig section")
        fields = {f.name for f in dataclasses.fields(cls)}
        # ddconfig also carries keys a VQModel ignores (e.g. give_pre_end): keep only ours.
        kwargs = {k: v for k, v in params["ddconfig"].items() if k in fields}
        for key in ("embed_dim", "n_embed"):
            if key not in params:
                raise ValueError(f"taming config has no model.params.{key}")
            kwargs[key] = params[key]
        return cls(**kwargs)


class VQGAN(nn.Module, PyTorchModelHubMixin, library_name="medim", tags=["vqgan", "image-tokenizer"],
            model_card_template=MODEL_CARD):
    """Chameleon-compatible VQGAN: `encode` pixels to codes, `decode` codes to pixels.

    Loaders: `from_taming` (the released `vqgan.ckpt` + `vqgan.yaml`, local or on the Hub) and
    `from_pretrained` / `save_pretrained` / `push_to_hub` (config.json + model.safetensors; uploads
    and model cards come from huggingface_hub's `PyTorchModelHubMixin`). The loaders keep the
    codebook in float32 whatever `dtype` is asked, since nearest-code search in bf16 flips codes.

    Example:
        >>> vqgan = VQGAN.from_pretrained("path/to/pipeline", subfolder="vqgan", device="cuda")
        >>> codes = vqgan.encode(preprocess(["cxr.png"]))        # [1, 1024]
        >>> pixels = vqgan.decode(codes)                         # [1, 3, 512, 512]
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        shared = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                      attn_resolutions=config.attn_resolutions, dropout=config.dropout,
                      resolution=config.resolution, z_channels=config.z_channels)
        self.encoder = Encoder(in_channels=config.in_channels, **shared)
        self.decoder = Decoder(out_ch=config.out_ch, **shared)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize = Quantizer(config.n_embed, config.embed_dim)

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along each side (16 for Chameleon)."""
        return self.config.downsample_factor

    @property
    def num_codes(self) -> int:
        """Codebook size (`n_embed`, 8192 for Chameleon)."""
        return self.config.n_embed

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def num_parameters(self) -> int:
        """Total parameter count (68.7 M for Chameleon); works on the meta device too."""
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------- encode / decode

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map images `[B, 3, H, W]` in [-1, 1] (H, W multiples of `downsample_factor`) to codes
        `[B, (H/f) * (W/f)]` (LongTensor, raster order: t = row * (W/f) + col).

        The nearest-code search is float32 whatever the model dtype. On CUDA, PyTorch's default
        TF32 convolutions change a few codes against a CPU float32 encode; set
        `torch.backends.cudnn.allow_tf32 = False` for exact float32, at a cost in speed
        (benchmarks/RESULTS.md, "VQGAN encode and TF32").

        Example:
            >>> vqgan.encode(torch.zeros(2, 3, 512, 512)).shape
            torch.Size([2, 1024])
        """
        f = self.downsample_factor
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise TypeError(f"pixels must be a float tensor [B, 3, H, W] in [-1, 1], got {type(pixels).__name__}"
                            + (f" of dtype {pixels.dtype}" if isinstance(pixels, torch.Tensor) else ""))
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"pixels must have shape [B, {self.config.in_channels}, H, W], got {list(pixels.shape)}")
        b, _, h, w = pixels.shape
        if b == 0 or h == 0 or w == 0 or h % f or w % f:
            raise ValueError(f"pixels height and width must be positive multiples of {f}, got {h}x{w} (batch {b})")
        lo, hi = pixels.aminmax()
        if not (lo >= -1.001 and hi <= 1.001):  # also catches NaN
            raise ValueError(f"pixels must lie in [-1, 1] (see medim.data.images.preprocess), "
                             f"got values in [{lo.item():.3g}, {hi.item():.3g}]")
        z = self.quant_conv(self.encoder(pixels.to(self.device, self.dtype)))
        z = z.permute(0, 2, 3, 1).reshape(-1, self.config.embed_dim).float()
        return self._nearest_code(z).view(b, (h // f) * (w // f))

    def _nearest_code(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        # Squared L2 distance as |z|^2 + |e|^2 - 2 z.e, in float32 (like taming); rows in chunks so
        # the [rows, n_embed] distance matrix stays small for large batches.
        e = self.quantize.embedding.weight.float()
        e2 = e.pow(2).sum(1)
        out = [(zc.pow(2).sum(1, keepdim=True) + e2 - 2 * zc @ e.t()).argmin(1) for zc in z.split(chunk)]
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Map codes `[B, T]` (raster order) to images `[B, 3, height, width]` clamped to [-1, 1].

        `height` / `width` are in pixels; give one or both for non-square images, none for square.

        Example:
            >>> vqgan.decode(torch.zeros(1, 32 * 64, dtype=torch.long), height=512, width=1024).shape
            torch.Size([1, 3, 512, 1024])
        """
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor [B, T], got {type(codes).__name__}"
                            + (f" of dtype {codes.dtype}" if isinstance(codes, torch.Tensor) else ""))
        if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(f"codes must have shape [B, T] with B, T > 0, got {list(codes.shape)}")
        lo, hi = codes.aminmax()
        if lo < 0 or hi >= self.num_codes:
            raise ValueError(f"codes must lie in [0, {self.num_codes}), got values in [{lo.item()}, {hi.item()}]")
        gh, gw = self._grid(codes.shape[1], height, width)
        q = self.quantize.embedding(codes.to(self.device)).to(self.dtype)  # [B, T, C]
        q = q.view(codes.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(q)).clamp_(-1, 1)

    def _grid(self, t: int, height: int | None, width: int | None) -> tuple[int, int]:
        f = self.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if value is not None and (check_int(value, name) < f or value % f):
                raise ValueError(f"{name} must be a positive multiple of {f} pixels, got {value!r}")
        if height is None and width is None:
            side = math.isqrt(t)
            if side * side != t:
                raise ValueError(f"{t} codes per image is not a square grid: pass height and width (pixels)")
            return side, side
        gh = height // f if height is not None else t // (width // f)
        gw = width // f if width is not None else t // gh
        if gh * gw != t:
            raise ValueError(f"height={height}, width={width} give a {gh}x{gw} grid, which does not hold {t} codes")
        return gh, gw

    # ----------------------------------------------------------------- loading and saving

    @classmethod
    def _from_state_dict(cls, config: VQGANConfig, state: dict[str, torch.Tensor], source: str,
                         dtype: torch.dtype | None, device: torch.device | None) -> VQGAN:
        with torch.device("meta"):  # no random init: every tensor comes from `state`
            model = cls(config)
        check_state_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()},
                           {k: tuple(v.shape) for k, v in state.items()}, f"{source} (read as {config})")
        dtype = dtype or torch.float32
        state = {k: v.to(torch.float32 if k == CODEBOOK_KEY else dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval() if device is not None else model.eval()

    @classmethod
    def from_taming(
        cls,
        ckpt: str | os.PathLike,
        config: VQGANConfig | dict[str, Any] | str | os.PathLike | None = None,
        *,
        filename: str = "vqgan.ckpt",
        config_filename: str = "vqgan.yaml",
        subfolder: str | None = None,
        repo_type: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> VQGAN:
        """Load a taming-transformers VQGAN checkpoint (the released Chameleon `vqgan.ckpt`).

        Args:
            ckpt: a `.ckpt` file, a folder holding `subfolder/filename`, or a Hub repo id.
            config: a `VQGANConfig`, a taming yaml (path or parsed dict), or None to read
                `config_filename` next to the checkpoint (falling back, with a warning, to the
                Chameleon config when there is none).
            filename, config_filename: file names inside a folder or repo.
            subfolder, repo_type, revision, cache_dir, local_files_only, token: Hub options
                (`repo_type="space"` for the Liquid demo Space).
            dtype: weight dtype (default float32; the codebook stays float32). device: target device.

        Example:
            >>> vqgan = VQGAN.from_taming("Junfeng5/Liquid_demo", repo_type="space", subfolder="chameleon")
        """
        dtype, device = check_dtype_device(dtype, device)
        hub = dict(subfolder=subfolder, repo_type=repo_type,
                   hub=HubOptions(revision, cache_dir, local_files_only, token))
        ckpt_is_file = Path(ckpt).expanduser().is_file()
        if isinstance(config, (str, os.PathLike)):
            config = VQGANConfig.from_taming(resolve_file(config))
        elif isinstance(config, dict):
            config = VQGANConfig.from_taming(config)
        elif config is None:
            try:
                if ckpt_is_file:
                    yaml_path = resolve_file(Path(ckpt).expanduser().parent, config_filename)
                else:
                    yaml_path = resolve_file(ckpt, config_filename, **hub)
                config = VQGANConfig.from_taming(yaml_path)
            except (FileNotFoundError, EntryNotFoundError):
                logger.warning("no %s found next to %s; using the Chameleon VQGAN config", config_filename, ckpt)
                config = VQGANConfig()
        elif not isinstance(config, VQGANConfig):
            raise TypeError(
                f"config must be a VQGANConfig, a taming yaml path or dict, or None; got {type(config).__name__}")

        path = resolve_file(ckpt) if ckpt_is_file else resolve_file(ckpt, filename, **hub)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types; name the file either way
            raise ValueError(f"could not read {path} as a taming checkpoint: {e}") from e
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds no state dict (expected {{'state_dict': {{...}}}})")
        kept = {k: v for k, v in state.items() if k.startswith(TAMING_PREFIXES)}
        logger.info("read %d model tensors from %s (dropped %d loss/other entries)", len(kept), path,
                    len(state) - len(kept))
        return cls._from_state_dict(config, kept, str(path), dtype, device)

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> VQGAN:
        """Load a VQGAN written by `save_pretrained` (config.json + model.safetensors) from a
        folder or a Hub repo (use `subfolder="vqgan"` inside a saved pipeline).

        Example:
            >>> vqgan = VQGAN.from_pretrained("my-vqgan", dtype=torch.bfloat16, device="cuda")
        """
        # Not PyTorchModelHubMixin.from_pretrained: it has no `subfolder` (a pipeline's VQGAN lives
        # in vqgan/), builds the model with random weights and loads them non-strictly in the
        # model's dtype (we need a listed strict check and a float32 codebook), drops unknown
        # config keys silently when it decodes the dataclass, and prints to stdout on local loads.
        dtype, device = check_dtype_device(dtype, device)
        hub = dict(subfolder=subfolder, hub=HubOptions(revision, cache_dir, local_files_only, token))
        config_path = resolve_file(repo_or_dir, CONFIG_NAME, **hub)
        try:
            config = VQGANConfig.from_dict(json.loads(config_path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        weights = resolve_file(repo_or_dir, WEIGHTS_NAME, **hub)
        try:
            state = load_file(weights, device="cpu")
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise ValueError(f"could not read {weights} as safetensors: {e}") from e
        return cls._from_state_dict(config, state, str(weights), dtype, device)

    def _save_pretrained(self, save_directory: Path) -> None:
        # The mixin's hook, with our writer rather than its safetensors.save_model (which writes
        # no header metadata): files stay byte-identical to earlier medim folders (config.json with
        # its metadata keys, weights with {"format": "pt"}), from contiguous CPU copies.
        meta = {"_class_name": type(self).__name__, "_medim_version": __version__}
        (save_directory / CONFIG_NAME).write_text(json.dumps({**meta, **self.config.to_dict()}, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt"})

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        overwrite: bool = False,
        *,
        model_card_kwargs: dict[str, Any] | None = None,
        config: None = None,
    ) -> Path:
        """Write config.json + model.safetensors into `save_directory` atomically; an existing
        non-empty folder is replaced only with `overwrite=True`, and only when it is a saved VQGAN
        holding nothing else (a user's file in it is never deleted). Returns the folder.

        No README.md unless `model_card_kwargs` is given (`{}`: the default card), since a VQGAN
        inside a pipeline is described by the pipeline's card; `push_to_hub` always adds one.
        `config` is there for the mixin's `push_to_hub` and must be None (config.json holds `self.config`).

        Example:
            >>> vqgan.save_pretrained("my-vqgan", overwrite=True)
        """
        if config is not None:
            raise ValueError("save_pretrained writes the model's own config (self.config); config must be None")
        with atomic_directory(save_directory, overwrite=overwrite) as tmp:
            self._save_pretrained(tmp)
            if model_card_kwargs is not None:
                self.generate_model_card(**model_card_kwargs).save(tmp / "README.md")
            if overwrite:  # a saved VQGAN is replaced; a user's files beside it never are
                check_replaceable(Path(save_directory).expanduser(), tmp, "a saved VQGAN", "config.json",
                                  lambda config: isinstance(config, dict) and config.get("_class_name") == "VQGAN",
                                  also=re.compile(r"README\.md"))
        return Path(save_directory).expanduser().resolve()

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """huggingface_hub's `push_to_hub`: `save_pretrained` into a temporary folder, with a model
        card, uploaded to `repo_id` (created if needed) in one commit. `kwargs`: private, token,
        commit_message, branch, create_pr, ... Returns the commit URL.

        Example:
            >>> vqgan.push_to_hub("my-org/chameleon-vqgan", private=True)
        """
        card = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)
