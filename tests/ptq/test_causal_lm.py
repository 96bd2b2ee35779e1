"""Causal language models: next-token perplexity against cross-entropy written here, a trained
character Transformer quantized with defaults (perplexity within 2% of float), and its prefill
graph (token ids -> logits, batch and sequence dynamic) exported and verified."""

import math

import pytest
import torch
from torch import nn

import hfp8
from hfp8.export.verify import passed
from tests.small_models import char_windows, trained_char_lm


def _perplexity_by_definition(model, tokens):
    """exp of the mean cross-entropy of logits[:, t] against tokens[:, t + 1], float64."""
    with torch.no_grad():
        logits = model(tokens).double()
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       tokens[:, 1:].reshape(-1))
    return math.exp(float(loss))


def test_perplexity_is_exp_of_next_token_cross_entropy():
    model = trained_char_lm()
    tokens = char_windows("test", 48, 40, seed=7)
    result = hfp8.perplexity(model, list(tokens.split(16)))
    assert result["tokens"] == 48 * 39 and result["sequences"] == 48
    assert result["perplexity"] == pytest.approx(_perplexity_by_definition(model, tokens),
                                                 rel=1e-12)


class MaskedLM(nn.Module):
    """Takes ``input_ids`` and ``attention_mask`` as a Hugging Face model does (causal: padding
    at the end changes no earlier position)."""

    def __init__(self):
        super().__init__()
        self.lm = trained_char_lm()

    def forward(self, input_ids, attention_mask):
        return {"logits": self.lm(input_ids)}


def test_padding_masked_out_counts_no_token():
    model = MaskedLM()
    long, short = char_windows("test", 1, 30, seed=8), char_windows("test", 1, 12, seed=9)
    padded = torch.cat([long, torch.cat([short, torch.zeros(1, 18, dtype=torch.int64)], 1)])
    mask = torch.cat([torch.ones(1, 30), torch.cat([torch.ones(1, 12), torch.zeros(1, 18)], 1)])
    result = hfp8.perplexity(model, [{"input_ids": padded, "attention_mask": mask.long()}])
    with torch.no_grad():
        log_probs = model.lm(padded).double().log_softmax(-1)
    pairs = [(0, t) for t in range(29)] + [(1, t) for t in range(11)]  # real token -> real token
    nll = -sum(float(log_probs[row, t, padded[row, t + 1]]) for row, t in pairs)
    assert result["tokens"] == 40
    assert result["mean_nll"] == pytest.approx(nll / 40, rel=1e-12)


def test_perplexity_refuses_what_is_not_token_data_clearly():
    model = trained_char_lm()
    with pytest.raises(ValueError, match="batches of token ids"):
        hfp8.perplexity(model, [torch.randn(2, 8)])
    with pytest.raises(ValueError, match=r"logits of shape \(N, T, vocabulary\)"):
        hfp8.perplexity(lambda batch: batch.float(), [char_windows("test", 2, 8)])
    with pytest.raises(ValueError, match="2 or more tokens"):
        hfp8.perplexity(model, [char_windows("test", 2, 1)])


def test_quantized_char_lm_stays_within_2_percent_and_its_prefill_graph_verifies(tmp_path):
    model = trained_char_lm()
    calibration = list(char_windows("train", 128, 64, seed=3).split(32))
    qmodel = hfp8.quantize_model(model, calibration, quiet=True)
    data = hfp8.manifest(qmodel)
    assert sum(s["status"] == "quantized" for s in data["attention"]) == 2  # both blocks' sdpa
    held_out = list(char_windows("test", 256, 64, seed=2).split(64))
    ratio = hfp8.perplexity(qmodel, held_out)["perplexity"] / \
        hfp8.perplexity(model, held_out)["perplexity"]
    assert ratio <= 1.02, ratio
    path = tmp_path / "lm.onnx"
    hfp8.export_onnx(qmodel, path, char_windows("train", 2, 32, seed=4))
    # other batch sizes and lengths than the example's: the prefill graph is dynamic in both
    report = hfp8.verify_onnx(qmodel, path, [char_windows("test", 6, 48, seed=5),
                                             char_windows("test", 3, 20, seed=6)], reference=model)
    assert report["bit_exact"] and report["whole_model"]["passed"] and passed(report)
    assert all(r["checked"] and r["within_bound"] for r in report["layers"].values())
