"""Wall time of `landscape flatness RUN` with default options (training loss, then --domains each) from a code
tree: run it on the old and the new tree to compare defaults (issue 10).

    python bench/bench_flatness_cli.py RUN [--repo DIR] [--threads 2]

Train RUN first, e.g. `python -m cli.main train --suite mix --model mlp --steps 100 --out /tmp/numerics_run`.
Measured 2026-11-30 on the shared 2-core CPU box while other jobs ran (load average 3-12, so times swing by
several x between runs; 1,377-parameter MLP from `train --suite mix --model mlp --steps 100`), whole command
including Python/torch start-up, analysis time in brackets:

    threads  code                                        default              --domains each
    1        before (main: tol 1e-8, 99 Hutch++ probes)  11.5 s [5.2 s, 179]  11.1 s
    1        after  (tol 1e-4 + multiplicity check,      7.6 s  [2.5 s, 168]  10.6 s
                     adaptive trace to 1% stderr)
    2        before                                      26.8 s [20.7 s]      56.6 s
    2        after                                       36.8 s [30.6 s]      36.4 s

Then (same day, same box, load average ~3) curvature work on a small model (< 100k parameters) on the CPU
was given one intra-op thread (landscape.hvp.cpu_threads_for): with OMP_NUM_THREADS=2 the default command
went from 153 s (2 threads spinning on a busy box) to 6.8 s, and --domains each from ~90 s to 8.3 s;
before-tree default with 2 threads on that box: 53 s; either tree with 1 thread: 4.5-5.3 s.

[x s, n]: analysis seconds and HVPs. With 2 threads on a loaded 2-core box, thread contention dominates
(the same 168 HVPs took 2.5 s on 1 thread and 30.6 s on 2); the 1-thread rows are the comparable ones.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def timed(repo: str, args: list[str], threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": repo}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "cli.main", "flatness", *args], cwd=repo, env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"flatness failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return dt, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-each", action="store_true")
    a = ap.parse_args()
    for label, extra in [("default", []), ("--domains each", ["--domains", "each"])]:
        if a.skip_each and extra:
            continue
        dt, out = timed(a.repo, [a.run, "--device", "cpu", *extra], a.threads)
        print(f"{label:15s} {dt:7.1f} s   ({a.repo})")
        print(out)


if __name__ == "__main__":
    main()
