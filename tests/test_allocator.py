"""hfp8._allocator: memory freed by many small tensors goes back to the operating system."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hfp8._allocator import release_free_memory

_SCRIPT = textwrap.dedent("""
    import os, torch
    from hfp8._allocator import release_free_memory
    page = os.sysconf("SC_PAGE_SIZE")
    def resident_mib():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page / 2**20
    # 64 KiB tensors sit under glibc's mmap threshold: they come from its heap; the last one
    # stays, so the freed ones are not at the heap's top (which glibc would trim by itself)
    tensors = [torch.ones(16384) for _ in range(3200)]
    del tensors[:-1]
    before = resident_mib()
    released = release_free_memory()
    print(released, before, resident_mib())
""")


def test_freed_heap_memory_is_returned_to_the_system():
    """200 MiB of small tensors freed: glibc keeps them resident until the release."""
    if not release_free_memory():
        pytest.skip("no glibc malloc_trim in this C library")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                            check=True)
    released, before, after = result.stdout.split()
    assert released == "True"
    assert float(before) - float(after) > 150, result.stdout
