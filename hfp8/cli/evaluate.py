"""``hfp8-ptq evaluate``: top-1 on a labelled folder, fidelity to a float model (--reference),
or next-token perplexity (--perplexity), for a .pt, .hfp8.pt or .onnx model."""

from __future__ import annotations

import warnings

import torch

from hfp8.cli import inputs
from hfp8.data.samples import SampleError, SampleFolder
from hfp8.ptq.evaluation import collect_logits, compare_outputs, perplexity, top1_accuracy

__all__ = ["evaluate"]


def _fidelity_text(result: dict) -> str:
    parts = []
    for name, metrics in result["outputs"].items():
        text = f"{name}: SQNR {metrics['sqnr_db']:.2f} dB, cosine {metrics['cosine']:.5f}"
        if "top1_agreement" in metrics:
            text += f", top-1 agreement {metrics['top1_agreement']:.4f}, KL {metrics['kl']:.4g} nats"
        parts.append(text)
    return "; ".join(parts) + f" on {result['samples']} samples"


def _check_class_scores(logits, class_names) -> None:
    """Top-1 needs ``(N, classes)`` float scores; a count unlike the folder's is said."""
    if not logits.is_floating_point() or logits.dim() != 2:
        raise inputs.UsageError(
            f"top-1 needs the model to return one score per class, shape (N, classes); it "
            f"returns shape {tuple(logits.shape)} (to compare it with a float model on the same "
            "samples, pass --reference)")
    if logits.shape[1] != len(class_names):
        first = ", ".join(class_names[:3]) + (", ..." if len(class_names) > 3 else "")
        warnings.warn(f"the model scores {logits.shape[1]} classes and the folder has "
                      f"{len(class_names)} class sub-folders; class i is the i-th sub-folder in "
                      f"sorted order ({first})", stacklevel=2)


def evaluate(args) -> tuple[dict, str, int]:
    device = inputs.torch_device(args.device)
    model, preprocessing, arch = inputs.runner(args.model, args.arch, args.trust_pickle)
    if isinstance(model, torch.nn.Module):
        model = model.to(device)
    labelled = not args.reference and not args.perplexity
    try:
        samples = SampleFolder(args.data, inputs.sample_config(args, preprocessing, labels=labelled))
    except SampleError as error:
        if labelled and "one sub-folder per class" in str(error):
            raise inputs.UsageError(f"{args.data} has no class sub-folders, so there are no labels "
                                    "for top-1; to compare with the float model on unlabelled "
                                    "samples, pass --reference FLOAT_MODEL") from None
        raise
    inputs.upscaled_images(samples)
    inputs.dry_run(model, inputs.first_batch(samples), args.data, samples.config)
    progress = dict(quiet=args.quiet, description="Evaluating")
    if args.perplexity:
        return _perplexity(args, model, arch, samples, device)
    if labelled:
        targets = torch.cat([t for _, t in samples])
        logits = collect_logits(model, samples, **progress)
        _check_class_scores(logits, samples.class_names)
        report = {"top1": top1_accuracy(logits, targets), "samples": len(targets),
                  "classes": len(samples.class_names)}
        text = f"top-1 accuracy {report['top1']:.4f} on {report['samples']} samples " \
               f"({report['classes']} classes)"
        return report, text, 0
    reference_arch = inputs.reference_architecture(args.arch, arch, args.model)
    reference, _, _ = inputs.runner(args.reference, reference_arch, args.trust_pickle)
    if isinstance(reference, torch.nn.Module):
        reference = reference.to(device)
    result = compare_outputs(reference, model, samples, **progress)
    report = dict(result)
    if len(result["outputs"]) == 1:  # one output: its metrics at the top level too
        report.update(next(iter(result["outputs"].values())))
    return report, _fidelity_text(result), 0


def _perplexity(args, model, arch, samples, device) -> tuple[dict, str, int]:
    """evaluate --perplexity: next-token perplexity on token-id samples (and the float
    model's, with --reference)."""
    try:
        report = perplexity(model, samples, quiet=args.quiet, description="Perplexity")
    except ValueError as error:
        raise inputs.UsageError(f"--perplexity: {error}") from None
    text = (f"perplexity {report['perplexity']:.4f} ({report['mean_nll']:.4f} nats per token) "
            f"on {report['tokens']} predicted tokens of {report['sequences']} sequences")
    if args.reference:
        reference_arch = inputs.reference_architecture(args.arch, arch, args.model)
        reference, _, _ = inputs.runner(args.reference, reference_arch, args.trust_pickle)
        if isinstance(reference, torch.nn.Module):
            reference = reference.to(device)
        floats = perplexity(reference, samples, quiet=args.quiet,
                            description="Perplexity (reference)")
        change = report["perplexity"] / floats["perplexity"] - 1
        report = {**report, "reference_perplexity": floats["perplexity"], "relative_change": change}
        text += f"; reference {floats['perplexity']:.4f} ({100 * change:+.2f}%)"
    return report, text, 0
