"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells): which weights they
hold, and their recurrences computed by definition with the hidden state rounded.

PyTorch runs these layers in one fused kernel (``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``,
``torch.rnn_relu``), which keeps the hidden state in float; so does the ONNX LSTM/GRU operator
the exporter writes. Hardware with FP8 multipliers rounds the hidden state before it enters the
recurrent product ``h W_hh^T``. :func:`recurrence_by_definition` computes what the fused kernel
computes (PyTorch's documented equations) with ``round_hidden`` applied to every hidden state a
weight product reads: ``h_{t-1}`` before ``W_hh`` and, from the second layer on, the layer input
(the previous layer's hidden states) before ``W_ih``. The carried state (``c_t``, and ``h_t`` in
the GRU's ``z * h_{t-1}``) and the outputs stay float.

Equations (per layer and direction; ``s`` = sigmoid; gates in PyTorch's order):

* LSTM: ``i, f, g, o = s(.), s(.), tanh(.), s(.)`` of ``x W_ih^T + b_ih + h W_hh^T + b_hh``;
  ``c' = f c + i g``, ``h' = o tanh(c')``, then ``h' W_hr^T`` with ``proj_size``;
* GRU: ``r = s(x_r + h_r)``, ``z = s(x_z + h_z)``, ``n = tanh(x_n + r h_n)``,
  ``h' = (1 - z) n + z h`` (``x_* = x W_i*^T + b_i*``, ``h_* = h W_h*^T + b_h*``);
* RNN: ``h' = tanh`` (or ``relu``) ``(x W_ih^T + b_ih + h W_hh^T + b_hh)``.

Packed sequences follow PyTorch's layout: step ``t`` holds the first ``batch_sizes[t]``
sequences (sorted longest first), so a sequence's state stops at its last step going forward
and starts from ``h_0`` at its last step going backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

__all__ = ["RECURRENT_TYPES", "RECURRENT_FUNCTIONS", "CELL_FUNCTIONS", "weight_names",
           "input_weight_names", "round_cell_hidden", "is_recurrent", "recurrence_by_definition"]

RECURRENT_TYPES = (nn.RNNBase, nn.RNNCellBase)
_LAYER_FUNCTIONS = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "tanh",
                    torch.rnn_relu: "relu"}
CELL_FUNCTIONS = {torch.lstm_cell, torch.gru_cell, torch.rnn_tanh_cell, torch.rnn_relu_cell}
RECURRENT_FUNCTIONS = {*_LAYER_FUNCTIONS, *CELL_FUNCTIONS}


def is_recurrent(module: nn.Module) -> bool:
    return isinstance(module, RECURRENT_TYPES)


def weight_names(module: nn.Module) -> tuple[str, ...]:
    """The weight matrices of a quantizable layer: ``("weight",)`` for Conv/Linear; for
    recurrent layers ``weight_ih_l0``, ``weight_hh_l0`` (``_reverse``, ``weight_hr_l*``), or a
    cell's ``weight_ih``, ``weight_hh``. Biases are not among them (they stay float)."""
    if isinstance(module, nn.RNNBase):
        return tuple(name for name in module._flat_weights_names if name.startswith("weight_"))
    if isinstance(module, nn.RNNCellBase):
        return ("weight_ih", "weight_hh")
    return ("weight",)


def input_weight_names(module: nn.Module) -> tuple[str, ...]:
    """The weight matrices that multiply the layer's own input (what its input moments
    describe): ``weight``; a recurrent layer's first-layer input matrices ``weight_ih_l0`` (and
    ``_reverse``), a cell's ``weight_ih``. The hidden-state matrices and later layers' input
    matrices read values no hook on the layer sees."""
    if isinstance(module, nn.RNNBase):
        return tuple(n for n in ("weight_ih_l0", "weight_ih_l0_reverse") if hasattr(module, n))
    if isinstance(module, nn.RNNCellBase):
        return ("weight_ih",)
    return ("weight",)


def round_cell_hidden(func, args: tuple, kwargs: dict, round_hidden) -> torch.Tensor:
    """A cell call (``torch.lstm_cell(input, (h, c), ...)``, ``torch.gru_cell(input, h, ...)``)
    with its hidden state ``h`` rounded; the cell's own kernel computes the rest."""
    args = list(args)
    if func is torch.lstm_cell:
        hidden, cell = args[1]
        args[1] = (round_hidden(hidden), cell)
    else:
        args[1] = round_hidden(args[1])
    return func(*args, **kwargs)


def _parse(func, args: tuple) -> dict:
    """The arguments of a fused call, tensor or packed form (see ``torch/nn/modules/rnn.py``)."""
    mode = _LAYER_FUNCTIONS[func]
    lstm = mode == "lstm"
    packed = torch.is_tensor(args[1]) and (lstm or torch.is_tensor(args[2]))
    if packed:  # (data, batch_sizes, hx, params, has_biases, layers, dropout, train, bidirectional)
        data, batch_sizes, hx, params, has_biases, layers, dropout, train, bidirectional = args[:9]
        steps = [int(b) for b in batch_sizes]
        batch_first = False
    else:  # (input, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first)
        data, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first = args[:9]
        batch_sizes = None
        if batch_first:
            data = data.transpose(0, 1)
        steps = [data.shape[1]] * data.shape[0]
    return {"mode": mode, "data": data, "packed": packed, "batch_sizes": batch_sizes,
            "steps": steps, "hx": hx, "params": list(params), "has_biases": has_biases,
            "layers": layers, "dropout": dropout, "train": train,
            "directions": 2 if bidirectional else 1, "batch_first": batch_first}


def _step_inputs(data: torch.Tensor, packed: bool, steps: list[int]) -> list[torch.Tensor]:
    if not packed:
        return list(data.unbind(0))
    return list(data.split(steps, 0))


def _cell(mode, x_part, hidden, cell_state, weights, round_hidden):
    """One step for the rows in ``hidden``: ``x_part`` is ``x W_ih^T + b_ih`` already."""
    w_hh, b_hh, w_hr = weights
    h_part = functional.linear(round_hidden(hidden), w_hh, b_hh)
    if mode == "lstm":
        i, f, g, o = (x_part + h_part).chunk(4, 1)
        cell_state = torch.sigmoid(f) * cell_state + torch.sigmoid(i) * torch.tanh(g)
        new = torch.sigmoid(o) * torch.tanh(cell_state)
        return (new if w_hr is None else functional.linear(new, w_hr)), cell_state
    if mode == "gru":
        x_r, x_z, x_n = x_part.chunk(3, 1)
        h_r, h_z, h_n = h_part.chunk(3, 1)
        reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_n + reset * h_n)
        return (1 - update) * candidate + update * hidden, None
    total = x_part + h_part
    return (torch.tanh(total) if mode == "tanh" else torch.relu(total)), None


def _direction(mode, inputs, steps, hidden, cell_state, weights, reverse, round_hidden):
    """One layer, one direction, over the steps; returns per-step outputs (in time order) and
    the final states."""
    w_ih, b_ih = weights[:2]
    outputs = [None] * len(inputs)
    order = range(len(inputs) - 1, -1, -1) if reverse else range(len(inputs))
    for t in order:
        rows = steps[t]
        x_part = functional.linear(inputs[t], w_ih, b_ih)
        new, new_cell = _cell(mode, x_part, hidden[:rows],
                              None if cell_state is None else cell_state[:rows],
                              weights[2:], round_hidden)
        outputs[t] = new
        hidden = new if rows == hidden.shape[0] else torch.cat([new, hidden[rows:]])
        if cell_state is not None:
            cell_state = new_cell if rows == cell_state.shape[0] else \
                torch.cat([new_cell, cell_state[rows:]])
    return outputs, hidden, cell_state


def recurrence_by_definition(func, args: tuple, kwargs: dict, round_hidden):
    """What ``func(*args)`` (a fused ``torch.lstm``/``gru``/``rnn_tanh``/``rnn_relu`` call, as
    ``nn.LSTM``/``nn.GRU``/``nn.RNN`` make it) returns, computed step by step with
    ``round_hidden`` applied where a weight product reads a hidden state (module docstring)."""
    if kwargs:
        raise TypeError(f"unexpected keyword arguments to {func.__name__}: {sorted(kwargs)}")
    call = _parse(func, args)
    mode, params, directions = call["mode"], call["params"], call["directions"]
    hx = call["hx"]
    hidden0, cell0 = (hx[0], hx[1]) if mode == "lstm" else (hx, None)
    per_layer = len(params) // (call["layers"] * directions)
    projected = mode == "lstm" and hidden0.shape[-1] != cell0.shape[-1]
    inputs = _step_inputs(call["data"], call["packed"], call["steps"])
    final_hidden, final_cell = [], []
    for layer in range(call["layers"]):
        if layer:
            inputs = [round_hidden(x) for x in inputs]  # the previous layer's hidden states
        results = []
        for direction in range(directions):
            index = layer * directions + direction
            group = params[index * per_layer:(index + 1) * per_layer]
            w_ih, w_hh = group[0], group[1]
            b_ih, b_hh = (group[2], group[3]) if call["has_biases"] else (None, None)
            w_hr = group[-1] if projected else None
            outputs, hidden, cell_state = _direction(
                mode, inputs, call["steps"], hidden0[index],
                None if cell0 is None else cell0[index], (w_ih, b_ih, w_hh, b_hh, w_hr),
                direction == 1, round_hidden)
            results.append(outputs)
            final_hidden.append(hidden)
            if cell_state is not None:
                final_cell.append(cell_state)
        inputs = [torch.cat(parts, -1) for parts in zip(*results)] if directions > 1 \
            else results[0]
        if call["train"] and call["dropout"] and layer < call["layers"] - 1:
            inputs = [functional.dropout(x, call["dropout"], True) for x in inputs]
    if call["packed"]:
        output = torch.cat(inputs, 0)
    else:
        output = torch.stack(inputs, 0)
        if call["batch_first"]:
            output = output.transpose(0, 1)
    hidden_n = torch.stack(final_hidden, 0)
    if mode == "lstm":
        return output, hidden_n, torch.stack(final_cell, 0)
    return output, hidden_n
