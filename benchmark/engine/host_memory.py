"""Keep the CPU memory a training step frees inside the process, so the next step reuses it.

torch allocates CPU tensors with the C library's ``malloc``. With glibc's defaults, a block above the
(adaptive, 128 KiB - 32 MiB) mmap threshold gets its own ``mmap`` and goes back to the kernel when freed, and
the top of the heap is trimmed whenever 128 KiB are free there. A training step of the tiny preset allocates
and frees the same activations every iteration, so every iteration faults the same pages in again and the
kernel zeroes them: 2,200-4,700 minor page faults per iteration in the perf cases (one thread, 2026-12-07,
AVX-512 EPYC), 16.1 million over the default ``python run_benchmark.py`` (36.5 s of system time).

:func:`retain_freed_memory` sets three ``mallopt`` parameters once per process: blocks up to the largest
mmap threshold glibc accepts (32 MiB) come from the heap, the heap is trimmed only above 1 GiB free, and
each extension of the heap asks for 256 MiB more than needed. Measured on that machine, the default
``python run_benchmark.py`` (two worker processes, one thread each, same commit otherwise, run one after
the other): wall 478.4 s -> 462.8 s (-3.3 %), system time 36.5 s -> 5.4 s, minor page faults 16.1 M ->
0.43 M, user time unchanged (871 s / 874 s), metrics.csv of all eight runs byte-identical. Timing single
training steps in one process (60 iterations) gave 0-15 % per case, within that machine's noise; ``python
-m benchmark.perf`` with and without ``--no-heap-retention`` compares every case.

What is computed is unchanged (only where the bytes live), so results stay bit-identical; the price is that a
process keeps its peak heap instead of returning it. Other C libraries (musl, macOS) have no ``mallopt`` of
these parameters: there this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

# glibc's <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 * 2**20),     # glibc's maximum (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
    (M_TRIM_THRESHOLD, 2**30),
    (M_TOP_PAD, 256 * 2**20),
)


@functools.cache
def retain_freed_memory() -> bool:
    """Apply :data:`SETTINGS` to this process's glibc ``malloc`` (once); False where it is not glibc or a
    setting is refused (nothing changes then, apart from what was already applied)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version      # only glibc has it: other libcs' mallopt numbers differ
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    if not applied:
        log.debug("glibc refused a mallopt setting; freed CPU memory may go back to the kernel")
    return applied
