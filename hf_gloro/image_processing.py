"""Image processor for GloRo models: resize, rescale to [0, 1], match the channel count; never normalise.

Normalisation lives inside the model (so that the bound accounts for it and ε stays in the pixel scale).
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import ViTImageProcessor
from transformers.image_processing_base import BatchFeature

# ITU-R 601-2 luma, the weights PIL's convert("L") uses; they sum to 1, so gray → RGB → gray is exact.
_LUMA = (0.299, 0.587, 0.114)


class GloRoImageProcessor(ViTImageProcessor):
    """``ViTImageProcessor`` without normalisation that outputs ``num_channels`` channels.

    ``transformers.pipeline`` opens every image as RGB; a 1-channel model gets the luma of it (exactly the
    original pixels for a grayscale image), and a 3-channel model gets grayscale images repeated.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, num_channels: int = 3, **kwargs) -> None:
        kwargs.setdefault("do_normalize", False)
        kwargs.setdefault("do_rescale", True)
        kwargs.setdefault("rescale_factor", 1 / 255)
        super().__init__(**kwargs)
        if num_channels not in (1, 3):
            raise ValueError(f"GloRoImageProcessor handles 1 or 3 channels, got {num_channels}")
        self.num_channels = num_channels

    def preprocess(self, images, *args, **kwargs) -> BatchFeature:
        # PIL images are converted with PIL itself (integer luma), exactly as `images_to_pixels` and the CLI
        # do, so every path gives bit-identical pixels; arrays and tensors get the float luma below.
        mode = "L" if self.num_channels == 1 else "RGB"
        if isinstance(images, Image.Image):
            images = images.convert(mode)
        elif isinstance(images, (list, tuple)):
            images = [im.convert(mode) if isinstance(im, Image.Image) else im for im in images]
        features = super().preprocess(images, *args, **kwargs)
        pixels = features["pixel_values"]
        if isinstance(pixels, torch.Tensor):
            features["pixel_values"] = self._match_channels(pixels)
        else:
            features["pixel_values"] = [self._match_channels(torch.as_tensor(p)[None])[0] for p in pixels]
        return features

    def _match_channels(self, pixels: torch.Tensor) -> torch.Tensor:
        channels = pixels.shape[-3]
        if channels == self.num_channels:
            return pixels
        if channels == 3 and self.num_channels == 1:
            weights = torch.tensor(_LUMA, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
            return (pixels * weights).sum(dim=-3, keepdim=True)
        if channels == 1 and self.num_channels == 3:
            return pixels.expand(*pixels.shape[:-3], 3, *pixels.shape[-2:]).contiguous()
        raise ValueError(f"cannot convert images with {channels} channels to {self.num_channels}")

    def to_dict(self):
        output = super().to_dict()
        output["num_channels"] = self.num_channels
        return output


def gloro_image_processor(num_channels: int, image_size: int) -> GloRoImageProcessor:
    """The processor matching a model's ``config.num_channels`` and ``config.image_size``."""
    return GloRoImageProcessor(num_channels=num_channels, size={"height": image_size, "width": image_size})


def image_processor_for_config(config) -> GloRoImageProcessor:
    """The image processor a saved GloRo model ships with (``preprocessor_config.json``), from its config.

    Resize to ``config.image_size`` squared, rescale to [0, 1], ``config.num_channels`` channels, no
    normalisation. ``save_pretrained``, :class:`~hf_gloro.GloRoTrainer` and the recipe write it next to the
    weights so that ``pipeline(...)``, ``AutoImageProcessor`` and the CLI all work on the folder.
    """
    return gloro_image_processor(int(config.num_channels), int(config.image_size))
