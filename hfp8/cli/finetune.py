"""The ``hfp8-ptq finetune`` command: HFP8 distillation after PTQ (see hfp8.training.distill)."""

from __future__ import annotations


def finetune(args) -> tuple[dict, str, int]:
    # imported here, not at the top: building the parser (add_parser) must stay light, so that
    # --help is fast and an interrupt while starting never lands inside torch's or onnx's imports
    import hfp8
    from hfp8.cli import inputs
    from hfp8.cli.outputs import check_output, write_outputs
    from hfp8.data.model_files import load_model
    from hfp8.data.samples import SampleFolder
    from hfp8.ptq.report import report_of
    from hfp8.training import TrainingConfig
    from hfp8.training import finetune as run_finetune

    check_output(args.output, [args.qmodel, args.reference], args.overwrite,
                 [args.calib, args.data, args.val],
                 arch=getattr(args, "arch", None))
    if args.steps is not None and args.epochs is not None:
        raise inputs.UsageError("give --steps or --epochs, not both")
    for name in ("steps", "epochs", "patience"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise inputs.UsageError(f"--{name} must be at least 1")
    device = inputs.torch_device(args.device)
    qmodel, arch = inputs.load_qmodel(args.qmodel, args.arch)
    qmodel = qmodel.to(device)
    metadata = report_of(qmodel).metadata or {}
    teacher = load_model(args.reference, arch, args.trust_pickle).to(device)
    preprocessing = metadata.get("preprocessing")
    folder, labelled = (args.data, True) if args.data else (args.calib, False)
    samples = SampleFolder(folder, inputs.sample_config(args, preprocessing, labels=labelled))
    inputs.dry_run(qmodel, inputs.first_batch(samples), folder, samples.config)
    config = TrainingConfig(gradient_rounding="stochastic" if args.stochastic_gradients else "nearest",
                            seed=args.seed)
    validation = None
    if args.val:
        validation = SampleFolder(args.val, inputs.sample_config(args, preprocessing,
                                                                 labels=labelled))
    tuned = run_finetune(qmodel, teacher, samples, steps=args.steps, epochs=args.epochs,
                         lr=args.lr, label_weight=args.label_weight if labelled else 0.0,
                         config=config, quiet=args.quiet, validation=validation,
                         augment=args.augment, schedule=args.lr_schedule,
                         patience=args.patience)
    tuned = tuned.cpu()  # the file holds CPU tensors whatever ran the training
    report_of(tuned).metadata = {**metadata, "architecture": arch}
    report = {"output": args.output}

    def write(temporaries: list[str]) -> None:
        report["manifest"] = hfp8.save_quantized(tuned, temporaries[0])

    if not write_outputs([args.output], write, args.overwrite):
        return {}, "", 0  # another rank writes
    training = report["manifest"]["training"]
    report["training"] = training
    text = (f"HFP8 fine-tuning (1-4-3 forward, 1-5-2 backward): {training['steps']} steps "
            f"({training['skipped_steps']} skipped) in {training['seconds']:.0f} s; distillation "
            f"loss {training['loss_before']:.4g} -> {training['loss_after']:.4g} on the "
            f"training batches\n{_held_out_text(training['held_out'])}\n"
            f"{hfp8.format_manifest(report['manifest'])}\nwrote {args.output}")
    return report, text, 0


def _held_out_text(held: dict) -> str:
    if not held.get("checked"):
        return "held-out check: none (fewer than 2 batches and no --val)"
    epochs = held["epochs"]
    early = bool(held.get("stopped_early"))
    if held["kept"] == "fine-tuned":
        kept = f"epoch {held['epoch']} of {len(epochs)} kept" + ", stopped early" * early
        return (f"held-out distillation loss {held['loss_before']:.4g} -> {held['loss_after']:.4g} "
                f"({kept}): the fine-tuned model is written")
    tried = ", ".join(f"{epoch['loss']:.4g}" for epoch in epochs) + "; stopped early" * early
    return (f"no held-out gain (distillation loss {held['loss_before']:.4g}; after each epoch "
            f"{tried}): the input model is written unchanged")


def add_parser(command, model_arguments, sample_arguments) -> None:
    f = command("finetune", "fine-tune a quantized model in HFP8, distilling the float model")
    f.add_argument("qmodel", help="quantized model file (from quantize)")
    f.add_argument("--calib", required=True, metavar="DIR",
                   help="samples to distil on (unlabelled; also re-chooses the input biases)")
    f.add_argument("--reference", required=True, metavar="FLOAT_MODEL",
                   help="the float model (the teacher), built with --arch")
    f.add_argument("-o", "--output", required=True, metavar="OUT", help="quantized model file to write")
    f.add_argument("--data", metavar="DIR", help="labelled samples (one sub-folder per class) to "
                   "train on instead, with a cross-entropy term beside the distillation")
    f.add_argument("--val", metavar="DIR", help="samples to judge on (default: every 4th batch of "
                   "the training samples is held out); the input model is written unchanged "
                   "unless the fine-tuned one is better there")
    f.add_argument("--steps", type=int, metavar="N", help="optimizer steps (default: one epoch)")
    f.add_argument("--epochs", type=int, metavar="N", help="passes over the samples")
    f.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate (default 1e-5)")
    f.add_argument("--label-weight", type=float, default=1.0,
                   help="weight of the cross-entropy term with --data (default 1)")
    f.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                   help="cosine: decay --lr to 0 over the steps (default); constant: keep it")
    f.add_argument("--augment", action="store_true",
                   help="train on random resized crops and mirror images of image inputs, the "
                   "same view for teacher and student (default: the samples as they are)")
    f.add_argument("--patience", type=int, metavar="N",
                   help="stop after N epochs without a better held-out loss (default: run every "
                   "epoch; the best one is kept either way)")
    f.add_argument("--stochastic-gradients", action="store_true",
                   help="round gradients stochastically (seeded by --seed)")
    model_arguments(f)
    sample_arguments(f, "samples", recorded=True)
    f.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return f
