"""Radiology image features: RAD-DINO embeddings, for a Frechet distance on a radiology encoder
(`fid(..., features="rad-dino")`) beside the Inception one.

RAD-DINO (microsoft/rad-dino) is a DINOv2 ViT-B/14 trained on chest X-rays; it runs through
transformers' `Dinov2Model` with the image processor saved beside it (its `preprocessor_config.json`,
which the model card loads with `AutoImageProcessor`): resize the short side to 518 (bicubic),
center crop 518x518, scale to [0, 1], normalise with the repo's X-ray mean and std. The feature is
the card's image embedding, `pooler_output` (the CLS token after the final layer norm), 768-d.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from medim.data.images import load_image
from medim.utils.hub import HubOptions

__all__ = ["RAD_DINO", "RadDinoFeatures"]

RAD_DINO = "microsoft/rad-dino"


def _image_processor_class():
    import transformers

    # transformers 5 names the PIL implementation ...Pil (the default one needs torchvision); 4.x: the slow class.
    return getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor


class RadDinoFeatures:
    """RAD-DINO image embeddings: `preprocess(PIL images) -> pixel_values`, then
    `__call__(pixel_values) -> [B, 768]` (`pooler_output`). `fid(..., features="rad-dino")` uses it.

    Example:
        >>> extractor = RadDinoFeatures.from_pretrained("microsoft/rad-dino")  # doctest: +SKIP
        >>> extractor(extractor.preprocess([image])).shape  # doctest: +SKIP
        torch.Size([1, 768])
    """

    def __init__(self, model: torch.nn.Module, image_processor: Any, name: str):
        self.model, self.image_processor, self.__name__ = model.eval(), image_processor, name

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = RAD_DINO,
        device: str | torch.device | None = None,
        hub: HubOptions | None = None,
    ) -> RadDinoFeatures:
        """Load the encoder and its image processor from a local folder or a Hub id (with
        `HF_HUB_OFFLINE=1`, from the Hub cache only). A folder without the files raises one line
        naming what to download."""
        from transformers import Dinov2Model

        options = (hub or HubOptions()).kwargs()
        try:
            processor = _image_processor_class().from_pretrained(str(model), **options)
            encoder = Dinov2Model.from_pretrained(str(model), **options)
        except OSError as e:
            detail = " ".join(str(e).split())  # one line, whatever the loader wrote
            raise FileNotFoundError(
                f"RAD-DINO weights not found at {model!s}: download the Hub repo {RAD_DINO} "
                f"(`hf download {RAD_DINO}`) and pass its folder or id ({type(e).__name__}: {detail})"
            ) from None
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(encoder.to(device), processor, f"RAD-DINO pooler_output ({model!s})")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (PIL, paths, arrays: anything `load_image` takes) -> `pixel_values` as the
        model card's processor makes them."""
        pil = [load_image(image) for image in images]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values.to(self.device)).pooler_output
