"""Images to the encoder's pixel tensor: open, check the mode, resize with Pillow, rescale to [0, 1],
normalise by the channel mean and std -- what transformers' ViTImageProcessor does (tests/test_vision.py
checks it against it). Patchifying is the encoder's strided convolution."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from llmkit.errors import DataError
from llmkit.vision.config import VisionConfig

# The modes read as they are: 8-bit grey and RGB (a grey image is repeated over an RGB encoder's channels).
# Others would lose something silently (RGBA's alpha, a palette, 16-bit depth): the user converts them.
MODES = ("L", "RGB")


class ImageProcessor:
    def __init__(self, config: VisionConfig, resample: Image.Resampling = Image.Resampling.BILINEAR):
        self.config = config
        self.resample = resample  # ViTImageProcessor's default
        self.mean = torch.tensor(config.image_mean).view(-1, 1, 1)
        self.std = torch.tensor(config.image_std).view(-1, 1, 1)

    def open(self, image: Image.Image | str | os.PathLike) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        path = Path(image)
        if not path.is_file():
            raise DataError(f"{path}: no such image file")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: not an image Pillow can read ({e})") from None

    def __call__(self, images: list) -> torch.Tensor:
        """(len(images), channels, image_size, image_size) float32 for PIL images or paths."""
        if not isinstance(images, list | tuple):
            images = [images]
        return torch.stack([self.one(self.open(image)) for image in images])

    def one(self, image: Image.Image) -> torch.Tensor:
        c = self.config
        if image.mode not in MODES:
            raise DataError(f"an image of mode {image.mode!r} ({image.size[0]}x{image.size[1]}); expected one of "
                            f"{MODES} (8-bit grey or RGB): convert it first, e.g. image.convert('RGB'), "
                            "deciding what happens to its alpha or palette")
        if min(image.size) < c.patch_size:
            raise DataError(f"an image of {image.size[0]}x{image.size[1]} pixels is smaller than one "
                            f"{c.patch_size}x{c.patch_size} patch; expected at least that on each side")
        image = image.convert("RGB" if c.channels == 3 else "L")
        image = image.resize((c.image_size, c.image_size), self.resample)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
        pixels = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
        return (pixels - self.mean) / self.std
