"""Measuring a quantized model against its float reference, or against labels.

For logits ``z`` of the reference and ``z_q`` of the model under test, over N samples:

* top-1 agreement: fraction of samples where ``argmax z == argmax z_q``;
* KL(reference || test): mean over samples of ``sum_k p_k (log p_k - log q_k)`` with
  ``p = softmax(z)``, ``q = softmax(z_q)``, in nats;
* logit SQNR: ``10 log10(sum z^2 / sum (z - z_q)^2)`` in dB over all logits (inf if equal).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hfp8.calibration.batches import calibration_batches, model_device

__all__ = ["fidelity", "top1_accuracy", "collect_logits"]


def fidelity(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, KL(reference || test) and logit SQNR (see the module docstring)."""
    if reference_logits.shape != test_logits.shape or reference_logits.dim() != 2:
        raise ValueError(f"need two (N, classes) logit tensors of one shape, got "
                         f"{tuple(reference_logits.shape)} and {tuple(test_logits.shape)}")
    z, zq = reference_logits.double(), test_logits.double()
    agreement = (z.argmax(1) == zq.argmax(1)).double().mean().item()
    log_p, log_q = z.log_softmax(1), zq.log_softmax(1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean().item()
    noise = ((z - zq) ** 2).sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10((z ** 2).sum().item() / noise)
    return {"top1_agreement": agreement, "kl": kl, "sqnr_db": sqnr}


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(1) == targets.to(logits.device)).double().mean().item()


@torch.no_grad()
def collect_logits(model, batches, quiet: bool = True,
                   description: str = "Evaluating") -> torch.Tensor:
    """Concatenated outputs of ``model`` over the input batches (labels, if the batches carry
    them, are dropped). ``model``: an ``nn.Module``, run in its current mode on its own device,
    or any callable from a CPU batch to logits (an onnxruntime session wrapper, for one)."""
    device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    outputs = [model(x).float().cpu() for x in calibration_batches(batches, None, device,
                                                                   description, quiet)]
    if not outputs:
        raise ValueError("no batches to evaluate")
    return torch.cat(outputs)
