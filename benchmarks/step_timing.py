"""Timing (and optionally peak memory of) each step of ``quantize_model`` by wrapping the
functions that implement the steps: a benchmark's instrument, never the library's."""
from __future__ import annotations

import importlib
import os
import threading
import time


class StepMemory:
    """Peak resident memory within each timed step: a thread samples /proc/self/statm every
    5 ms and charges the current step (the outermost running one; "setup" before any)."""

    def __init__(self) -> None:
        self.current, self.peaks = "setup", {}
        self.page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with open("/proc/self/statm") as statm:
            while not self._stop.wait(0.005):
                statm.seek(0)
                resident = int(statm.read().split()[1]) * self.page
                if resident > self.peaks.get(self.current, 0):
                    self.peaks[self.current] = resident

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peaks


def time_steps(seconds: dict, steps: dict, memory: StepMemory | None = None) -> None:
    """Wraps each function of ``steps`` (module name -> function names) so that its time adds
    to ``seconds[name]`` and, with ``memory``, resident memory while it runs is charged to it
    (the outermost wrapped step of a nest). This process only."""
    for module_name, names in steps.items():
        module = importlib.import_module(module_name)
        for name in names:
            function = getattr(module, name)

            def timed(*args, _function=function, _name=name, **kwargs):
                start = time.perf_counter()
                outer = memory.current if memory is not None else None
                if memory is not None and outer == "other":
                    memory.current = _name
                try:
                    return _function(*args, **kwargs)
                finally:
                    seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - start
                    if memory is not None:
                        memory.current = outer
            setattr(module, name, timed)
