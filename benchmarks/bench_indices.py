"""Cost of the whole index suite as a multiple of one plain evaluation pass.

Model: the ``small`` variant (3 stages of 4 blocks, 16/32/64 channels, stride-2
stem) on 32x32x1 inputs with 10 classes; extra iterations up to 16 (K in
{1, 2, 4, 8, 16}). The plain pass is `StagePrograms.run_schedule` with the
trained schedule: the whole forward pass and scoring compiled as one program,
the fastest plain evaluation iterconv has (faster than ``model.predict``, also
reported). The suite is `indices.compute_indices`. Both run at the same batch
size after a warm-up batch, so compilation is excluded. Goal (issue 5): <= 12x.

Why the multiple cannot fall much below ~13.5x here: the floating-point work of
the suite is fixed by the definitions (docs/indices.md); the benchmark
counts it in the compiled graphs (TensorFlow's own op statistics) and measures
how fast each program turns FLOPs into results against a large float32 matmul,
the machine's practical peak (`run_all.matmul_gflops`, best of numpy and TensorFlow).
multiple >= flop_ratio * plain_rate / peak.

Usage:
    python benchmarks/bench_indices.py [--examples 2048] [--batch-size 256] [--xla]
"""

import argparse
import json

from run_all import _timed, graph_flops, matmul_gflops

import iterconv_keras  # noqa: F401  (TF environment defaults)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--xla", action="store_true", help="compile the programs with XLA")
    args = parser.parse_args()

    import keras
    import numpy as np

    from iterconv_keras.analysis import indices
    from iterconv_keras.analysis import programs as schedules
    from iterconv_keras.models import variants

    keras.utils.set_random_seed(0)
    model = variants.create_model("small", (32, 32, 1), 10)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(args.examples, 32, 32, 1), dtype=np.uint8)
    y = rng.integers(0, 10, size=args.examples)
    programs = schedules.StagePrograms(model, jit_compile=args.xla)

    def plain():
        totals = schedules.Totals()
        for xb, yb, mask in schedules.padded_batches(x, y, args.batch_size):
            loss, correct = programs.run_schedule(xb, yb, None)
            totals.add("loss", loss, mask)
        return totals.mean("loss")

    def suite():
        return indices.compute_indices(model, x, y, batch_size=args.batch_size, programs=programs)

    # Warm up (compile both programs) on one batch.
    indices.compute_indices(model, x[: args.batch_size], y[: args.batch_size],
                            batch_size=args.batch_size, programs=programs)
    plain()
    # Interleaved, so that load from other processes hits both alike; the median
    # of the per-repeat ratios is the figure.
    plain_times, suite_times = [], []
    for _ in range(args.repeats):
        plain_times.append(_timed(plain))
        suite_times.append(_timed(suite))
    plain_times.append(_timed(plain))
    # strict=False: plain_times has one entry more than suite_times (it brackets every suite run);
    # plain_times[1:] is the one after.
    ratios = [s / ((a + b) / 2) for s, a, b in zip(suite_times, plain_times, plain_times[1:], strict=False)]
    plain_s, suite_s = float(np.median(plain_times)), float(np.median(suite_times))

    batch = next(schedules.padded_batches(x, y, args.batch_size))
    batches = -(-args.examples // args.batch_size)
    plain_flops = _graph_flops(programs, "schedule", batch) * batches
    suite_flops = _graph_flops(programs, "indices", batch) * batches
    peak = matmul_gflops(n=4096)["reference_gflops"] * 1e9
    plain_rate, suite_rate = plain_flops / plain_s, suite_flops / suite_s

    # For reference: what a user's plain Keras evaluation of the same examples costs.
    scaled = x.astype(np.float32) / 255.0
    model.predict(scaled[: args.batch_size], batch_size=args.batch_size, verbose=0)
    keras_s = min(_timed(lambda: model.predict(scaled, batch_size=args.batch_size, verbose=0)) for _ in range(2))
    result = {
        "examples": args.examples,
        "batch_size": args.batch_size,
        "xla": args.xla,
        "plain_pass_s": round(plain_s, 3),
        "index_suite_s": round(suite_s, 3),
        "multiple": round(float(np.median(ratios)), 2),
        "ratios": [round(r, 2) for r in ratios],
        "goal": 12,
        "flop_ratio": round(suite_flops / plain_flops, 2),
        "plain_gflops_per_s": round(plain_rate / 1e9, 1),
        "suite_gflops_per_s": round(suite_rate / 1e9, 1),
        "matmul_peak_gflops_per_s": round(peak / 1e9, 1),
        "floor_at_peak": round(suite_flops / plain_flops * plain_rate / peak, 2),
        "keras_predict_s": round(keras_s, 3),
        "multiple_of_keras_predict": round(suite_s / keras_s, 2),
        "compiled_programs": programs.num_programs,
    }
    print(json.dumps(result, indent=2))


def _graph_flops(programs, kind, batch):
    """Floating-point operations of one call of the compiled program ``kind``, by TensorFlow's op statistics."""
    (entry,) = [p for key, p in programs._programs.items() if key[0] == kind]
    return graph_flops(entry.program.get_concrete_function(batch[0], batch[1]).graph)


if __name__ == "__main__":
    main()
