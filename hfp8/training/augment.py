"""Views of image batches for distillation: random resized crops and horizontal flips.

Fine-tuning on a few hundred calibration images over-fits them (issue 20: end-to-end
distillation lowered agreement on unseen photos). Distillation needs no labels, so any view of
an image is a valid training sample as long as teacher and student see *the same* view
("consistent teaching", Beyer et al., *Knowledge distillation: a good teacher is patient and
consistent*, CVPR 2022): :func:`augment_inputs` transforms the inputs once, and both models are
called on the result.

Per sample ``n``, with ``U`` uniform draws from the seeded generator:

* area fraction ``a ~ U(min_area, 1)``, aspect ratio ``r = exp(U(log 3/4, log 4/3))``;
  crop width and height as fractions of the image: ``w = min(1, sqrt(a r))``,
  ``h = min(1, sqrt(a / r))`` (Inception-style random resized crop, Szegedy et al. 2015);
* crop centre uniform over the positions that keep the crop inside the image;
* mirrored left-right with probability 1/2.

The crop is resampled to the input's size bilinearly by ``torch.nn.functional.grid_sample``
(one batched affine warp). Only floating 4-D tensors ``(N, C, H, W)`` with ``H, W >= 8`` are
images; a batch whose inputs hold none (token ids, sequences, tabular data) is left as it is,
and every image tensor of one batch with the same ``(N, H, W)`` gets the same views (stereo
pairs, image + mask inputs stay aligned).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from hfp8.data.model_io import map_tensors

__all__ = ["augment_inputs", "is_image"]

MIN_SIDE = 8  # smaller spatial tensors are feature maps or tables, not images worth cropping


def is_image(value) -> bool:
    return (torch.is_tensor(value) and value.is_floating_point() and value.dim() == 4
            and min(value.shape[-2:]) >= MIN_SIDE)


def augment_inputs(args: tuple, kwargs: dict, generator: torch.Generator,
                   min_area: float = 0.25) -> tuple[tuple, dict, bool]:
    """``(args, kwargs, augmented)``: the inputs with every image tensor replaced by a random
    view (see the module docstring); ``augmented`` says whether any was."""
    views: dict[tuple[int, int, int], torch.Tensor] = {}  # one set of views per (N, H, W)

    def view(value):
        if not is_image(value):
            return value
        key = (value.shape[0], value.shape[2], value.shape[3])
        if key not in views:
            views[key] = _random_affine(value.shape[0], generator, min_area)
        theta = views[key].to(device=value.device, dtype=value.dtype)
        grid = functional.affine_grid(theta, list(value.shape), align_corners=False)
        return functional.grid_sample(value, grid, mode="bilinear", padding_mode="border",
                                      align_corners=False)

    args, kwargs = map_tensors(tuple(args), view), map_tensors(dict(kwargs), view)
    return args, kwargs, bool(views)


def _random_affine(count: int, generator: torch.Generator, min_area: float) -> torch.Tensor:
    """``(count, 2, 3)`` affine maps from output to input coordinates (``affine_grid``'s
    convention, coordinates in [-1, 1])."""
    uniform = torch.rand(count, 5, generator=generator, dtype=torch.float64)
    area = min_area + (1 - min_area) * uniform[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniform[:, 1])
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    # the crop's centre may move by (1 - size) either way and stay inside [-1, 1]
    centre_x = (1 - width) * (2 * uniform[:, 2] - 1)
    centre_y = (1 - height) * (2 * uniform[:, 3] - 1)
    mirror = torch.where(uniform[:, 4] < 0.5, -1.0, 1.0).to(torch.float64)
    theta = torch.zeros(count, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = width * mirror
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    return theta.float()
