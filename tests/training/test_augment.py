"""Random resized crops and mirror images for distillation (hfp8.training.augment), checked on
images whose views are known from the definition: a constant, a ramp, and the identity crop."""

import math

import torch

from hfp8.training.augment import augment_inputs


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_a_view_of_a_plane_is_a_plane_scaled_by_the_crop_and_mirrored_half_the_time():
    """Bilinear resampling reproduces an affine function exactly inside the image, so the view
    of ``f[h, w] = w + 64 h`` has slopes (crop width / image width) along w, negative when
    mirrored, and (crop height / image height) along h. By the definition both lie in
    [sqrt(min_area * 3/4), 1], and their ratio is the drawn aspect ratio, in [3/4, 4/3] unless
    one side was clamped to the whole image."""
    side = 32
    rows, columns = torch.meshgrid(torch.arange(side, dtype=torch.float32),
                                   torch.arange(side, dtype=torch.float32), indexing="ij")
    plane = (columns + 64 * rows).expand(400, 1, side, side).clone()
    (view,), _, _ = augment_inputs((plane,), {}, _generator(1), min_area=0.25)
    inner = view[:, 0, 1:-1, 1:-1]  # border pixels may be clamped (padding_mode="border")
    along_w, along_h = inner.diff(dim=-1), inner.diff(dim=-2) / 64
    width, height = along_w.mean((-1, -2)), along_h.mean((-1, -2))
    assert torch.allclose(along_w, width[:, None, None].expand_as(along_w), atol=2e-3)
    assert torch.allclose(along_h, height[:, None, None].expand_as(along_h), atol=2e-3)
    lowest = math.sqrt(0.25 * 3 / 4) - 1e-3
    for sides in (width.abs(), height):
        assert float(sides.min()) >= lowest and float(sides.max()) <= 1 + 1e-3
    unclamped = (width.abs() < 0.999) & (height < 0.999)
    ratio = width.abs()[unclamped] / height[unclamped]
    assert float(ratio.min()) >= 3 / 4 - 1e-3 and float(ratio.max()) <= 4 / 3 + 1e-3
    mirrored = int((width < 0).sum())
    assert 158 <= mirrored <= 242  # probability 1/2 each: 400 draws, 4.2 standard deviations


def test_a_constant_image_stays_constant_and_views_depend_on_the_seed():
    image = torch.full((4, 3, 16, 16), 0.7)
    (view,), _, _ = augment_inputs((image,), {}, _generator())
    assert torch.allclose(view, image, atol=1e-6)
    ramp = torch.arange(16.0).expand(4, 3, 16, 16).clone()
    first = augment_inputs((ramp,), {}, _generator(0))[0][0]
    again = augment_inputs((ramp,), {}, _generator(0))[0][0]
    other = augment_inputs((ramp,), {}, _generator(5))[0][0]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_inputs_that_are_not_images_are_left_as_they_are():
    tokens = torch.randint(0, 100, (4, 16, 16))        # integer ids
    sequence = torch.randn(4, 16, 32)                 # 3-D float: a sequence
    small = torch.randn(4, 8, 4, 4)                   # a 4x4 feature map, not an image
    args, kwargs, augmented = augment_inputs((tokens, sequence), {"map": small}, _generator())
    assert not augmented
    assert args[0] is tokens and args[1] is sequence and kwargs["map"] is small


def test_two_images_of_one_batch_get_the_same_views():
    """An image and its mask (or a stereo pair) must stay aligned."""
    image = torch.randn(8, 3, 20, 20)
    (first, second), _, _ = augment_inputs((image, image.clone()), {}, _generator())
    assert torch.equal(first, second)
