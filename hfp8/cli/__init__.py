"""hfp8-ptq: the command line. Thin: it builds configs, calls the Python API and reports.

Exit codes: 0 success, 2 usage or input error (one line on stderr, no traceback), 1 internal
error or a failed ONNX verification (nothing written), 130 interrupted (SIGINT), 143 terminated
(SIGTERM); either signal removes temporary files on the way out. Heavy imports (torch) happen
inside :func:`main`, so that an interrupt while they load also ends in one line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings

from hfp8.cli.parser import build_parser
from hfp8.numerics.sqnr import strict_json

__all__ = ["main", "build_parser"]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"hfp8-ptq: warning: {message}", file=sys.stderr)


def _process_group(args):
    """Under torchrun (WORLD_SIZE > 1): join the process group; only rank 0 writes and prints."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    if not hasattr(args, "dist_timeout"):
        raise SystemExit(f"hfp8-ptq {args.command}: error: this command does not run under "
                         "torchrun (quantize, recalibrate-bn and finetune do)")
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.dist_timeout))
    if dist.get_rank() != 0:
        args.quiet = True
    return dist


def _run(args) -> int:
    from hfp8.cli.usage import UsageError, check_paths

    try:  # before torch loads: a wrong path costs a fraction of a second
        check_paths(args)
    except UsageError as error:
        if args.debug:
            raise
        print(f"hfp8-ptq {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    from hfp8 import distributed
    from hfp8.cli import commands
    from hfp8.cli.evaluate import evaluate
    from hfp8.cli.finetune import finetune
    from hfp8.cli.inputs import one_line
    from hfp8.cli.outputs import VerificationFailed
    from hfp8.cli.recalibrate import recalibrate_bn

    handler = {"quantize": commands.quantize, "recalibrate-bn": recalibrate_bn,
               "export": commands.export, "evaluate": evaluate,
               "inspect": commands.inspect, "example": commands.example,
               "finetune": finetune}[args.command]
    group = _process_group(args)
    args.process_group_used = group is not None
    rank = group.get_rank() if group is not None else 0
    try:
        with distributed.agreed():  # under torchrun: every rank finishes, or every rank errs
            report, text, code = handler(args)
    except VerificationFailed as failure:
        if args.debug:
            raise
        print(f"hfp8-ptq {args.command}: {failure}; nothing was written (--no-verify writes "
              "without the check)", file=sys.stderr)
        return 1
    except commands.INPUT_ERRORS as error:
        if args.debug or _interrupted:  # an input error can also be our bug: show where it came from
            raise
        print(f"hfp8-ptq {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except distributed.DistributedError as error:
        print(f"hfp8-ptq {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the last line of defence
        if args.debug or _interrupted:  # after an interrupt: main says "interrupted"
            raise
        print(f"hfp8-ptq {args.command}: internal error: {type(error).__name__}: "
              f"{one_line(error)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if group is not None:
            group.destroy_process_group()
    if rank != 0:  # under torchrun only rank 0 reports (errors: every rank, above)
        return code
    try:
        print(json.dumps(strict_json(report), indent=2, sort_keys=True, allow_nan=False)
              if args.json else text, flush=True)
    except BrokenPipeError:  # `hfp8-ptq inspect ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def _leave_rank(code: int) -> None:
    """End a torchrun rank here, its process group destroyed and its output flushed, without
    the interpreter's teardown: in about 1 run in 20 under load a rank ended in SIGABRT
    ("terminate called without an active exception", no Python frame left: C++ state of
    torch.distributed finalized with the interpreter) after its work was done and written,
    and torchrun then reported the whole run failed (docs/distributed.md)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to say
            pass
    os._exit(code)


_interrupted = 0  # the signal that interrupted this run (SIGINT or SIGTERM), or 0
_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


def _on_interrupt(signum, frame) -> None:
    # Remember the interrupt: one that lands inside a module's import (numpy, onnx) can surface
    # as another exception (a RecursionError from a half-initialised module), not as itself.
    # SIGTERM (timeout, containers, Slurm) unwinds the same way, so temporary files go too.
    global _interrupted
    _interrupted = signum
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    global _interrupted
    _interrupted = 0  # main may run more than once in a process (tests, notebooks)
    command = "hfp8-ptq"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {number: signal.signal(number, _on_interrupt) for number in _SIGNALS} \
        if main_thread else {}
    try:
        args = build_parser().parse_args(argv)
        command = f"hfp8-ptq {args.command}"
        warnings.showwarning = _show_warning  # one line per warning, no source excerpt
        code = _run(args)
        if getattr(args, "process_group_used", False):
            _leave_rank(code)
        return code
    except BaseException as error:
        if not (_interrupted or isinstance(error, KeyboardInterrupt)):
            raise
        number = _interrupted or signal.SIGINT
        print(f"{command}: {_SIGNALS[number]}", file=sys.stderr)
        return 128 + number  # 130 for SIGINT, 143 for SIGTERM, as shells report them
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)

