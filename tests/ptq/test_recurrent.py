"""Recurrent layers: the step-by-step recurrence against PyTorch's fused kernels, weights on the
E4M3 grid against torch's float8 cast, the hidden state rounded where products read it, packed
sequences, cells, and the hidden-state choice measured both ways on trained models."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence
from torch.overrides import TorchFunctionMode

import hfp8
from hfp8.numerics.sqnr import sqnr_db
from hfp8.ptq.quantizers import quantized_layers, weight_bias_buffer
from hfp8.ptq.recurrent import CELL_FUNCTIONS, RECURRENT_FUNCTIONS, recurrence_by_definition
from tests.small_models import accuracy, calibration_batches, digits, trained

E4M3_REFERENCE_BIAS = 7  # torch.float8_e4m3fn is E4M3 at bias 7


def _fp8(x: torch.Tensor, bias) -> torch.Tensor:
    """Nearest E4M3 at ``bias`` (0-d, or one per row) through torch's float8 cast, saturating."""
    bias = torch.as_tensor(bias)
    scale = torch.exp2((E4M3_REFERENCE_BIAS - bias).double()).to(x.dtype)
    if scale.dim():
        scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).to(x.dtype) * scale


class _ByDefinition(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in RECURRENT_FUNCTIONS and func not in CELL_FUNCTIONS:
            return recurrence_by_definition(func, args, kwargs or {}, lambda h: h)
        return func(*args, **(kwargs or {}))


def _leaves(value):
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return [value.data]
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


LAYERS = [
    (nn.LSTM, {}), (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"batch_first": True, "num_layers": 3, "dropout": 0.0}),
    (nn.LSTM, {"proj_size": 3, "bidirectional": True}), (nn.LSTM, {"bias": False}),
    (nn.GRU, {}), (nn.GRU, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    (nn.RNN, {"bidirectional": True}), (nn.RNN, {"nonlinearity": "relu", "num_layers": 2}),
]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cls,options", LAYERS,
                         ids=[f"{c.__name__}-{'-'.join(map(str, o.items())) or 'plain'}"
                              for c, o in LAYERS])
def test_recurrence_by_definition_matches_the_fused_kernel(cls, options, packed):
    """In float64 the step-by-step recurrence equals PyTorch's fused kernel to rounding."""
    torch.manual_seed(0)
    layer = cls(4, 6, **options).double().eval()
    batch_first = options.get("batch_first", False)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    given = pack_sequence([torch.randn(n, 4, dtype=torch.float64) for n in (5, 3, 2)],
                          enforce_sorted=False) if packed else x
    expected = layer(given)
    with _ByDefinition():
        actual = layer(given)
    for got, want in zip(_leaves(actual), _leaves(expected), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def _quantize(name_or_model, **config):
    model = trained(name_or_model) if isinstance(name_or_model, str) else name_or_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, hfp8.quantize_model(model, calibration_batches(3),
                                          hfp8.QuantConfig(**config), quiet=True)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_weights_are_the_nearest_e4m3_values_by_torch_float8_cast(name, granularity):
    model, qmodel = _quantize(name, weight_granularity=granularity, weight_rounding="nearest")
    layer, original = qmodel.rnn, model.rnn
    names = [n for n, _ in original.named_parameters() if n.startswith("weight_")]
    assert len(names) == 8  # ih and hh, 2 layers, 2 directions
    assert "rnn" in quantized_layers(qmodel)
    for weight_name in names:
        bias = getattr(layer, weight_bias_buffer(weight_name))
        assert bias.dim() == (1 if granularity == "per_channel" else 0)
        expected = _fp8(original.get_parameter(weight_name).detach(), bias)
        torch.testing.assert_close(layer.get_parameter(weight_name).detach(), expected,
                                   rtol=0, atol=0)
    for bias_name in (n for n, _ in original.named_parameters() if n.startswith("bias_")):
        assert torch.equal(layer.get_parameter(bias_name), original.get_parameter(bias_name))


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_compensated_rounding_moves_the_input_matrices_only_and_lowers_their_error(name):
    """Default rounding: the first layer's input matrices (whose input the layer's hook sees)
    are re-rounded under the input's second moments, onto the same grid; every other matrix
    stays the nearest value. The output error e^T H e, with H measured here on the layer's
    input, is lower than nearest rounding's."""
    model, compensated = _quantize(name)
    _, nearest = _quantize(name, weight_rounding="nearest")
    inputs = []
    hook = model.rnn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        for batch in calibration_batches(2):
            model(batch)
    hook.remove()
    x = torch.cat(inputs).reshape(-1, 32).double()
    hessian = x.T @ x / len(x)
    for weight_name in (n for n, _ in model.rnn.named_parameters() if n.startswith("weight_")):
        weight = compensated.rnn.get_parameter(weight_name).detach()
        bias = getattr(compensated.rnn, weight_bias_buffer(weight_name))
        assert torch.equal(weight, _fp8(weight, bias)), weight_name  # on the grid
        float_weight = model.rnn.get_parameter(weight_name).detach().double()
        if weight_name.startswith("weight_ih_l0"):
            errors = [float(torch.einsum("ij,jk,ik->", w.double() - float_weight, hessian,
                                         w.double() - float_weight))
                      for w in (weight, nearest.rnn.get_parameter(weight_name).detach())]
            assert errors[0] < errors[1], (weight_name, errors)
        else:
            assert torch.equal(weight, nearest.rnn.get_parameter(weight_name)), weight_name


class TinyRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 5)

    def forward(self, x):
        return self.rnn(x)[0]


def test_hidden_state_is_rounded_before_the_recurrent_product_only_when_asked():
    """Against a loop written from the RNN equation, in float64: with the choice on, h_{t-1} is
    rounded at its calibrated bias before W_hh; off, the fused kernel runs on float h."""
    torch.manual_seed(1)
    model = TinyRNN().double().eval()
    batches = [torch.randn(7, 4, 3, dtype=torch.float64) for _ in range(3)]
    for rounded in (False, True):
        qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(
            keep_first_and_last=False, quantize_recurrent_state=rounded), quiet=True)
        layer = qmodel.rnn
        x = _fp8(batches[0], layer.input_exponent_bias)
        hidden = torch.zeros(4, 5, dtype=torch.float64)
        outputs = []
        for step in x:
            read = _fp8(hidden, layer.recurrent0_hidden_exponent_bias) if rounded else hidden
            hidden = torch.tanh(step @ layer.weight_ih_l0.T + layer.bias_ih_l0
                                + read @ layer.weight_hh_l0.T + layer.bias_hh_l0)
            outputs.append(hidden)
        with torch.no_grad():
            torch.testing.assert_close(qmodel(batches[0]), torch.stack(outputs), rtol=0,
                                       atol=1e-13)
        sites = hfp8.manifest(qmodel)["attention"]
        assert [s["status"] for s in sites] == ["quantized" if rounded else "float"]


@pytest.mark.parametrize("rounded", [False, True], ids=["float-state", "rounded-state"])
def test_packed_sequences_give_each_sequence_what_it_gives_alone(rounded):
    torch.manual_seed(2)
    model = nn.Sequential(nn.LSTM(4, 6, num_layers=2, bidirectional=True)).double().eval()
    sequences = [torch.randn(n, 4, dtype=torch.float64) for n in (6, 2, 4)]
    calibration = [pack_sequence(sequences, enforce_sorted=False)] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = hfp8.quantize_model(model, calibration, hfp8.QuantConfig(
            keep_first_and_last=False, quantize_recurrent_state=rounded, float_budget=0),
            quiet=True)
    assert not caught, [str(w.message) for w in caught]  # a packed batch is one input
    assert "0" in quantized_layers(qmodel)
    assert hfp8.manifest(qmodel)["calibration_samples"] == 2 * 3  # sequences, not steps
    with torch.no_grad():
        packed_output, (hidden, _) = qmodel(calibration[0])
        padded, lengths = nn.utils.rnn.pad_packed_sequence(packed_output)
        for index, sequence in enumerate(sequences):
            alone, (alone_hidden, _) = qmodel(sequence.unsqueeze(1))
            torch.testing.assert_close(padded[:lengths[index], index], alone[:, 0], rtol=0,
                                       atol=1e-13)
            torch.testing.assert_close(hidden[:, index], alone_hidden[:, 0], rtol=0, atol=1e-13)


class CellLoop(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell(3, 5)

    def forward(self, x):
        hidden = None
        for step in x:
            hidden = self.cell(step, hidden)
        return hidden if torch.is_tensor(hidden) else hidden[0]


@pytest.mark.parametrize("cell", [nn.GRUCell, nn.LSTMCell, nn.RNNCell])
def test_cells_round_weights_input_and_hidden_state(cell):
    """The cell's own kernel is the reference, given inputs rounded by torch's float8 cast."""
    torch.manual_seed(3)
    model = CellLoop(cell).double().eval()
    batches = [torch.randn(5, 4, 3, dtype=torch.float64) for _ in range(3)]
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(
        keep_first_and_last=False, quantize_recurrent_state=True, float_budget=0,
        weight_rounding="nearest"), quiet=True)
    layer, original = qmodel.cell, model.cell
    for weight_name in ("weight_ih", "weight_hh"):
        expected = _fp8(original.get_parameter(weight_name).detach(),
                        getattr(layer, weight_bias_buffer(weight_name)))
        assert torch.equal(layer.get_parameter(weight_name).detach(), expected)
    with torch.no_grad():
        # reference loop: the float cell with the rounded weights, h rounded before each step
        reference = cell(3, 5).double()
        reference.load_state_dict({k: v for k, v in layer.state_dict().items()
                                   if not k.endswith("exponent_bias")})
        state = None
        for step in batches[0]:
            x = _fp8(step, layer.input_exponent_bias)
            if state is not None:
                bias = layer.recurrent0_hidden_exponent_bias
                state = (_fp8(state[0], bias), state[1]) if cell is nn.LSTMCell \
                    else _fp8(state, bias)
            state = reference(x, state)
        expected = state if torch.is_tensor(state) else state[0]
        torch.testing.assert_close(qmodel(batches[0]), expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_hidden_state_choice_measured_both_ways(name):
    """Trained row-reading digit models: the recurrent layer quantized with its hidden state
    float (default) and rounded; both keep the float model's decisions and accuracy."""
    model = trained(name)
    _, _, test_x, test_y = digits()
    with torch.no_grad():
        reference = model(test_x)
    measured = {}
    for rounded in (False, True):
        _, qmodel = _quantize(model, quantize_recurrent_state=rounded)
        with torch.no_grad():
            output = qmodel(test_x)
        measured[rounded] = {
            "agreement": (output.argmax(1) == reference.argmax(1)).float().mean().item(),
            "accuracy_drop": accuracy(model, test_x, test_y) - accuracy(qmodel, test_x, test_y),
            "sqnr_db": sqnr_db(float(reference.square().sum()),
                               float((reference - output).square().sum()))}
        assert "rnn" in quantized_layers(qmodel)
    for result in measured.values():
        assert result["agreement"] >= 0.98 and result["accuracy_drop"] <= 0.01, measured
        assert result["sqnr_db"] >= 28, measured
    # rounding the state adds noise: never better by more than sampling noise
    assert measured[True]["sqnr_db"] <= measured[False]["sqnr_db"] + 0.5, measured


def test_a_recurrent_layer_kept_float_gets_its_float_weights_back():
    model, qmodel = _quantize("lstm", float_budget=1.0)
    assert "rnn" not in quantized_layers(qmodel)
    for name, parameter in model.rnn.named_parameters():
        assert torch.equal(qmodel.rnn.get_parameter(name), parameter)
    assert not any(n.endswith("exponent_bias") for n, _ in qmodel.rnn.named_buffers())


class VoiceEncoderLike(nn.Module):
    """A 3-layer LSTM and a Linear (the shape of a pretrained voice encoder)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, 3, batch_first=True)
        self.linear = nn.Linear(16, 16)

    def forward(self, x):
        _, (hidden, _) = self.lstm(x)
        return torch.relu(self.linear(hidden[-1]))


def test_first_and_last_policy_on_a_small_recurrent_model_says_how_to_change_it():
    model = VoiceEncoderLike().eval()
    batches = [torch.randn(4, 10, 8) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"no layer was quantized.*keep_first_and_last=False"):
        hfp8.quantize_model(model, batches, quiet=True)
    qmodel = hfp8.quantize_model(model, batches, hfp8.QuantConfig(keep_first_and_last=False),
                                 quiet=True)
    assert set(quantized_layers(qmodel)) == {"lstm", "linear"}


def test_saved_recurrent_model_loads_to_the_same_outputs(tmp_path):
    _, qmodel = _quantize("gru", quantize_recurrent_state=True,
                              weight_granularity="per_channel")
    path = tmp_path / "gru.hfp8.pt"
    hfp8.save_quantized(qmodel, path)
    loaded = hfp8.load_quantized(path, trained("gru"))
    x = digits()[2][:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    text = hfp8.format_manifest(hfp8.manifest(loaded))
    assert "hidden state" in text and "1 of 1 recurrent hidden states quantized" in text
