"""Wall, CPU and system time and peak RSS of one run's analysis as `probekit demo` does it.

Usage: python bench/bench_run_analysis.py RUN   (RUN: a copy; its analysis.zarr is written)

evaluate(RUN) at every checkpoint (default token budget), then align(RUN, "all", 64 pairs).
Prints one RESULT line: seconds of each, CPU seconds, system time as a share of CPU time, and
the process's peak RSS.
"""

from __future__ import annotations

import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main() -> None:
    from probekit.analysis import AlignOptions, align
    from probekit.evaluation import evaluate

    torch.set_num_threads(1)
    run = sys.argv[1]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    evaluate(run, progress=False)
    t1 = time.perf_counter()
    align(run, metrics="all", options=AlignOptions(n_pairs=64), progress=False)
    t2, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    user, sys_ = r.ru_utime - r0.ru_utime, r.ru_stime - r0.ru_stime
    print(
        f"RESULT eval {t1 - t0:.1f} s, align {t2 - t1:.1f} s, total {t2 - t0:.1f} s; "
        f"cpu {user + sys_:.1f} s, sys {sys_:.1f} s = {100 * sys_ / (user + sys_):.1f} % of CPU; "
        f"peak RSS {r.ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
