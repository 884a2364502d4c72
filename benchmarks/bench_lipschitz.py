"""Benchmark: per-step cost of the Lipschitz constraint on the `small` variant.

Trains `variants.build_model("small", (32, 32, 1), 10)` with ``lipschitz=None``
and with ``lipschitz=C`` (one power iteration per step and gain-capped batch
norm) on random data, batch 128, SGD with momentum. After warm-up (tracing and
a few steps each), repetitions of ``--steps`` steps alternate between the two
models so that load from other processes hits both alike. Reported: the
overhead of the fastest repetition of each model (the least disturbed by other
processes on a shared machine; the headline) and the median over repetitions of
the paired ratio on/off. The issue's goal is an overhead of at most 15%.

    python benchmarks/bench_lipschitz.py [--repeats 12] [--steps 5] [--jit] [--json]
"""

import argparse
import json
import statistics
import time

import keras  # noqa: E402
import numpy as np  # noqa: E402

import iterconv_keras  # noqa: F401  (environment defaults before TensorFlow loads)
from iterconv_keras.models.variants import build_model  # noqa: E402


def _model(lipschitz, jit_compile):
    keras.utils.set_random_seed(0)
    model = build_model("small", (32, 32, 1), 10, lipschitz=lipschitz)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _seconds_per_step(model, x, y, steps):
    model.train_on_batch(x, y)  # make sure nothing pending from the other model
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lipschitz", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved repetitions per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 32, 32, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=args.batch)
    models = {"off": _model(None, args.jit), "on": _model(args.lipschitz, args.jit)}
    for model in models.values():
        for _ in range(args.warmup):
            model.train_on_batch(x, y)

    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(_seconds_per_step(model, x, y, args.steps))
    off, on = min(times["off"]), min(times["on"])
    paired = statistics.median(b / a for a, b in zip(times["off"], times["on"]))
    result = {
        "variant": "small",
        "batch": args.batch,
        "jit_compile": args.jit,
        "lipschitz": args.lipschitz,
        "ms_per_step_off": round(1000 * off, 2),
        "ms_per_step_on": round(1000 * on, 2),
        "overhead_percent": round(100 * (on / off - 1), 1),
        "overhead_percent_median_paired": round(100 * (paired - 1), 1),
        "goal_percent": 15.0,
        "meets_goal": on / off - 1 <= 0.15,
        "repeats_ms_off": [round(1000 * t, 2) for t in times["off"]],
        "repeats_ms_on": [round(1000 * t, 2) for t in times["on"]],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"small, batch {args.batch}, jit={args.jit}: {result['ms_per_step_off']} ms/step off, "
            f"{result['ms_per_step_on']} ms/step on -> overhead {result['overhead_percent']}% "
            f"(goal <= 15%: {'met' if result['meets_goal'] else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
