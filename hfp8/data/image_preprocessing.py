"""The image transform of the usual ImageNet evaluation pipeline, on PIL images.

``preprocess_image`` applies, in order (the same steps and rounding as torchvision's PIL path of
``convert -> Resize(resize) -> CenterCrop(crop) -> ToTensor -> Normalize(mean, std)``):

1. colour mode: ``channels == 3`` -> ``'RGB'``, ``channels == 1`` -> ``'L'`` (ITU-R 601-2 luma,
   ``L = R*299/1000 + G*587/1000 + B*114/1000``). Alpha is dropped, not composited: RGBA pixels
   keep their stored colour whatever their alpha, as torchvision's ``ImageFolder`` loader does, so
   statistics match what the model saw in the reference pipeline. Palette images go through RGBA
   first, which gives the same colours and avoids PIL's warning for palettes with per-entry alpha.
   16-bit greyscale (PIL modes ``I;16*``, as 16-bit PNGs open) is scaled to 8 bits,
   ``round(v / 257)`` (65535 -> 255); PIL's own conversion would clip every value above 255,
   leaving a nearly white image. Other modes use PIL's own conversion.
2. resize: the short side becomes ``resize`` pixels and the long side
   ``int(resize * long / short)`` (truncated), with PIL bilinear resampling (antialiased when
   shrinking). ``None`` skips it.
3. centre crop to ``crop x crop``: the top-left corner is ``round((H - crop) / 2)``,
   ``round((W - crop) / 2)`` (Python rounding). ``None`` skips it. An image smaller than the crop
   is an error (torchvision zero-pads it, silently adding black borders to calibration data).
4. ``x = (pixel / 255 - mean[c]) / std[c]`` in float32, laid out as ``(C, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "center_crop",
    "convert_channels",
    "preprocess_image",
    "resize_short_side",
    "resized_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MODES = {1: "L", 3: "RGB"}


def convert_channels(image: Image.Image, channels: int) -> Image.Image:
    """``image`` in mode ``'RGB'`` (``channels=3``) or ``'L'`` (``channels=1``); alpha dropped."""
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3 for images, got {channels}")
    target = _MODES[channels]
    if image.mode == target:
        return image
    if image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L")
        return image if target == "L" else image.convert(target)
    if image.mode in ("P", "PA"):
        # Palettes may carry per-entry alpha; PIL only converts those quietly to RGBA.
        image = image.convert("RGBA")
    return image.convert(target)


def resized_size(size: tuple[int, int], short_side: int | None) -> tuple[int, int]:
    """(width, height) after :func:`resize_short_side` to ``short_side`` (None: unchanged)."""
    width, height = size
    if short_side is None:
        return width, height
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(short_side * long / short)
    return (short_side, new_long) if width <= height else (new_long, short_side)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Bilinear resize so that the short side is ``size`` and the aspect ratio is kept."""
    new_size = resized_size(image.size, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size x size`` window; raises ``ValueError`` if the image is smaller."""
    width, height = image.size
    if width < size or height < size:
        raise ValueError(f"image is {width}x{height} pixels, smaller than crop {size}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess_image(
    image: Image.Image,
    *,
    channels: int = 3,
    resize: int | None = 256,
    crop: int | None = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Float32 tensor of shape ``(channels, H, W)`` (see the module docstring for the steps).

    ``mean`` and ``std`` hold one value per channel, or a single value for all channels.
    """
    image = convert_channels(image, channels)
    if resize is not None:
        image = resize_short_side(image, resize)
    if crop is not None:
        image = center_crop(image, crop)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    # float32 throughout, in the order ToTensor/Normalize use, so results agree bit for bit.
    scaled = pixels.astype(np.float32) / np.float32(255)
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
    normalized = (scaled - mean_arr) / std_arr
    return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))
