"""Benchmark: training throughput of the plain, the constrained and the contractive block.

Trains `variants.create_model("small", (32, 32, 1), 10)` three ways on random
data, batch 128, SGD with momentum:

- ``plain``: ``x + g(x)``, unconstrained;
- ``constrained``: ``x + g(x)`` with ``Lip(g) <= 0.9`` (one power iteration per
  conv per step, gain-capped batch norm);
- ``contractive``: ``(1 - alpha) x + alpha g(x)`` with ``Lip(g) <= 0.5``,
  ``alpha = 0.5`` (the ``small_contractive`` row: the constraint plus one scale
  and one subtraction per block).

After warm-up (tracing and a few steps each), repetitions of ``--steps`` steps
rotate through the three models so that load from other processes hits all of
them alike. Reported per model: images per second of the fastest repetition
(the least disturbed on a shared machine) and the median over repetitions of
the ratio to the plain model in the same round. Needs an idle machine for
numbers worth quoting.

    python benchmarks/bench_contractive.py [--repeats 12] [--steps 5] [--jit] [--json]
"""

import argparse
import json
import statistics
import time

import keras  # noqa: E402
import numpy as np  # noqa: E402

import iterconv_keras  # noqa: F401  (environment defaults before TensorFlow loads)
from iterconv_keras.models.variants import create_model  # noqa: E402

FORMS = {
    "plain": {},
    "constrained": {"lipschitz": 0.9},
    "contractive": {"lipschitz": 0.5, "residual_form": "contractive", "alpha": 0.5},
}


def _model(overrides, jit_compile):
    keras.utils.set_random_seed(0)
    model = create_model("small", (32, 32, 1), 10, **overrides)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def _seconds_per_step(model, x, y, steps):
    model.train_on_batch(x, y)  # make sure nothing is pending from another model
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=12, help="rounds; each times every model once")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 32, 32, 1), dtype=np.float32)
    y = rng.integers(0, 10, size=args.batch)
    models = {name: _model(overrides, args.jit) for name, overrides in FORMS.items()}
    for model in models.values():
        for _ in range(args.warmup):
            model.train_on_batch(x, y)

    times = {name: [] for name in models}
    for round_ in range(args.repeats):
        # Rotate the order so no model always runs first (or right after another).
        names = list(models)[round_ % len(models):] + list(models)[:round_ % len(models)]
        for name in names:
            times[name].append(_seconds_per_step(models[name], x, y, args.steps))
    result = {
        "variant": "small",
        "batch": args.batch,
        "jit_compile": args.jit,
        "steps_per_repeat": args.steps,
        "repeats": args.repeats,
        "forms": {name: {k: v for k, v in overrides.items()} for name, overrides in FORMS.items()},
        "images_per_second": {name: round(args.batch / min(t), 1) for name, t in times.items()},
        "median_time_ratio_to_plain": {
            name: round(statistics.median(b / a for a, b in zip(times["plain"], t, strict=True)), 3)
            for name, t in times.items()
        },
        "repeats_ms": {name: [round(1000 * v, 2) for v in t] for name, t in times.items()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in models:
            print(f"{name:<12} {result['images_per_second'][name]:>8} images/s   "
                  f"time x{result['median_time_ratio_to_plain'][name]} of plain (median over rounds)")


if __name__ == "__main__":
    main()
