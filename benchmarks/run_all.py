"""All performance figures of issue 8 in one command.

For the ``small`` variant (32x32x1, batch 128) and ``paper_mnist`` (28x28x1,
fewer steps) this measures training images/s of our Keras model at coupling
lambda = 0, lambda = 0.9 and with the Lipschitz constraint on (``lipschitz=0.9``),
and of the PyTorch twin (``benchmarks/torch_resnet.py``, run in a subprocess) in
the same configurations, interleaved (ours, torch, ours, torch, ... after warm-up)
so load from other processes hits both alike; every ratio is the median of the
per-repetition ratios. It also measures the machine's float32 matrix-multiply
rate (2048x2048, numpy and TensorFlow) and the achieved training GFLOP/s
(convolution and dense FLOPs counted analytically, forward + backward = 3x
forward), inference images/s of the exported SavedModel (``serving_default``)
against ``model.predict`` at batch 1 and 256, the Digitclutter generation rate
(``bench_digitclutter.py``) and the index-suite cost multiple (``bench_indices.py``).

Our side trains through `iterconv_keras.compiling.build_and_compile` and
`pipeline.training_batches`, i.e. exactly what ``iterconv train`` runs
(including its default of ``TrainConfig.jit_compile``).

    python benchmarks/run_all.py [--json results.json] [--quick] [--no-torch] [--xla/--no-xla]

Takes about 8 minutes on 2 cores; ``--quick`` about 2 (for debugging, noisy).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

import iterconv_keras  # noqa: F401  (TensorFlow environment defaults, before TF loads)

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
CONFIGS = (  # (name, coupling, lipschitz)
    ("lambda=0", 0.0, None),
    ("lambda=0.9", 0.9, None),
    ("lipschitz=0.9", 0.0, 0.9),
)
# variant, image shape, batch, steps per timed repetition, repetitions (full, quick)
TRAINING_CASES = {
    "small": dict(image_shape=(32, 32, 1), batch=128, steps=(12, 4), repeats=(5, 2)),
    "paper_mnist": dict(image_shape=(28, 28, 1), batch=128, steps=(3, 1), repeats=(3, 1)),
}


# -- machine -------------------------------------------------------------------------


def machine_summary():
    """CPU model, core count and flags that matter (from lscpu), software versions."""
    import keras
    import numpy as np
    import tensorflow as tf

    info = {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        fields = dict(line.split(":", 1) for line in lines if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = fields.get("Flags", "").split()
        info["cpu"] = fields.get("Model name")
        info["cpus"] = fields.get("CPU(s)")
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
        info["l2_l3"] = f"{fields.get('L2 cache')} / {fields.get('L3 cache')}"
    except (OSError, subprocess.CalledProcessError):
        info["cpu"] = platform.processor()
    info["loadavg_at_start"] = os.getloadavg()
    return info


def matmul_gflops(n=2048, repeats=5):
    """Best-of-``repeats`` float32 ``n x n`` matmul rate (GFLOP/s) in numpy and TensorFlow."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    flops = 2.0 * n**3
    a @ b
    numpy_rate = flops / min(_timed(lambda: a @ b) for _ in range(repeats)) / 1e9
    ta, tb = tf.constant(a), tf.constant(b)
    tf.matmul(ta, tb).numpy()
    tf_rate = flops / min(_timed(lambda: tf.matmul(ta, tb).numpy()) for _ in range(repeats)) / 1e9
    return {"n": n, "numpy_gflops": round(numpy_rate, 1), "tensorflow_gflops": round(tf_rate, 1),
            "reference_gflops": round(max(numpy_rate, tf_rate), 1)}


def graph_flops(graph):
    """Floating-point operations of one run of ``graph``, by TensorFlow's own op statistics.

    The profiler's ``float_operation`` view sums each op's registered ``flops``
    statistic (2 x multiply-adds for convolutions, their gradients and matmuls; one
    per element for elementwise ops). Ops without a registered statistic count 0.
    """
    import tensorflow as tf

    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return tf.compat.v1.profiler.profile(graph, options=options).total_float_ops


def forward_flops(image_shape, stage_widths, blocks_per_stage, stem_stride, num_classes=NUM_CLASSES):
    """Multiply-adds x 2 of the convolutions and the dense layer for one image, forward.

    Batch norm, activations and the residual additions are left out (they are
    memory-bound and a few percent of the arithmetic).
    """
    h, w, c = image_shape
    h, w = -(-h // stem_stride), -(-w // stem_stride)
    total = 2 * h * w * 9 * c * stage_widths[0]
    previous = stage_widths[0]
    for s, width in enumerate(stage_widths):
        if s > 0:
            h, w = -(-h // 2), -(-w // 2)
            total += 2 * h * w * 9 * previous * width
        total += blocks_per_stage * 2 * (2 * h * w * 9 * width * width)
        previous = width
    return total + 2 * previous * num_classes


# -- training: ours -------------------------------------------------------------------


class KerasTrainer:
    """One configuration of our model, trained by ``fit`` on the real input pipeline."""

    def __init__(self, variant, image_shape, batch, coupling, lipschitz, jit_compile, precision="float32"):
        import numpy as np

        from iterconv_keras import compiling
        from iterconv_keras.config import TrainConfig
        from iterconv_keras.data import pipeline

        config = TrainConfig(variant=variant, coupling=coupling, spectral_norm=lipschitz is not None,
                             lipschitz=lipschitz or 0.9, batch_size=batch, precision=precision)
        if jit_compile is not None:
            config.jit_compile = jit_compile
        self.jit_compile = config.jit_compile
        splits = types.SimpleNamespace(multi_label=False, mean=0.0, std=1.0, input_shape=image_shape,
                                       num_classes=NUM_CLASSES)
        rng = np.random.default_rng(0)
        n = 20 * batch
        x = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
        y = rng.integers(0, NUM_CLASSES, size=n)
        self.model = compiling.build_and_compile(config.validate(), splits, steps_per_epoch=20)
        self.dataset, _ = pipeline.training_batches(x, y, batch_size=batch, seed=0, initial_epoch=0,
                                                    epochs=1_000_000)

    def run(self, steps):
        """Seconds per step over ``steps`` steps, after one untimed step in the same ``fit``."""
        import keras

        timer = _StepTimer()
        # keras.Model.fit, not IterativeResNet.fit: the latter ends with a
        # 1000-iteration projection when constrained, a once-per-run cost that
        # would dominate the wall time of a short repetition.
        keras.Model.fit(self.model, self.dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0, shuffle=False,
                        callbacks=[timer])
        return timer.seconds / steps


def _step_timer_class():
    import keras

    class StepTimer(keras.callbacks.Callback):
        """Time from the end of the first step to the end of the last (steady state)."""

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if batch == 0:
                self.start = now
            self.seconds = now - self.start

    return StepTimer


def _StepTimer():  # noqa: N802  (a class made on first use, so the module loads without keras)
    global _StepTimer
    cls = _step_timer_class()
    _StepTimer = cls
    return cls()


# -- training: PyTorch ----------------------------------------------------------------


class TorchWorker:
    """``torch_resnet.py --serve`` in a subprocess, driven over JSON lines."""

    def __init__(self, threads=2):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "torch_resnet.py"), "--serve", "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )

    def request(self, **message):
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the PyTorch worker exited; see its error above")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def torch_available():
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


class TorchTrainer:
    """One configuration of the PyTorch twin, living in the worker process."""

    def __init__(self, worker, name, variant, image_shape, batch, coupling, lipschitz):
        self.worker, self.name = worker, name
        worker.request(make=name, variant=variant, image_shape=list(image_shape), num_classes=NUM_CLASSES,
                       batch_size=batch, coupling=coupling, lipschitz=lipschitz)

    def run(self, steps):
        return self.worker.request(run=self.name, steps=steps)["seconds_per_step"]


def train_case(variant, case, jit_compile, worker, quick, log):
    """Interleaved training throughput of every configuration, ours and (if available) PyTorch."""
    from iterconv_keras.models import variants

    steps, repeats = (case["steps"][1], case["repeats"][1]) if quick else (case["steps"][0], case["repeats"][0])
    batch, shape = case["batch"], case["image_shape"]
    trainers, setup = {}, {}
    for name, coupling, lipschitz in CONFIGS:
        start = time.perf_counter()
        ours = KerasTrainer(variant, shape, batch, coupling, lipschitz, jit_compile)
        ours.run(1)  # trace (and XLA-compile) the train step
        setup[name] = round(time.perf_counter() - start, 1)
        trainers[name, "ours"] = ours
        if worker is not None:
            trainers[name, "torch"] = TorchTrainer(worker, f"{variant}/{name}", variant, shape, batch,
                                                   coupling, lipschitz)
            trainers[name, "torch"].run(1)
        log(f"  {variant} {name}: built and warmed up (ours: {setup[name]} s incl. trace/compile)")
    for trainer in trainers.values():  # second warm-up: allocator and autotuning settle
        trainer.run(max(1, steps // 2))
    times = {key: [] for key in trainers}
    for r in range(repeats):
        for key, trainer in trainers.items():  # ours, torch, ours, torch, ...
            times[key].append(trainer.run(steps))
        log(f"  {variant} repetition {r + 1}/{repeats} done")
    kwargs = variants.variant_kwargs(variant)
    flops = 3 * forward_flops(shape, kwargs["stage_widths"], kwargs["blocks_per_stage"], kwargs["stem_stride"])
    return summarise_training(variant, case, steps, repeats, times, setup, flops, ours.jit_compile)


def summarise_training(variant, case, steps, repeats, times, setup, train_flops, jit_compile):
    batch = case["batch"]
    result = {"variant": variant, "image_shape": list(case["image_shape"]), "batch": batch,
              "steps_per_repetition": steps, "repetitions": repeats, "jit_compile": jit_compile,
              "train_gflop_per_image": round(train_flops / 1e9, 4), "configs": {}}
    for name, _, _ in CONFIGS:
        ours = times[name, "ours"]
        entry = {"ours_images_per_s": round(batch / statistics.median(ours), 1),
                 "ours_best_images_per_s": round(batch / min(ours), 1),
                 "ours_setup_s": setup[name]}
        entry["ours_gflops"] = round(entry["ours_images_per_s"] * train_flops / 1e9, 1)
        if (name, "torch") in times:
            theirs = times[name, "torch"]
            entry["torch_images_per_s"] = round(batch / statistics.median(theirs), 1)
            entry["torch_gflops"] = round(entry["torch_images_per_s"] * train_flops / 1e9, 1)
            entry["ratio_ours_over_torch"] = round(_median_ratio(theirs, ours), 3)
        result["configs"][name] = entry
    base = times["lambda=0", "ours"]
    result["coupling_overhead_percent"] = round(100 * (_median_ratio(times["lambda=0.9", "ours"], base) - 1), 1)
    result["constraint_overhead_percent"] = round(100 * (_median_ratio(times["lipschitz=0.9", "ours"], base) - 1), 1)
    if ("lambda=0", "torch") in times:
        tbase = times["lambda=0", "torch"]
        result["torch_coupling_overhead_percent"] = round(
            100 * (_median_ratio(times["lambda=0.9", "torch"], tbase) - 1), 1)
        result["torch_constraint_overhead_percent"] = round(
            100 * (_median_ratio(times["lipschitz=0.9", "torch"], tbase) - 1), 1)
    return result


def _median_ratio(numerators, denominators):
    """Median over repetitions of numerator / denominator (times: >1 means the denominator is faster)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


# -- inference ------------------------------------------------------------------------


def inference_case(quick, log):
    """``serving_default`` of the exported SavedModel against ``model.predict`` (``small``)."""
    import numpy as np
    import tensorflow as tf

    from iterconv_keras.models import variants
    from iterconv_keras.zoo import savedmodel as export

    model = variants.create_model("small", (32, 32, 1), NUM_CLASSES)
    model.compile(loss="sparse_categorical_crossentropy")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model")
        export.write_saved_model(model, path, {"dataset": "digitclutter"})
        serve = tf.saved_model.load(path).signatures["serving_default"]
        rng = np.random.default_rng(0)
        for batch, calls in ((1, 40 if quick else 200), (256, 2 if quick else 8)):
            x = rng.random((batch, 32, 32, 1), dtype=np.float32)
            many = np.concatenate([x] * calls)

            # Both closures run only inside this iteration (warm-up and timing); bind its values.
            def saved(calls=calls, x=x):
                for _ in range(calls):
                    serve(images=tf.constant(x))["logits"].numpy()

            def predict(batch=batch, calls=calls, x=x, many=many):
                if batch == 1:  # a user predicting one image at a time
                    for _ in range(calls):
                        model.predict(x, verbose=0)
                else:
                    model.predict(many, batch_size=batch, verbose=0)

            saved(), predict()  # warm-up: trace both
            pairs = [(_timed(saved), _timed(predict)) for _ in range(3 if quick else 5)]
            images = batch * calls
            results[f"batch_{batch}"] = {
                "saved_model_images_per_s": round(images / statistics.median(p[0] for p in pairs), 1),
                "predict_images_per_s": round(images / statistics.median(p[1] for p in pairs), 1),
                "speedup_saved_over_predict": round(statistics.median(p[1] / p[0] for p in pairs), 2),
            }
            log(f"  inference batch {batch} done")
    return results


# -- the existing single-purpose benchmarks -------------------------------------------


def run_script(name, *args):
    """Run ``benchmarks/<name>`` with ``args`` and parse the JSON it prints."""
    out = subprocess.run([sys.executable, os.path.join(HERE, name), *args], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out[out.index("{"):])


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- report ---------------------------------------------------------------------------


def print_report(results):
    m = results["machine"]
    print(f"\nmachine: {m.get('cpu')} x{m.get('cpus')} ({', '.join(m.get('simd', []))}); "
          f"TF {m['tensorflow']}, Keras {m['keras']}, torch {results.get('torch_version', 'n/a')}; "
          f"load average at start {m['loadavg_at_start'][0]:.2f}, at end {results['loadavg_at_end'][0]:.2f}")
    mm = results["matmul"]
    print(f"float32 matmul {mm['n']}x{mm['n']}: numpy {mm['numpy_gflops']} GFLOP/s, "
          f"TensorFlow {mm['tensorflow_gflops']} GFLOP/s (reference {mm['reference_gflops']})")
    for case in results["training"]:
        print(f"\ntraining {case['variant']} {tuple(case['image_shape'])}, batch {case['batch']}, "
              f"XLA={case['jit_compile']}, {case['repetitions']} x {case['steps_per_repetition']} steps "
              f"({case['train_gflop_per_image'] * 1000:.0f} MFLOP/image fwd+bwd)")
        print(f"  {'config':15s} {'ours img/s':>10s} {'torch img/s':>11s} {'ours/torch':>10s} "
              f"{'GFLOP/s':>8s} {'% matmul':>8s} {'setup s':>8s}")
        for name, e in case["configs"].items():
            share = 100 * e["ours_gflops"] / mm["reference_gflops"]
            print(f"  {name:15s} {e['ours_images_per_s']:10.1f} {e.get('torch_images_per_s', float('nan')):11.1f} "
                  f"{e.get('ratio_ours_over_torch', float('nan')):10.2f} {e['ours_gflops']:8.1f} "
                  f"{share:7.1f}% {e['ours_setup_s']:8.1f}")
        print(f"  overhead (ours): coupling {case['coupling_overhead_percent']:+.1f}% (goal <= 3%), "
              f"constraint {case['constraint_overhead_percent']:+.1f}% (goal <= 15%)")
        if "torch_coupling_overhead_percent" in case:
            print(f"  overhead (torch): coupling {case['torch_coupling_overhead_percent']:+.1f}%, "
                  f"constraint {case['torch_constraint_overhead_percent']:+.1f}%")
    if "inference" in results:
        print("\ninference (small, 32x32x1): SavedModel serving_default vs model.predict")
        for key, e in results["inference"].items():
            print(f"  {key:10s} SavedModel {e['saved_model_images_per_s']:9.1f} img/s, predict "
                  f"{e['predict_images_per_s']:9.1f} img/s, SavedModel/predict {e['speedup_saved_over_predict']:.2f}x")
    if "digitclutter" in results:
        d = results["digitclutter"]
        print(f"\nDigitclutter generation: {d['fast_images_per_second']} images/s on 1 core "
              f"({d['n_digits']} digits, 32x32; goal 5000)")
    if "indices" in results:
        i = results["indices"]
        print(f"index suite: {i['multiple']}x one plain evaluation pass ({i['examples']} examples; goal <= 12)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--quick", action="store_true", help="few steps: check the script, not the figures")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--xla", dest="jit_compile", action="store_true", default=None,
                        help="force XLA for our training (default: TrainConfig's default)")
    parser.add_argument("--no-xla", dest="jit_compile", action="store_false")
    parser.add_argument("--variants", default=",".join(TRAINING_CASES),
                        help=f"comma-separated training cases from {sorted(TRAINING_CASES)}")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: inference,digitclutter,indices")
    args = parser.parse_args()
    for name in args.variants.split(","):
        if name not in TRAINING_CASES:
            parser.error(f"--variants: unknown case {name!r}; choose from {sorted(TRAINING_CASES)}")
    skip = set(filter(None, args.skip.split(",")))

    def log(line):
        print(line, file=sys.stderr, flush=True)

    import keras

    keras.config.disable_interactive_logging()
    results = {"machine": machine_summary()}
    results["matmul"] = matmul_gflops()
    log(f"matmul: {results['matmul']}")
    worker = None
    if not args.no_torch and torch_available():
        worker = TorchWorker()
        results["torch_version"] = _torch_version()
    results["training"] = []
    try:
        for name in args.variants.split(","):
            results["training"].append(train_case(name, TRAINING_CASES[name], args.jit_compile, worker,
                                                  args.quick, log))
    finally:
        if worker is not None:
            worker.close()
    if "inference" not in skip:
        results["inference"] = inference_case(args.quick, log)
    if "digitclutter" not in skip:
        results["digitclutter"] = run_script("bench_digitclutter.py", "--json", "--count",
                                             "5000" if args.quick else "50000", "--reference-count", "50")
    if "indices" not in skip:
        results["indices"] = run_script("bench_indices.py", "--examples", "512" if args.quick else "2048",
                                        "--repeats", "1" if args.quick else "3")
    results["loadavg_at_end"] = os.getloadavg()
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


def _torch_version():
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                         text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
