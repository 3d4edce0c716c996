"""How glibc's malloc serves probekit's large, short-lived tensors.

Training steps, eval windows and align batches allocate and free the same large buffers over
and over. glibc's defaults hand the top of the heap back to the OS whenever 128 KB+ of it is
free (and serve large blocks by mmap), so each step faults the same pages in again: a tiny
run's training spent 6-8 % of its CPU time in the kernel. `steady_heap` keeps freed memory for
reuse instead; `release_heap` returns it when a lot has piled up, which keeps peak memory flat.
Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_ABOVE = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX / 2)
NEVER_TRIM = 1 << 30  # automatic trimming only beyond this much free top-of-heap
TRIM_ABOVE = 256 << 20  # release_heap: free heap bytes worth handing back


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None  # not glibc (or older than 2.33)


_LIBC = _glibc()


def steady_heap() -> None:
    """Serve blocks up to 32 MB from the heap and stop automatic trimming, for the rest of this
    process (called where a command starts: `train`, the analysis engine). Measured on a tiny
    run, 1 thread: training 0.85 M -> 0.19 M minor page faults (system time 1.77 -> 0.76 s),
    eval of two checkpoints 0.34 M -> 0.14 M; peak RSS unchanged within 3 %."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_ABOVE)
        _LIBC.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)


def release_heap() -> None:
    """Hand freed heap pages back to the OS once the heap's free part exceeds max(256 MB, twice
    its used part). Big per-batch float64 temporaries are freed between small arrays that stay
    alive (the pooled vectors kept for retrieval), so without this the heap fragments and peak
    RSS grows with the number of pairs; trimming after every batch kept it flat too, but the
    next batch faulted the same pages in again."""
    if _LIBC is None:
        return
    info = _LIBC.mallinfo2()
    if info.fordblks > max(TRIM_ABOVE, 2 * info.uordblks):
        _LIBC.malloc_trim(0)
