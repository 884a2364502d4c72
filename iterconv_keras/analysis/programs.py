"""Compiled evaluation programs of a model, for evaluating many block schedules cheaply.

The indices of iterative convergence (`iterconv_keras.analysis.indices`) evaluate dozens
of block schedules: drop a block, repeat one, iterate the last one K more
times, one stage at a time. Evaluating each as a separate forward pass would
recompute the trained prefix of every schedule. Instead the model is exposed as
graph-building pieces (stem, each stage's transition, each block, the later
stages plus head, scoring) from which whole programs are written and compiled
once: a schedule that changes only stage s starts from the cached input of the
changed block in stage s and runs the later stages normally (method.md
section 5, last paragraph).

Each program is one `tf.function` traced once for the one padded batch shape
(see `padded_batches`). Whole programs rather than one call per block: on
2 CPU cores one compiled forward pass ran 1.4x faster than the same pass as a
chain of per-block calls, and TensorFlow runs the independent schedules inside
one program side by side (``docs/performance.md``).

Reference: Lippl, Peters & Kriegeskorte, "Can neural networks benefit from
objectives that encourage iterative convergent computations? A case study of
ResNets and object classification", PLoS One 19(3): e0293440, 2024.
"""

import numpy as np
import tensorflow as tf

from iterconv_keras.models.metrics import exact_set_match


def padded_batches(x, y, batch_size):
    """Yield ``(images, labels, mask)`` batches of exactly ``batch_size`` examples.

    Images are scaled from uint8 to float32 [0, 1] (float inputs are taken as
    already scaled). The last batch is padded by repeating its first example;
    ``mask`` is 1.0 for real examples and 0.0 for padding, so a fixed batch
    shape never retraces a compiled program.

    Args:
        x: images ``[N, H, W, C]``, uint8 or float in [0, 1].
        y: labels ``[N]`` (class ids) or ``[N, K]`` (multi-hot).
        batch_size: positive int.
    """
    n = int(x.shape[0])
    if n < 1:
        raise ValueError(f"nothing to evaluate: got {n} examples")
    for start in range(0, n, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        real = xb.shape[0]
        if real < batch_size:
            reps = np.zeros(batch_size - real, dtype=np.int64)
            xb = np.concatenate([xb, xb[reps]])
            yb = np.concatenate([yb, yb[reps]])
        mask = np.zeros(batch_size, np.float32)
        mask[:real] = 1.0
        yield to_unit_float(xb), yb, mask


def to_unit_float(x):
    """uint8 images as float32 in [0, 1]; float images unchanged (as float32)."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(1.0 / 255.0)
    return x.astype(np.float32, copy=False)


class StagePrograms:
    """A model's compiled evaluation programs, and the pieces they are written from.

    The pieces (`embed`, `enter`, `residual`, `run_blocks`,
    `tail_logits`, `scores`) build graph ops; call them while tracing a program
    passed to `compiled`. `run_schedule` is the ready-made program for one
    whole block schedule.

    Args:
        model: an `IterativeResNet` (anything with ``embed``, ``enter_stage``,
            ``transitions``, ``stages[s][t].residual``, ``classify``,
            ``num_stages``, ``multi_label`` and ``validate_schedule``).
        jit_compile: bool, compile each program with XLA. Default False: for
            inference on 2 CPU cores with oneDNN, XLA ran the ``small`` variant
            no faster and compiling took seconds (``benchmarks/bench_indices.py --xla``).

    Example:
        >>> programs = StagePrograms(model)
        >>> loss, correct = programs.run_schedule(images, labels, [[0, 0, 2], [0, 1, 2]])
    """

    def __init__(self, model, jit_compile=False):
        self.model = model
        self.jit_compile = bool(jit_compile)
        self._programs = {}

    def compiled(self, key, fn):
        """The compiled program for ``fn`` under ``key``, compiled on first use only.

        Args:
            key: hashable name of the program (one program per key).
            fn: a function of tensors built from this object's pieces.
        """
        entry = self._programs.get(key)
        if entry is None:
            # No autograph: the programs have no tensor-dependent Python control flow.
            program = tf.function(fn, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
            entry = self._programs[key] = _QuietlyTraced(program)
        return entry

    @property
    def num_programs(self):
        """How many programs have been compiled so far (for tests of reuse)."""
        return len(self._programs)

    # -- graph-building pieces (call while tracing)

    def embed(self, images):
        """Input normalisation and stem: the representation before stage 0."""
        return self.model.embed(images, training=False)

    def enter(self, stage, h):
        """Stage ``stage``'s transition (identity when it has none)."""
        return self.model.enter_stage(h, stage, training=False)

    def residual(self, stage, index, h):
        """The residual function ``f(h)`` of block ``(stage, index)``."""
        return self.model.stages[stage][index].residual(h, training=False)

    def run_blocks(self, stage, order, h):
        """Apply the blocks of ``stage`` listed in ``order`` to ``h`` (the model's own `run_stage`)."""
        return self.model.run_stage(h, stage, list(order), training=False)

    def tail_logits(self, stage, h):
        """Stages after ``stage`` under the trained schedule, then the head.

        ``h`` is the output of stage ``stage``'s blocks (``stage=-1``: of the stem).
        """
        for s in range(stage + 1, self.model.num_stages):
            h = self.run_blocks(s, range(len(self.model.stages[s])), self.enter(s, h))
        return self.head(h)

    def head(self, h):
        """Logits (float32) from the output of the last stage."""
        return tf.cast(self.model.classify(h, training=False), tf.float32)

    def scores(self, logits, labels):
        """Per-example loss and 0/1 correctness of ``logits``."""
        multi_label = self.model.multi_label
        return per_example_loss(logits, labels, multi_label), per_example_correct(logits, labels, multi_label)

    # -- ready-made programs

    def run_schedule(self, images, labels, schedule):
        """Per-example loss and correctness under a full ``schedule`` (one list per stage).

        One compiled program per distinct schedule.
        """
        schedule = tuple(tuple(order) for order in self.model.validate_schedule(schedule))

        def forward_and_score(x, y):
            h = self.embed(x)
            for s, order in enumerate(schedule):
                h = self.run_blocks(s, order, self.enter(s, h))
            return self.scores(self.head(h), y)

        return self.compiled(("schedule", schedule), forward_and_score)(images, labels)

    def accuracy_and_loss(self, x, y, batch_size, schedule=None, progress=None):
        """Mean accuracy and loss over all of ``x`` under ``schedule`` (default: the model's own).

        Args:
            x, y: images and labels (any number; the last batch is padded and masked).
            batch_size: examples per compiled call.
            schedule: block schedule, one list per stage, or None.
            progress: optional callable ``progress(batches_done)``.

        Returns:
            ``(accuracy, loss)`` as Python floats.
        """
        totals = Totals()
        for xb, yb, mask in padded_batches(x, y, min(batch_size, int(x.shape[0]))):
            loss, correct = self.run_schedule(xb, yb, schedule)
            totals.add("loss", loss, mask)
            totals.add("correct", correct, mask)
            if progress is not None:
                progress(1)
        return totals.mean("correct"), totals.mean("loss")


class _QuietlyTraced:
    """A compiled program whose first traces do not log TensorFlow's retracing warning.

    The programs of several schedules share one Python closure, so TensorFlow's
    heuristic takes their single traces for a function "retraced in a loop" and
    warns on stderr.
    """

    def __init__(self, program):
        self.program = program

    def experimental_get_tracing_count(self):
        return self.program.experimental_get_tracing_count()

    def __call__(self, *args):
        if self.program.experimental_get_tracing_count() >= 2:
            return self.program(*args)
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")
        try:
            return self.program(*args)
        finally:
            logger.setLevel(level)


def per_example_norm(v):
    """Euclidean norm of each example's entries, ``[batch]`` float32."""
    v = tf.cast(v, tf.float32)
    return tf.sqrt(tf.reduce_sum(tf.square(tf.reshape(v, [tf.shape(v)[0], -1])), axis=1))


def per_example_loss(logits, labels, multi_label):
    """Cross-entropy per example: softmax CE, or mean binary CE over the K outputs."""
    if multi_label:
        labels = tf.cast(labels, logits.dtype)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=-1)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)


def per_example_correct(logits, labels, multi_label):
    """1.0 where the prediction is right: top-1, or the exact set for multi-label."""
    if multi_label:
        return tf.cast(exact_set_match(labels, logits), tf.float32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32)


class Totals:
    """Masked running sums of per-example vectors, under named keys.

    ``add(key, vector, mask)`` accumulates ``sum(vector * mask)``; ``mean(key)``
    divides by the number of real examples seen for that key.
    """

    def __init__(self):
        self._sums = {}
        self._counts = {}

    def add(self, key, vector, mask):
        value = float(np.sum(np.asarray(vector, np.float64) * mask))
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0.0) + float(np.sum(mask))

    def mean(self, key):
        return self._sums[key] / self._counts[key]
