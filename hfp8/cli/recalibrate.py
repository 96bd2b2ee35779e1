"""The ``hfp8-ptq recalibrate-bn`` command: BatchNorm re-estimation that cannot silently wreck a
model, and the one name of the BN mode (``--bn-recalibration``, as ``QuantConfig``).

Every 4th batch of the folder (batch indices 3, 7, ...; with 2 or 3 batches, the last) is held
out (:class:`hfp8.data.batches.HeldOutSplit`): the statistics come from the others, and the outputs of the model before and after are
compared with the float model's on the held-out batches. Per held-out sample ``i``, ``e_i`` is
the squared output error relative to the float output's mean square (summed over outputs); the
result is *worse* when the mean of ``e_after - e_before`` exceeds 3 standard errors of it (the
paired test of :func:`hfp8.export.verify.paired_test`), and then nothing is written unless
``--force``. Under torchrun the sums behind the test are reduced over ranks (batch ``i`` of rank
``r`` is batch ``i * world + r`` of the folder).
"""

from __future__ import annotations

import math
import warnings

BN_FLAGS_BEFORE = {"--method": "method", "--bn-method": "bn_method"}  # older spellings


def bn_recalibration(args, default: str = "shift") -> str:
    """The BN mode from ``--bn-recalibration`` or an older spelling (which warns)."""
    from hfp8.cli.inputs import UsageError

    chosen = args.bn_recalibration
    older = {flag: getattr(args, attribute, None) for flag, attribute in BN_FLAGS_BEFORE.items()}
    if getattr(args, "no_bn_recalibration", False):
        older["--no-bn-recalibration"] = "none"
    for flag, value in older.items():
        if value is None:
            continue
        spelled = flag if flag == "--no-bn-recalibration" else f"{flag} {value}"
        warnings.warn(f"{spelled} is the old spelling of --bn-recalibration {value}",
                      stacklevel=2)
        if chosen is not None and chosen != value:
            raise UsageError(f"--bn-recalibration {chosen} and {spelled} disagree")
        chosen = value
    return chosen or default


def _errors(models: list, reference, batches) -> tuple[list[list[float]], float, list[float]]:
    """Per held-out sample, each model's squared output error relative to the reference (as
    verification measures it); the reference's output energy and each model's error energy."""
    import torch

    from hfp8.data.model_io import call_model, output_leaves
    from hfp8.export.verify import _per_sample_errors

    per_sample: list[list[float]] = [[] for _ in models]
    signal, noise = 0.0, [0.0 for _ in models]
    with torch.no_grad():
        for batch in batches:
            wanted = [t for _, t in output_leaves(call_model(reference, batch))
                      if t.is_floating_point()]
            signal += sum(float(t.double().square().sum()) for t in wanted)
            size = int(wanted[0].shape[0]) if wanted and wanted[0].dim() else 1
            for index, model in enumerate(models):
                got = [t for _, t in output_leaves(call_model(model, batch))
                       if t.is_floating_point()]
                noise[index] += sum(float((g.double() - w.double()).square().sum())
                                    for g, w in zip(got, wanted))
                per_sample[index].extend(_per_sample_errors(got, wanted, size))
    return per_sample, signal, noise


def check_held_out(before, after, reference, batches) -> dict:
    """The paired test of ``after`` against ``before`` on ``batches`` (see the module
    docstring), reduced over ranks."""
    import torch

    from hfp8 import distributed
    from hfp8.numerics.sqnr import sqnr_db

    (errors_before, errors_after), signal, noise = _errors([before, after], reference, batches)
    differences = torch.tensor([a - b for a, b in zip(errors_after, errors_before)],
                               dtype=torch.float64)
    sums = torch.tensor([float(differences.sum()), float(differences.square().sum()),
                         float(differences.numel()), signal, *noise], dtype=torch.float64)
    total, squares, count, signal, noise_before, noise_after = \
        distributed.all_reduce(sums).tolist()
    mean = total / count if count else 0.0
    variance = (squares - count * mean * mean) / (count - 1) if count > 1 else 0.0
    error = math.sqrt(max(variance, 0.0) / count) if count > 1 else 0.0
    return {"samples": int(count), "sqnr_before_db": sqnr_db(signal, noise_before),
            "sqnr_after_db": sqnr_db(signal, noise_after), "mean_difference": mean,
            "standard_error": error, "worse": mean > 3 * error and mean > 0}


def recalibrate_bn(args) -> tuple[dict, str, int]:
    # imported here, not at the top: building the parser must stay light (see hfp8.cli.finetune)
    import copy

    import hfp8
    from hfp8.cli import inputs
    from hfp8.cli.outputs import check_output, write_outputs
    from hfp8.data.batches import HeldOutSplit
    from hfp8.data.model_files import load_model
    from hfp8.data.samples import SampleFolder
    from hfp8.ptq.report import report_of

    check_output(args.output, [args.qmodel, args.reference], args.overwrite, [args.calib],
                 arch=getattr(args, "arch", None))
    method = bn_recalibration(args)
    if not args.reference:
        raise inputs.UsageError("recalibrate-bn needs --reference FLOAT_MODEL: the shift is "
                                "measured against it, and the result is checked against it")
    device = inputs.torch_device(args.device)
    qmodel, arch = inputs.load_qmodel(args.qmodel, args.arch)
    qmodel = qmodel.to(device)
    metadata = report_of(qmodel).metadata or {}
    samples = SampleFolder(args.calib, inputs.sample_config(args, metadata.get("preprocessing")))
    inputs.dry_run(qmodel, inputs.first_batch(samples), args.calib, samples.config)
    reference = load_model(args.reference, arch, args.trust_pickle).eval().to(device)
    split = HeldOutSplit(samples)
    if split.total < 2 and not args.force:
        raise inputs.UsageError(f"{args.calib} gives {split.total} batch; recalibrate-bn holds "
                                "batches out to check the result and needs at least 2 (lower "
                                "--batch-size, or --force to write it unchecked)")
    before = copy.deepcopy(qmodel).eval()
    bn = hfp8.recalibrate_batchnorm(qmodel, split.train, method=method, reference=reference,
                                    quiet=args.quiet)
    report_of(qmodel).metadata = {**metadata, "architecture": arch}
    report = {"output": args.output, "batchnorm": bn}
    lines = [f"re-estimated {bn['batchnorm_layers']} BatchNorm layers ({bn['method']}) from "
             f"{bn['samples']} samples"]
    if split.total >= 2:
        check = check_held_out(before, qmodel.eval(), reference, split.held_out)
        report["held_out"] = check
        change = (f"held-out output SQNR vs the float model {check['sqnr_before_db']:.2f} dB -> "
                  f"{check['sqnr_after_db']:.2f} dB on {check['samples']} samples")
        if check["worse"] and not args.force:
            raise inputs.UsageError(f"the re-estimated model is worse: {change}; nothing was "
                                    "written (--force writes it anyway)")
        lines.append(change + (" (worse; written because of --force)" if check["worse"] else ""))

    def write(temporaries: list[str]) -> None:
        report["manifest"] = hfp8.save_quantized(qmodel, temporaries[0])

    if not write_outputs([args.output], write, args.overwrite):
        return {}, "", 0  # another rank writes
    lines.append(f"wrote {args.output}")
    return report, "\n".join(lines), 0
