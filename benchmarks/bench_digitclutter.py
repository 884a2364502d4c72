"""Benchmark: Digitclutter generation rate on one core (3 digits, 32x32), or its debris variant.

Prints images/s of the fast generator and of the straightforward full-size PIL
renderer it is tested against. The issue's goal is >= 5,000 images/s on one core.

    python benchmarks/bench_digitclutter.py [--count 100000] [--reference-count 300]
    python benchmarks/bench_digitclutter.py --debris-fragments 50   # debris: 1 digit, 50 fragments
"""

import os

# Single-threaded numpy/BLAS, set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from iterconv_keras.data import debris, digitclutter, glyphs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--reference-count", type=int, default=300)
    parser.add_argument("--n-digits", type=int, default=3)
    parser.add_argument("--debris-fragments", type=int, default=None,
                        help="benchmark the debris generator with this many fragments (10, 30, 50) instead")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    # The generator under test: Digitclutter with n digits, or debris with k fragments.
    if args.debris_fragments is None:
        module, amount, what = digitclutter, args.n_digits, {"n_digits": args.n_digits}
        label = f"{args.n_digits} digits"
    else:
        module, amount, what = (
            debris, args.debris_fragments, {"generator": "debris", "n_fragments": args.debris_fragments}
        )
        label = f"1 digit, {args.debris_fragments} fragments"

    start = time.perf_counter()
    glyphs.coverage_tables(32)  # one-off per process: glyph rendering and phase tables
    if module is debris:
        debris._fragment_table(32)
    setup = time.perf_counter() - start

    start = time.perf_counter()
    module.generate(amount, args.count, seed=0)
    fast = args.count / (time.perf_counter() - start)

    params = module.sample_params(amount, args.reference_count, np.random.default_rng(0))
    start = time.perf_counter()
    module.render_reference(params)
    reference = args.reference_count / (time.perf_counter() - start)

    result = {
        **what,
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
        print(f"fast generator:     {fast:10.0f} images/s ({args.count} images, {label}, 32x32, 1 core)")
        print(f"reference renderer: {reference:10.1f} images/s (full {16 * 32}x{16 * 32} PIL canvas)")
        print(f"speedup: {fast / reference:.0f}x; goal 5000 images/s: {'met' if fast >= 5000 else 'NOT met'}")


if __name__ == "__main__":
    main()
