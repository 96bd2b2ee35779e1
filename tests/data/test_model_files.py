import pytest
import torch
from torch import nn

from hfp8.data.model_files import (
    ModelFileError,
    build_architecture,
    file_kind,
    load_model,
)


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_state_dict_checkpoint_and_file_factory(tmp_path):
    net = _net()
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    factory = tmp_path / "arch.py"
    factory.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential("
                       "nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))\n")
    assert file_kind(tmp_path / "ckpt.pt") == "state_dict"
    loaded = load_model(tmp_path / "ckpt.pt", f"{factory}:build")
    x = torch.randn(5, 3)
    assert torch.equal(loaded(x), net(x)) and not loaded.training


def test_shape_mismatch_is_one_clear_line(tmp_path):
    torch.save(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).state_dict(),
               tmp_path / "m.pt")
    factory = tmp_path / "arch.py"
    factory.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential("
                       "nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))\n")
    with pytest.raises(ModelFileError, match="does not fit .* size mismatch") as info:
        load_model(tmp_path / "m.pt", f"{factory}:build")
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, to make a file
def test_torchscript_and_onnx_are_refused(tmp_path):
    torch.jit.script(_net()).save(str(tmp_path / "ts.pt"))
    assert file_kind(tmp_path / "ts.pt") == "torchscript"
    with pytest.raises(ModelFileError, match="TorchScript"):
        load_model(tmp_path / "ts.pt")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x09rest")
    with pytest.raises(ModelFileError, match="ONNX"):
        load_model(tmp_path / "m.onnx")


def test_pickles_only_when_trusted(tmp_path):
    torch.save(_net(), tmp_path / "whole.pt")
    with pytest.raises(ModelFileError, match="trust-pickle"):
        load_model(tmp_path / "whole.pt")
    assert isinstance(load_model(tmp_path / "whole.pt", trust_pickle=True), nn.Sequential)
    torch.save([1, 2], tmp_path / "list.pt")
    assert file_kind(tmp_path / "list.pt") == "unknown"


def test_architecture_spec_errors():
    with pytest.raises(ModelFileError, match="must look like"):
        build_architecture("torch.nn.Linear")
    with pytest.raises(ModelFileError, match="no callable"):
        build_architecture("torch.nn:NoSuchThing")
    with pytest.raises(ModelFileError, match="calling Linear"):
        build_architecture("torch.nn:Linear")  # needs arguments
    with pytest.raises(ModelFileError, match="not a torch.nn.Module"):
        build_architecture("builtins:dict")
