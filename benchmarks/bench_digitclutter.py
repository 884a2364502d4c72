"""Benchmark: Digitclutter generation rate on one core (3 digits, 32x32).

Prints images/s of the fast generator and of the straightforward full-size PIL
renderer it is tested against. The issue's goal is >= 5,000 images/s on one core.

    python benchmarks/bench_digitclutter.py [--count 100000] [--reference-count 300]
"""

import os

# Single-threaded numpy/BLAS, set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from iterconv_keras import digitclutter  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--reference-count", type=int, default=300)
    parser.add_argument("--n-digits", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    start = time.perf_counter()
    digitclutter._tables(32)  # one-off per process: glyph rendering and phase tables
    setup = time.perf_counter() - start

    start = time.perf_counter()
    digitclutter.generate(args.n_digits, args.count, seed=0)
    fast = args.count / (time.perf_counter() - start)

    params = digitclutter.sample_params(args.n_digits, args.reference_count, np.random.default_rng(0))
    start = time.perf_counter()
    digitclutter.render_reference(params)
    reference = args.reference_count / (time.perf_counter() - start)

    result = {
        "n_digits": args.n_digits,
        "image_size": 32,
        "cores": 1,
        "setup_seconds": round(setup, 3),
        "fast_images_per_second": round(fast),
        "reference_images_per_second": round(reference, 1),
        "speedup": round(fast / reference, 1),
        "goal_images_per_second": 5000,
        "meets_goal": fast >= 5000,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"one-off setup (glyph tables): {setup:.2f} s")
        print(f"fast generator:     {fast:10.0f} images/s ({args.count} images, {args.n_digits} digits, 32x32, 1 core)")
        print(f"reference renderer: {reference:10.1f} images/s (full {16 * 32}x{16 * 32} PIL canvas)")
        print(f"speedup: {fast / reference:.0f}x; goal 5000 images/s: {'met' if fast >= 5000 else 'NOT met'}")


if __name__ == "__main__":
    main()
