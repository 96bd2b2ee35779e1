"""The ``hfp8-ptq`` argument parser: commands, options, help texts and examples.

Standard library only: usage errors are printed before torch is imported.
"""

from __future__ import annotations

import argparse

__all__ = ["build_parser", "device_argument"]


MAIN_EPILOG = """examples (the built-in example, then your own model):
  hfp8-ptq example demo && cd demo
  hfp8-ptq quantize model.pt --arch hfp8.examples:fashion_cnn --calib calibration \\
      --channels 1 --mean 0 --std 1 --resize 0 --crop 0 -o model.hfp8.pt --onnx model.onnx
  hfp8-ptq evaluate model.onnx --data test
  hfp8-ptq quantize resnet.pt --arch mypkg.models:resnet18 --calib photos/ -o resnet.hfp8.pt
  hfp8-ptq export resnet.hfp8.pt --arch mypkg.models:resnet18 -o resnet.onnx
  hfp8-ptq finetune resnet.hfp8.pt --arch recorded --calib photos/ --reference resnet.pt -o tuned.pt
run 'hfp8-ptq COMMAND --help' for each command's flags and examples"""

EPILOGS = {
    "quantize": """examples:
  hfp8-ptq quantize model.pt --arch mypkg.models:resnet18 --calib photos/ -o model.hfp8.pt
  hfp8-ptq quantize model.pt --arch hfp8.examples:fashion_cnn --calib calibration \\
      --channels 1 --mean 0 --std 1 --resize 0 --crop 0 -o model.hfp8.pt --onnx model.onnx
  hfp8-ptq quantize model.pt --arch m.py:build --calib photos/ --exclude 'features.1.*' -o q.pt""",
    "recalibrate-bn": """examples:
  hfp8-ptq recalibrate-bn model.hfp8.pt --arch recorded --calib more_photos/ \\
      --reference model.pt -o model2.hfp8.pt
  hfp8-ptq recalibrate-bn model.hfp8.pt --arch mypkg.models:net --calib photos/ \\
      --bn-recalibration full --reference model.pt -o q2.pt""",
    "export": """examples:
  hfp8-ptq export model.hfp8.pt --arch recorded -o model.onnx
  hfp8-ptq export model.hfp8.pt --arch mypkg.models:net -o model.onnx --verify-data photos/""",
    "evaluate": """examples:
  hfp8-ptq evaluate model.onnx --data test/                       (top-1: one sub-folder per class)
  hfp8-ptq evaluate model.hfp8.pt --arch mypkg.models:net --data photos/ --reference model.pt
  hfp8-ptq evaluate model.pt --arch hfp8.examples:fashion_cnn --data test/ --channels 1 ...
  hfp8-ptq evaluate lm.hfp8.pt --arch mypkg.models:lm --data tokens/ --perplexity --reference lm.pt
--arch builds MODEL and, with --reference, the float model too (for a quantized file,
--arch recorded: the architecture the file names).""",
    "inspect": """examples:
  hfp8-ptq inspect model.hfp8.pt
  hfp8-ptq inspect model.hfp8.pt --plot layers.png
  hfp8-ptq inspect model.onnx --json""",
    "example": """examples:
  hfp8-ptq example demo && cd demo   (then follow the commands it prints)""",
    "finetune": """examples:
  hfp8-ptq finetune model.hfp8.pt --arch recorded --calib calibration --reference model.pt \
      -o tuned.hfp8.pt --epochs 4
  hfp8-ptq finetune q.pt --arch mypkg.models:net --calib photos/ --reference net.pt -o t.pt \
      --data labelled/ --lr 3e-5 --steps 500""",
}

ARCH_HELP = ("callable that builds the float model: package.module:factory (looked up from "
             "the current folder first, as python -m does) or path/to/file.py:factory (its "
             "code runs). For a quantized or ONNX file, 'recorded' builds the architecture the "
             "file names; a file's own record is never run unasked. It also builds --reference")


DEVICE_HELP = ("where PyTorch runs the model (calibration, BatchNorm, sensitivity, weight "
               "rounding, training, evaluation): auto = cuda when torch sees a GPU, else cpu; "
               "files written are the same either way (tensors saved from the CPU)")


def device_argument(parser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help=DEVICE_HELP)


def _external_data_argument(parser, onnx_flag: str) -> None:
    parser.add_argument("--external-data", action="store_true",
                        help=f"write the ONNX weights to a second file, FILE.data beside "
                             f"{onnx_flag} (which names it: keep the two together); needed "
                             "once the ONNX file would pass 2 GiB")


def _model_arguments(parser, reference: str | None = None, device: bool = True) -> None:
    parser.add_argument("--arch", metavar="MODULE:FACTORY", help=ARCH_HELP)
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow loading a whole pickled nn.Module (runs code from the file)")
    if reference:
        parser.add_argument("--reference", metavar="FLOAT_MODEL", help=reference)
    if device:
        device_argument(parser)


def _sample_arguments(parser, title: str, recorded: bool = False, verify: bool = False) -> None:
    default = ("default: what the model was quantized with" if recorded else None)
    group = parser.add_argument_group(title)
    group.add_argument("--resize", type=int, metavar="PIXELS",
                       help=f"resize the short side; 0 = keep ({default or 'default 256'})")
    group.add_argument("--crop", type=int, metavar="PIXELS",
                       help=f"centre crop; 0 = none ({default or 'default 224'})")
    group.add_argument("--mean", type=float, nargs="+", help="per-channel mean on the [0,1] scale "
                       f"({default or 'default ImageNet'})")
    group.add_argument("--std", type=float, nargs="+",
                       help=f"per-channel std ({default or 'default ImageNet'})")
    group.add_argument("--channels", type=int, choices=(1, 3),
                       help=f"1 = greyscale, 3 = RGB ({default or 'default 3'})")
    group.add_argument("--num-samples", type=int, metavar="N", help="use at most N samples")
    group.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="samples per batch (default 32)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed for choosing --num-samples" + (
                           " and for random verification inputs" if verify else ""))
    group.add_argument("--workers", type=int, default=2,
                       help="image decoding threads (default 2 here; SampleConfig's default 0 "
                            "decodes in the calling thread)")
    group.add_argument("--strict", action="store_true",
                       help="stop at the first unusable file instead of skipping it")


def build_parser() -> argparse.ArgumentParser:
    from hfp8._version import __version__

    parser = argparse.ArgumentParser(
        prog="hfp8-ptq", description="Post-training quantization to HFP8 (1-4-3 / 1-5-2) with "
        "exact FP8 QDQ ONNX export.", epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hfp8-ptq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOGS[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    q = command("quantize", "quantize a float model with calibration samples")
    q.add_argument("model", help="float model: a state dict (with --arch) or a pickled module")
    q.add_argument("--calib", required=True, metavar="DIR", help="folder of calibration samples")
    q.add_argument("-o", "--output", required=True, metavar="OUT", help="quantized model file to write")
    q.add_argument("--onnx", metavar="FILE", help="also export (and verify) FP8 QDQ ONNX")
    q.add_argument("--no-verify", action="store_true", help="skip the onnxruntime verification")
    _external_data_argument(q, "--onnx FILE")
    _model_arguments(q)
    fmt = q.add_argument_group("quantization")
    fmt.add_argument("--format", choices=("e4m3", "e5m2"), default="e4m3",
                     help="weights and activations (default e4m3, the HFP8 forward format)")
    fmt.add_argument("--bias-method", choices=("mse", "max", "fixed"), default="mse",
                     help="exponent-bias selection for weights and inputs (default mse)")
    fmt.add_argument("--per-channel", action="store_true",
                     help="one weight bias per output channel (default: one per tensor)")
    fmt.add_argument("--weights-only", action="store_true", help="keep layer inputs in float")
    fmt.add_argument("--no-attention", action="store_true",
                     help="keep attention products (matmul/sdpa operands) in float")
    fmt.add_argument("--round-recurrent-state", action="store_true",
                     help="also round the hidden state of LSTM/GRU/RNN layers before their "
                          "recurrent product (step by step; exports unrolled for the example's "
                          "sequence length)")
    fmt.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                     help="keep layers or attention sites matching this name pattern in float "
                          "(repeatable)")
    fmt.add_argument("--include", action="append", default=[], metavar="PATTERN",
                     help="quantize matching layers even if first or last (repeatable)")
    fmt.add_argument("--quantize-first-last", action="store_true",
                     help="also quantize the first and last layers (kept float by default)")
    fmt.add_argument("--bn-recalibration", choices=("shift", "full", "none"), default=None,
                     help="BatchNorm re-estimation: shift (default: the float model's statistics "
                          "plus the quantization shift; robust with few samples), full (these "
                          "samples' statistics) or none")
    # the names before --bn-recalibration, kept working (each says so in a warning)
    fmt.add_argument("--no-bn-recalibration", action="store_true", help=argparse.SUPPRESS)
    fmt.add_argument("--bn-method", choices=("shift", "full"), help=argparse.SUPPRESS)
    fmt.add_argument("--bn-shift-stride", type=int, default=2, metavar="K",
                     help="measure the BN shift on every K-th calibration batch, where the float "
                          "model runs beside the quantized one (default 2; 1 = every batch)")
    fmt.add_argument("--weight-rounding", choices=("compensated", "nearest"), default="compensated",
                     help="compensated (default: error-compensating rounding onto the same FP8 "
                          "grid) or nearest")
    fmt.add_argument("--float-budget", type=float, default=0.01, metavar="FRACTION",
                     help="keep the most sensitive layers float within this fraction of the "
                          "quantized layers' weights (or MACs); 0 = none (default 0.01)")
    fmt.add_argument("--budget-unit", choices=("weights", "macs"), default="weights",
                     help="what --float-budget counts (default weights)")
    fmt.add_argument("--target-sqnr", type=float, metavar="DB",
                     help="stop keeping layers float once the predicted output SQNR reaches DB")
    fmt.add_argument("--plot", metavar="FILE.png",
                     help="also draw per-layer sensitivity, SQNR and saturation (needs matplotlib)")
    _sample_arguments(q, "samples")

    r = command("recalibrate-bn", "re-estimate BatchNorm statistics of a quantized model")
    r.add_argument("qmodel", help="quantized model file (from quantize)")
    r.add_argument("--calib", required=True, metavar="DIR", help="folder of samples to measure on")
    r.add_argument("-o", "--output", required=True, metavar="OUT", help="quantized model file to write")
    r.add_argument("--bn-recalibration", choices=("shift", "full"), default=None,
                   help="shift (default, as in quantize: the float model's statistics plus the "
                        "quantization shift measured on these samples) or full (these samples' "
                        "statistics)")
    r.add_argument("--method", choices=("full", "shift"), help=argparse.SUPPRESS)  # old name
    r.add_argument("--force", action="store_true",
                   help="write the result even if its outputs are further from the float "
                        "model's on the held-out samples than before")
    _model_arguments(r, reference="the float model (required): shift re-estimates from it, and "
                                  "the result is checked against it on every 4th batch, held out")
    _sample_arguments(r, "samples", recorded=True)

    e = command("export", "export a quantized model as FP8 QDQ ONNX and verify it")
    e.add_argument("qmodel", help="quantized model file (from quantize)")
    e.add_argument("-o", "--output", required=True, metavar="FILE", help="ONNX file to write")
    e.add_argument("--opset", type=int, default=19, help="ONNX opset 19..21 (default 19)")
    e.add_argument("--no-verify", action="store_true", help="skip the onnxruntime verification")
    e.add_argument("--verify-data", metavar="DIR", help="samples for verification (default: "
                   "seeded random inputs of the recorded input shape)")
    _external_data_argument(e, "-o FILE")
    _model_arguments(e, device=False)
    _sample_arguments(e, "samples for --verify-data", recorded=True, verify=True)

    v = command("evaluate", "top-1 on a labelled folder, or fidelity to the float model")
    v.add_argument("model", help="float model, quantized model or ONNX file")
    v.add_argument("--data", required=True, metavar="DIR",
                   help="one sub-folder per class (top-1), or any samples with --reference")
    _model_arguments(v, reference="compare with this float model (per output: SQNR, cosine; "
                                  "classifier outputs also top-1 agreement and KL) instead of labels")
    v.add_argument("--perplexity", action="store_true",
                   help="the samples are token-id sequences (int .npy/.pt files, or dicts with "
                        "input_ids): report the next-token perplexity of a causal language "
                        "model (with --reference, of both models)")
    _sample_arguments(v, "samples", recorded=True)

    i = command("inspect", "show a quantized model's manifest (layers, formats, biases)")
    i.add_argument("file", help="quantized model file or exported ONNX file")
    i.add_argument("--plot", metavar="FILE.png",
                   help="draw per-layer sensitivity, SQNR and saturation (needs matplotlib)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing plot file")

    x = command("example", "copy the built-in example (model + sample folders) into a folder")
    x.add_argument("folder", help="new or empty folder")

    from hfp8.cli.finetune import add_parser

    t = add_parser(command, _model_arguments, _sample_arguments)
    for p in (q, r, e):
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    for p in (q, r, t):
        p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others before it "
                            "gives up (default 600)")
    for p in (q, r, e, v, i, x, t):
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        # inspect and example have no progress to hide: they accept --quiet (scripts pass it
        # to every command) without offering it
        quiet_help = argparse.SUPPRESS if p in (i, x) else "no progress bars or phase lines"
        p.add_argument("--quiet", action="store_true", help=quiet_help)
        p.add_argument("--debug", action="store_true", help="show the traceback of any error")
    return parser
