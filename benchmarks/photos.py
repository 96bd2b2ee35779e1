"""Deterministic real-photo crops for calibrating and evaluating ImageNet models offline.

Sources are the photographs bundled with scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``); nothing is downloaded. The two splits use disjoint photos, so
evaluation never sees a calibration photo (the near-identical stereo motorcycle pair stays
together in calibration; ``skimage.data.cat`` is the same image as ``chelsea`` and is not used):

* calibration (8): astronaut, coffee, motorcycle_left, motorcycle_right, immunohistochemistry,
  hubble_deep_field, camera (grey), coins (grey)
* evaluation (7): chelsea, rocket, china, flower, retina, moon (grey), clock (grey)

Each split mixes everyday scenes, scientific images and greyscale photos (replicated to RGB).
Left out as not photographic: colorwheel, logo, page, text, textures, binary/synthetic images.

Crops are random-resized-crop style: area fraction ~ U(0.25, 1), aspect ratio w/h log-uniform
in [3/4, 4/3], position uniform, resized (bilinear) to 224 x 224, flipped left-right with
probability 1/2, then ImageNet-normalized. Crop ``i`` comes from photo ``i % len(split)``, and
all draws come from one ``random.Random(seed)`` stream, so ``photo_crops(s, n, seed)`` is a
prefix of ``photo_crops(s, m, seed)`` for ``n <= m``.

Benchmark scripts in this folder import it as ``from photos import photo_crops``.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from PIL import Image

from hfp8.data.image_preprocessing import preprocess_image

__all__ = ["CALIBRATION_PHOTOS", "EVALUATION_PHOTOS", "load_photo", "photo_crops", "photo_names"]

CALIBRATION_PHOTOS = ("astronaut", "coffee", "motorcycle_left", "motorcycle_right",
                      "immunohistochemistry", "hubble_deep_field", "camera", "coins")
EVALUATION_PHOTOS = ("chelsea", "rocket", "china", "flower", "retina", "moon", "clock")
SPLITS = {"calibration": CALIBRATION_PHOTOS, "evaluation": EVALUATION_PHOTOS}

CROP_SIZE = 224
AREA_RANGE = (0.25, 1.0)
ASPECT_RANGE = (3 / 4, 4 / 3)


def photo_names(split: str) -> tuple[str, ...]:
    """Names of the photos in ``split`` ("calibration" or "evaluation")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


@functools.lru_cache(maxsize=None)
def _photo_array(name: str) -> np.ndarray:
    import skimage.data  # imported here: only benchmarks need scikit-image / scikit-learn

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[("china", "flower").index(name)]
    return getattr(skimage.data, name)()


def load_photo(name: str) -> Image.Image:
    """One photo as an RGB PIL image (greyscale photos have their channel replicated)."""
    if name not in CALIBRATION_PHOTOS + EVALUATION_PHOTOS:
        raise ValueError(f"unknown photo {name!r}")
    return Image.fromarray(_photo_array(name)).convert("RGB")


def _crop_box(width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop; up to 10 tries, then the largest centred one.

    Same sampling as torchvision's RandomResizedCrop, but only ``rng.random()`` is used, whose
    sequence Python guarantees across versions.
    """
    area = width * height
    log_lo, log_hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    for _ in range(10):
        target = area * (AREA_RANGE[0] + (AREA_RANGE[1] - AREA_RANGE[0]) * rng.random())
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = min(int(rng.random() * (width - w + 1)), width - w)
            top = min(int(rng.random() * (height - h + 1)), height - h)
            return left, top, left + w, top + h
    # Fallback: whole image clipped to the aspect range, centred.
    w, h = width, height
    if width / height < ASPECT_RANGE[0]:
        h = round(width / ASPECT_RANGE[0])
    elif width / height > ASPECT_RANGE[1]:
        w = round(height * ASPECT_RANGE[1])
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def photo_crops(split: str, count: int, seed: int, size: int = CROP_SIZE) -> torch.Tensor:
    """``count`` normalized crops from ``split``'s photos, float32 (count, 3, size, size).

    Deterministic in (split, count, seed, size); see the module docstring for the crop recipe.
    """
    names = photo_names(split)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    photos = [load_photo(name) for name in names]
    rng = random.Random(seed)
    crops = torch.empty(count, 3, size, size)
    for i in range(count):
        photo = photos[i % len(photos)]
        box = _crop_box(*photo.size, rng)
        crop = preprocess_image(photo.resize((size, size), Image.BILINEAR, box=box),
                                resize=None, crop=None)
        crops[i] = crop.flip(-1) if rng.random() < 0.5 else crop
    return crops


def benchmark_batches(calibration: int, evaluation: int, batch_size: int):
    """The calibration and evaluation sets every MobileNetV2 benchmark uses (disjoint photos,
    fixed seeds, so that their tables describe the same data): two lists of batches."""
    return (list(photo_crops("calibration", calibration, seed=0).split(batch_size)),
            list(photo_crops("evaluation", evaluation, seed=1).split(batch_size)))
