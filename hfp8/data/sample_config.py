"""How a :class:`hfp8.data.samples.SampleFolder` reads and batches its files: SampleConfig,
checked when it is made (every problem a one-line ``SampleError``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hfp8.data.image_preprocessing import IMAGENET_MEAN, IMAGENET_STD
from hfp8.data.sample_files import SampleError

__all__ = ["MAX_SIDE", "MIN_STD", "SampleConfig"]

MAX_SIDE = 8192
MIN_STD = 1e-6


def _check_int(name: str, value, minimum: int | None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (
            minimum is not None and value < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        none = " or None" if optional else ""
        raise SampleError(f"{name} must be an integer{at_least}{none}, got {value!r}")


@dataclass(frozen=True)
class SampleConfig:
    """How a ``SampleFolder`` reads and batches its files.

    ``resize`` (short side, pixels) and ``crop`` (centre square, pixels) apply to images only;
    ``None`` or 0 skips the step, and at most ``MAX_SIDE`` pixels are allowed (the values may
    come from a file). ``mean``/``std`` hold one value per channel (or one for all) on the [0, 1]
    pixel scale; ``std`` must be at least ``MIN_STD`` so that normalized values stay finite. ``num_samples`` keeps at most
    that many files: a subset drawn with ``random.Random(seed)``, kept in path order. ``workers``
    > 0 decodes in a thread pool of that size (PIL and numpy release the GIL). With ``labels``
    the folder holds one sub-folder per class (index = position in the sorted names) and batches
    are ``(inputs, targets)``.
    """

    resize: int | None = 256
    crop: int | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    batch_size: int = 32
    num_samples: int | None = None
    seed: int = 0
    strict: bool = False
    workers: int = 0
    recursive: bool = True
    labels: bool = False

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            if getattr(self, name) == 0 and not isinstance(getattr(self, name), bool):
                object.__setattr__(self, name, None)  # 0 skips the step, as on the command line
            _check_int(name, getattr(self, name), 1, optional=True)
            if getattr(self, name) is not None and getattr(self, name) > MAX_SIDE:
                raise SampleError(f"{name} must be at most {MAX_SIDE} pixels, got "
                                  f"{getattr(self, name)}")
        if self.resize is not None and self.crop is not None and self.resize < self.crop:
            raise SampleError(f"resize ({self.resize}) must be >= crop ({self.crop})")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise SampleError(f"channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            try:
                values = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise SampleError(f"{name} must be a sequence of numbers, got {values!r}") from None
            if len(values) not in (1, self.channels):
                raise SampleError(f"{name} has {len(values)} values but channels is "
                                  f"{self.channels}; give one per channel (or one for all)")
            if not all(math.isfinite(v) for v in values):
                raise SampleError(f"{name} must be finite, got {values}")
            object.__setattr__(self, name, values)  # lists become hashable tuples
        if any(v < MIN_STD for v in self.std):
            raise SampleError(f"std must be at least {MIN_STD} (normalized values would overflow "
                              f"to Inf), got {self.std}")
        _check_int("batch_size", self.batch_size, 1)
        _check_int("num_samples", self.num_samples, 1, optional=True)
        _check_int("seed", self.seed, None)
        _check_int("workers", self.workers, 0)
        for name in ("strict", "recursive", "labels"):
            if not isinstance(getattr(self, name), bool):
                raise SampleError(f"{name} must be True or False, got {getattr(self, name)!r}")
