"""One measurement per child process: peak memory (``ru_maxrss``) is then that measurement's
alone. The script reruns itself with ``--child CASE --repeats N [--quantize]`` and prints one
JSON line last."""
from __future__ import annotations

import json
import subprocess
import sys


def run_child(script: str, case: str, quantize: bool, repeats: int) -> dict:
    """The JSON result of ``script --child case``; a failing child stops the benchmark with
    the end of its stderr."""
    command = [sys.executable, script, "--child", case, "--repeats", str(repeats)]
    if quantize:
        command.append("--quantize")
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    if output.returncode != 0:
        raise SystemExit(f"{case} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])
