"""Training throughput of ``small`` under each precision, side by side.

Model: the ``small`` variant (3 stages of 4 blocks, 16/32/64 channels, stride-2
stem) on 32x32x1 inputs with 10 classes, batch 128, Adam, trained through
`compiling.build_and_compile` and `pipeline.training_batches` exactly as
``iterconv train --precision P`` trains (`run_all.KerasTrainer`). The precisions
are measured interleaved (float32, mixed_bfloat16, float32, ... after warm-up),
so load from other processes hits them alike; the figures are the median of the
per-repetition ratios of images/s against float32 and the ratio of the fastest
repetitions (on a loaded machine, many short repetitions: ``--repeats 20 --steps 4``).

Usage:
    python benchmarks/bench_precision.py [--repeats 5] [--steps 12] [--float16] [--lipschitz]

``--keras-batch-norm`` routes 16-bit batch normalisation through Keras' own layer
instead of TensorFlow's fused kernels (the code before they took 16-bit maps), for an
A/B of that change.
"""

import argparse
import json
import os
import statistics

from run_all import KerasTrainer, machine_summary

import iterconv_keras  # noqa: F401  (TF environment defaults)

SHAPE, BATCH = (32, 32, 1), 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per repetition")
    parser.add_argument("--float16", action="store_true", help="also mixed_float16 (slow on CPUs)")
    parser.add_argument("--lipschitz", action="store_true", help="with the Lipschitz constraint (c = 0.9)")
    parser.add_argument("--keras-batch-norm", action="store_true",
                        help="16-bit batch norm through Keras' layer, not the fused kernels (A/B)")
    args = parser.parse_args()
    if args.keras_batch_norm:
        from iterconv_keras.models import normalization

        normalization._FUSED_DTYPES = ("float32",)

    import keras

    keras.config.disable_interactive_logging()
    load_at_start = os.getloadavg()[0]
    precisions = ["float32", "mixed_bfloat16"] + (["mixed_float16"] if args.float16 else [])
    lipschitz = 0.9 if args.lipschitz else None
    trainers = {p: KerasTrainer("small", SHAPE, BATCH, 0.0, lipschitz, None, precision=p) for p in precisions}
    for trainer in trainers.values():  # trace, then let the allocator settle
        trainer.run(1)
        trainer.run(max(1, args.steps // 2))
    times = {p: [] for p in precisions}
    for _ in range(args.repeats):
        for p, trainer in trainers.items():
            times[p].append(trainer.run(args.steps))
    base = times["float32"]
    result = {
        "variant": "small", "image_shape": list(SHAPE), "batch": BATCH, "lipschitz": lipschitz,
        "keras_batch_norm_in_16_bit": args.keras_batch_norm,
        "repetitions": args.repeats, "steps_per_repetition": args.steps,
        "loadavg_at_start_and_end": [load_at_start, os.getloadavg()[0]],
        "machine": machine_summary(),
        "images_per_s": {p: round(BATCH / statistics.median(t), 1) for p, t in times.items()},
        # Under load the fastest repetition is the least disturbed one.
        "best_images_per_s": {p: round(BATCH / min(t), 1) for p, t in times.items()},
        "best_vs_float32": {p: round(min(base) / min(t), 3) for p, t in times.items()},
        # Throughput relative to float32: float32's time over this precision's, paired per repetition.
        "throughput_vs_float32": {p: round(statistics.median(b / t for b, t in zip(base, times[p], strict=True)), 3)
                                  for p in precisions},
        "seconds_per_step": {p: [round(s, 4) for s in t] for p, t in times.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
