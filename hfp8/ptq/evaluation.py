"""Measuring a quantized model against its float reference (outputs of any structure), or
against labels.

Per output leaf (see :func:`hfp8.data.model_io.output_leaves`), with reference ``z`` and test ``z_q``
over N samples:

* SQNR: ``10 log10(sum z^2 / sum (z - z_q)^2)`` in dB over all values (inf if equal);
* cosine: mean over samples of ``<z_i, z_q_i> / (|z_i| |z_q_i|)`` (each sample flattened), the
  fidelity measure for embeddings;
* for classifier-shaped leaves only (2-D, ``(N, classes)`` with at least 2 classes): top-1
  agreement (``argmax z == argmax z_q``) and KL(reference || test) = mean over samples of
  ``sum_k p_k (log p_k - log q_k)``, ``p = softmax(z)``, ``q = softmax(z_q)``, in nats.
  (A 2-D regression output is shaped like logits too; read these two only where it is one.)

For causal language models, :func:`perplexity`: ``exp`` of the mean next-token negative
log-likelihood ``-log softmax(logits[:, t])[tokens[:, t + 1]]`` (nats) over every predicted
position, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from hfp8.data.batches import calibration_batches, model_device, to_device
from hfp8.data.model_io import call_model, output_leaves
from hfp8.numerics.sqnr import sqnr_db
from hfp8.ptq.operand_sites import owners_closed

__all__ = ["fidelity", "top1_accuracy", "collect_logits", "compare_outputs", "OutputComparison",
           "perplexity"]


def fidelity(reference_logits: torch.Tensor, test_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement, KL(reference || test) and logit SQNR of two ``(N, classes)`` tensors."""
    if reference_logits.shape != test_logits.shape or reference_logits.dim() != 2:
        raise ValueError(f"need two (N, classes) logit tensors of one shape, got "
                         f"{tuple(reference_logits.shape)} and {tuple(test_logits.shape)}")
    comparison = OutputComparison()
    comparison.update(reference_logits, test_logits)
    result = comparison.result()["outputs"]["output"]
    return {"top1_agreement": result["top1_agreement"], "kl": result["kl"],
            "sqnr_db": result["sqnr_db"]}


def top1_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(1) == targets.to(logits.device)).double().mean().item()


class OutputComparison:
    """Streaming comparison of two models' outputs, batch by batch (see the module docstring)."""

    def __init__(self) -> None:
        self.samples = 0
        self.sums: dict[str, dict[str, float]] = {}

    def update(self, reference, test) -> None:
        expected, actual = output_leaves(reference), output_leaves(test)
        if [name for name, _ in expected] != [name for name, _ in actual]:
            raise ValueError(f"outputs differ in structure: {[n for n, _ in expected]} vs "
                             f"{[n for n, _ in actual]}")
        size = None
        for (name, z), (_, zq) in zip(expected, actual):
            if z.shape != zq.shape:
                raise ValueError(f"output {name!r} has shape {tuple(z.shape)} in the reference and "
                                 f"{tuple(zq.shape)} in the model under test")
            z, zq = z.detach().double().cpu(), zq.detach().double().cpu()
            entry = self.sums.setdefault(name, {"signal": 0.0, "noise": 0.0, "cosine": 0.0,
                                                "rows": 0, "agree": 0.0, "kl": 0.0,
                                                "classifier": z.dim() == 2 and z.shape[1] >= 2})
            entry["signal"] += float(z.square().sum())
            entry["noise"] += float((z - zq).square().sum())
            rows = z.reshape(z.shape[0], -1) if z.dim() else z.reshape(1, 1)
            test_rows = zq.reshape(rows.shape)
            cosine = nn.functional.cosine_similarity(rows, test_rows, dim=1, eps=1e-30)
            entry["cosine"] += float(cosine.sum())
            entry["rows"] += rows.shape[0]
            if z.dim() == 2 and z.shape[1] >= 2:
                entry["agree"] += float((z.argmax(1) == zq.argmax(1)).sum())
                log_p, log_q = z.log_softmax(1), zq.log_softmax(1)
                entry["kl"] += float((log_p.exp() * (log_p - log_q)).sum(1).sum())
            size = size or rows.shape[0]
        self.samples += size or 0

    def result(self) -> dict:
        outputs = {}
        for name, entry in self.sums.items():
            noise, signal, rows = entry["noise"], entry["signal"], max(entry["rows"], 1)
            result = {"sqnr_db": sqnr_db(signal, noise),
                      "cosine": entry["cosine"] / rows}
            if entry["classifier"]:
                result["top1_agreement"] = entry["agree"] / rows
                result["kl"] = entry["kl"] / rows
            outputs[name] = result
        return {"samples": self.samples, "outputs": outputs}


def _runner(model):
    """(device, batch -> outputs); labels a batch carries are not passed (see model_io)."""
    device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    return device, lambda batch: call_model(model, batch)


@owners_closed()
@torch.no_grad()
def compare_outputs(reference, test, batches, quiet: bool = True,
                    description: str = "Comparing") -> dict:
    """Run ``reference`` and ``test`` (modules, or callables from a batch to outputs) on every
    batch and compare their outputs (see the module docstring)."""
    comparison = OutputComparison()
    (ref_device, run_reference), (test_device, run_test) = _runner(reference), _runner(test)
    for batch in calibration_batches(batches, None, torch.device("cpu"), description, quiet):
        comparison.update(run_reference(to_device(batch, ref_device)),
                          run_test(to_device(batch, test_device)))
    if comparison.samples == 0:
        raise ValueError("no batches to compare")
    return comparison.result()


@owners_closed()
@torch.no_grad()
def collect_logits(model, batches, quiet: bool = True,
                   description: str = "Evaluating") -> torch.Tensor:
    """Concatenated outputs of a single-output model over the batches (labels, if the batches
    carry them, are not passed). ``model``: an ``nn.Module``, run in its current mode on its
    own device, or any callable from a CPU batch to outputs (an onnxruntime wrapper, say)."""
    device, run = _runner(model)
    outputs = []
    for batch in calibration_batches(batches, None, device, description, quiet):
        leaves = output_leaves(run(batch))
        if len(leaves) != 1:
            raise ValueError(f"the model has {len(leaves)} outputs "
                             f"({', '.join(n for n, _ in leaves)}); top-1 needs one")
        outputs.append(leaves[0][1].float().cpu())
    if not outputs:
        raise ValueError("no batches to evaluate")
    return torch.cat(outputs)



def _tokens_and_mask(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids of a batch: an integer ``(N, T)`` tensor, a mapping's ``input_ids`` (with
    its ``attention_mask``, if any), or the first item of a tuple or list."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"perplexity needs token ids: the batch is a mapping without "
                             f"'input_ids' (keys: {', '.join(map(str, batch))})")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and batch:
        return _tokens_and_mask(batch[0])
    if torch.is_tensor(batch) and not batch.is_floating_point() and batch.dim() == 2:
        return batch, None
    raise ValueError("perplexity needs batches of token ids: integer (N, T) tensors, or "
                     "mappings with 'input_ids'")


def _logits(outputs, tokens: torch.Tensor) -> torch.Tensor:
    for _, leaf in output_leaves(outputs):
        if leaf.is_floating_point() and leaf.dim() == 3 and leaf.shape[:2] == tokens.shape:
            return leaf
    shapes = ", ".join(f"{name} {tuple(leaf.shape)}" for name, leaf in output_leaves(outputs))
    raise ValueError(f"perplexity needs next-token logits of shape (N, T, vocabulary) for "
                     f"tokens of shape {tuple(tokens.shape)}; the model returns {shapes}")


@owners_closed()
@torch.no_grad()
def perplexity(model, batches, quiet: bool = True, description: str = "Perplexity") -> dict:
    """Next-token perplexity of a causal language model over ``batches`` of token ids (see
    :func:`_tokens_and_mask`): position ``t`` predicts token ``t + 1``; where an attention mask
    is given, only pairs whose both tokens are real count. ``model``: a module, or any callable
    from a CPU batch to outputs (an onnxruntime wrapper). Returns ``perplexity`` (``exp`` of
    ``mean_nll``), ``mean_nll`` (nats per token) and the counts of ``tokens`` predicted and
    ``sequences``."""
    device, run = _runner(model)
    total, count, sequences = 0.0, 0, 0
    for batch in calibration_batches(batches, None, device, description, quiet):
        tokens, mask = _tokens_and_mask(batch)
        logits = _logits(run(batch), tokens).double()
        log_probs = logits[:, :-1].log_softmax(-1)
        targets = tokens[:, 1:].to(log_probs.device)
        nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if mask is not None:
            keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
            nll = nll[keep.to(nll.device)]
        total += float(nll.sum())
        count += nll.numel()
        sequences += tokens.shape[0]
    if count == 0:
        raise ValueError("no token was predicted: perplexity needs sequences of 2 or more tokens")
    mean = total / count
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": count,
            "sequences": sequences}
