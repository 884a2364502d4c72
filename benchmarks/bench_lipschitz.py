"""Benchmark: per-step cost of the Lipschitz constraint on the `small` variant.

Trains `variants.create_model("small", (32, 32, 1), 10)` with ``lipschitz=None``
and with ``lipschitz=C`` (one power iteration per step and gain-capped batch
norm) on random data, batch 128, SGD with momentum. After warm-up (tracing and
a few steps each), repetitions of ``--steps`` steps alternate between the two
models so that load from other processes hits both alike. Reported: the
overhead of the fastest repetition of each model (the least disturbed by other
processes on a shared machine; the headline) and the median over repetitions of
the paired ratio on/off. The issue's goal is an overhead of at most 15%.

``--certified`` instead times `operator_norm.certified_operator_norm` (the certified
upper bound, Sedghi et al. 2019) for every conv of ``small`` (goal: under a
second), and with ``--model FILE.keras`` compares, per constrained conv of that
model, the certified bound, the 1000-iteration power estimate and the exact
norm (eigenvalues of the Gram matrix of the explicit zero-padded operator; slow,
tens of seconds per 4096-dimensional map).

    python benchmarks/bench_lipschitz.py [--repeats 12] [--steps 5] [--jit] [--json]
    python benchmarks/bench_lipschitz.py --certified \
        [--model zoo/digitclutter-small-lipschitz/1/assets.extra/model.keras]
"""

import argparse
import json
import statistics
import time

import keras  # noqa: E402
import numpy as np  # noqa: E402

import iterconv_keras  # noqa: F401  (environment defaults before TensorFlow loads)
from iterconv_keras.models.variants import create_model  # noqa: E402


def _model(lipschitz, jit_compile):
    keras.utils.set_random_seed(0)
    model = create_model("small", (32, 32, 1), 10, lipschitz=lipschitz)
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


def _explicit_matrix(kernel, height, width):
    """Dense matrix of the SAME, stride-1 zero-padded convolution: sum over taps of shift (x) shift (x) tap^T."""
    kh, kw = kernel.shape[:2]
    matrix = 0.0
    for dy in range(kh):
        for dx in range(kw):
            shift = np.kron(np.eye(height, k=dy - kh // 2), np.eye(width, k=dx - kw // 2))
            matrix = matrix + np.kron(shift, kernel[dy, dx].T)
    return matrix


def certified_report(model_path):
    """Time of the certified bound on ``small``; per-conv gaps on a saved constrained model."""
    from iterconv_keras.models import lipschitz, operator_norm

    small = create_model("small", (32, 32, 1), 10)
    convs = [(np.asarray(c.kernel), b.feature_shape) for bs in small.stages for b in bs for c in b.convolutions]
    operator_norm.certified_operator_norm(*convs[0])  # first-call overheads
    start = time.perf_counter()
    for kernel, shape in convs:
        operator_norm.certified_operator_norm(kernel, shape)
    result = {"convs_of_small": len(convs), "seconds_all_convs": round(time.perf_counter() - start, 4)}
    if model_path is None:
        return result
    import iterconv_keras.models.metrics  # noqa: F401  (registers ExactSetAccuracy)
    import iterconv_keras.models.resnet  # noqa: F401  (registers the model classes)

    model = keras.saving.load_model(model_path, compile=False)
    rows = []
    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            for conv in block.convolutions:
                kernel = np.asarray(conv.kernel, np.float64)
                matrix = _explicit_matrix(kernel, *block.feature_shape[:2])
                exact = float(np.sqrt(np.linalg.eigvalsh(matrix.T @ matrix)[-1]))
                estimate = float(operator_norm.converged_operator_norm(conv.kernel, conv.kernel_constraint.vector)[0])
                certified = operator_norm.certified_operator_norm(kernel, block.feature_shape)
                rows.append({"stage": s, "block": t, "conv": conv.name, "map": list(block.feature_shape),
                             "certified": certified, "estimate": estimate, "exact": exact})
    result["per_conv_bound"] = lipschitz.per_conv_bound(model.lipschitz, model.activation)
    result["convs"] = rows
    for s in range(len(model.stages)):
        ratios = [r["certified"] / r["exact"] for r in rows if r["stage"] == s]
        estimates = [r["estimate"] / r["exact"] for r in rows if r["stage"] == s]
        result[f"stage{s}_certified_over_exact"] = [round(min(ratios), 4), round(max(ratios), 4)]
        result[f"stage{s}_estimate_over_exact"] = [round(min(estimates), 6), round(max(estimates), 6)]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lipschitz", type=float, default=0.9)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved repetitions per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jit", action="store_true", help="compile the train step with XLA")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--certified", action="store_true", help="time the certified bound instead (see above)")
    parser.add_argument("--model", default=None, help="with --certified: a saved constrained model to compare on")
    args = parser.parse_args()
    if args.certified:
        print(json.dumps(certified_report(args.model), indent=2))
        return

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
    paired = statistics.median(b / a for a, b in zip(times["off"], times["on"], strict=True))
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
