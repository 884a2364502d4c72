"""FLOPs per image of every variant, and the time per epoch they imply at a stated rate.

Counts with TensorFlow's own op statistics (`run_all.graph_flops`, the counting
`bench_indices.py` uses) on two traced graphs of each model, divided by the batch:

- forward: ``model(x, training=False)``, what evaluation and serving run;
- train: the forward pass in training mode and the gradient of the loss with respect
  to every trainable variable, i.e. one optimizer step's arithmetic per image without
  the optimizer's own per-parameter update (per step, not per image).

Input shapes and class counts are those of the datasets (MNIST 28x28x1, CIFAR 32x32x3,
Digitclutter 32x32x1); the epoch is iterconv's default training split (MNIST 55,000 and
CIFAR 45,000 after the 5,000-image validation split; Digitclutter 20,000), plus one
forward pass over the validation split. An epoch's time is FLOPs / rate: a lower bound
for a device that sustains that rate, with no input-pipeline or per-step overhead.
The Lipschitz constraint adds a power iteration per convolution per step, one image's
worth of two convolutions, which is not per image and left out.

Usage:
    python benchmarks/bench_flops.py [--rates 177,10000] [--batch 8]
"""

import argparse
import json

from run_all import graph_flops

import iterconv_keras  # noqa: F401  (TF environment defaults)

DATASETS = {  # name: (image shape, classes, training images per epoch, validation images)
    "mnist": ((28, 28, 1), 10, 55_000, 5_000),
    "cifar10": ((32, 32, 3), 10, 45_000, 5_000),
    "cifar100": ((32, 32, 3), 100, 45_000, 5_000),
    "digitclutter": ((32, 32, 1), 10, 20_000, 2_000),
}


def count(variant, image_shape, num_classes, batch):
    """``(forward, train)`` FLOPs per image and the trainable parameters of ``variant`` at this input."""
    import keras
    import tensorflow as tf

    from iterconv_keras.models import variants

    keras.utils.set_random_seed(0)
    model = variants.create_model(variant, image_shape, num_classes)
    spec = tf.TensorSpec((batch, *image_shape), tf.float32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    labels = tf.zeros((batch,), tf.int64)

    def step(x):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    forward = graph_flops(tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph)
    train = graph_flops(tf.function(step).get_concrete_function(spec).graph)
    return forward / batch, train / batch, sum(int(v.numpy().size) for v in model.trainable_variables)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="177,10000",
                        help="sustained GFLOP/s to convert FLOPs into epoch times (comma-separated)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the traced graphs (FLOPs are per image)")
    parser.add_argument("--variants", default=None, help="comma-separated variants (default: all)")
    args = parser.parse_args()

    from iterconv_keras.models import variants

    rates = [float(r) for r in args.rates.split(",")]
    names = args.variants.split(",") if args.variants else variants.list_variants()
    rows = []
    for name in names:
        for dataset, (shape, classes, train_images, val_images) in DATASETS.items():
            forward, train, params = count(name, shape, classes, args.batch)
            epoch_flops = train_images * train + val_images * forward
            rows.append({
                "variant": name, "dataset": dataset, "image_shape": list(shape), "trainable_parameters": params,
                "forward_mflop_per_image": round(forward / 1e6, 2), "train_mflop_per_image": round(train / 1e6, 2),
                "train_over_forward": round(train / forward, 3), "epoch_tflop": round(epoch_flops / 1e12, 3),
                "epoch_seconds_at": {f"{r:g} GFLOP/s": round(epoch_flops / (r * 1e9), 1) for r in rates},
            })
    print(json.dumps({"batch": args.batch, "rates_gflops": rates, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
