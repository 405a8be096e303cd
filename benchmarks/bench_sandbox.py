"""Sandbox throughput: runs per second of ``Sandbox.run`` on a PAL exemplar, against two baselines
measured in the same run on the same program:

- ``python -c`` (``subprocess.run([python, "-c", program + "print(solution())"])``): what executing model
  code in a plain child process costs, with no limits, no validation and no result protocol;
- ``python -I -S -c`` (isolated, no site): the floor for any fresh-interpreter design.

Prints one JSON line last: per-run milliseconds, runs/s and the ratios sandbox / baseline.
Usage: ``python benchmarks/bench_sandbox.py [--n 40] [--threads 4]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ragloop.agents.sandbox import Sandbox, SandboxLimits

PROGRAM = '''def solution():
    """Olivia has $23. She bought five bagels for $3 each. How much money does she have left?"""
    money_initial = 23
    bagels = 5
    bagel_cost = 3
    money_spent = bagels * bagel_cost
    money_left = money_initial - money_spent
    result = money_left
    return result
'''


def _time_per_run(fn, n: int) -> float:
    """Median seconds of ``fn()`` over ``n`` calls (after one warm-up)."""
    fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="runs per measurement")
    ap.add_argument("--threads", type=int, default=4, help="threads for the concurrent-throughput figure")
    args = ap.parse_args()

    sb = Sandbox(SandboxLimits())
    assert sb.run(PROGRAM).value == 8

    def plain() -> None:
        out = subprocess.run(
            [sys.executable, "-c", PROGRAM + "print(solution())"], capture_output=True, text=True
        )
        assert out.stdout.strip() == "8"

    def bare() -> None:
        cmd = [sys.executable, "-I", "-S", "-c", PROGRAM + "print(solution())"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.stdout.strip() == "8"

    sandbox_s = _time_per_run(lambda: sb.run(PROGRAM), args.n)
    plain_s = _time_per_run(plain, args.n)
    bare_s = _time_per_run(bare, args.n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        results = list(pool.map(lambda _: sb.run(PROGRAM), range(args.n)))
    concurrent_rps = args.n / (time.perf_counter() - t0)
    assert all(r.ok for r in results)

    print(
        json.dumps(
            {
                "bench": "sandbox",
                "n": args.n,
                "sandbox_ms_per_run": round(sandbox_s * 1000, 2),
                "python_c_ms_per_run": round(plain_s * 1000, 2),
                "bare_isolated_ms_per_run": round(bare_s * 1000, 2),
                "sandbox_runs_per_s": round(1 / sandbox_s, 1),
                f"sandbox_runs_per_s_{args.threads}_threads": round(concurrent_rps, 1),
                "sandbox_vs_python_c": round(sandbox_s / plain_s, 2),
                "sandbox_vs_bare_isolated": round(sandbox_s / bare_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
