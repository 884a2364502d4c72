"""Compiled pieces of the forward pass, for evaluating many block schedules cheaply.

The indices of iterative convergence (`iterconv_keras.indices`) evaluate dozens
of block schedules: drop a block, repeat one, iterate the last one K more
times, one stage at a time. Compiling one `tf.function` per whole schedule would
compile dozens of programs; recomputing the trained prefix of every schedule
would multiply the cost. Instead the model is cut into its pieces (stem, each
stage's transition, each block, head plus scoring), each compiled once, and a
schedule is a short Python sequence of calls on cached intermediate tensors:
a schedule that changes only stage s starts from the cached input of the
changed block in stage s and runs the later stages normally (method.md
section 5, last paragraph).

Every piece sees batches of one fixed size (the last batch is padded and
masked, see `padded_batches`), so each program is traced exactly once.

Reference: Lippl, Peters & Kriegeskorte, "Can neural networks benefit from
objectives that encourage iterative convergent computations? A case study of
ResNets and object classification", PLoS One 19(3): e0293440, 2024.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from iterconv_keras.metrics import exact_set_match


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


@dataclasses.dataclass
class Trace:
    """The trained-schedule forward pass of one batch, with per-block intermediates.

    Attributes:
        states: per stage, the list ``[x_0, ..., x_T]``: ``x_0`` enters the
            stage's blocks, ``x_k`` leaves block k-1 (so ``x_T`` leaves the stage).
        updates: per stage, ``[batch]`` vectors ``||f_k(x_k)||`` for k < T.
        state_norms: per stage, ``[batch]`` vectors ``||x_k||`` for k < T.
        loss, correct: ``[batch]`` per-example loss and 0/1 correctness.
    """

    states: list
    updates: list
    state_norms: list
    loss: object
    correct: object


class StagePrograms:
    """The model cut into compiled pieces that block schedules are built from.

    Args:
        model: an `IterativeResNet` (anything with ``embed``, ``enter_stage``,
            ``stages[s][t].residual``, ``classify``, ``num_stages`` and
            ``multi_label``).
        jit_compile: bool, compile each piece with XLA. Default False: for
            inference on 2 CPU cores with oneDNN, XLA ran the ``small`` variant
            no faster (often slower) and compiling every piece took seconds
            (``benchmarks/bench_indices.py --no-xla``).

    Example:
        >>> programs = StagePrograms(model)
        >>> trace = programs.trace(images, labels)
        >>> h = programs.run_blocks(0, [0, 0, 2], trace.states[0][0])
        >>> loss, correct = programs.tail(0, h, labels)
    """

    def __init__(self, model, jit_compile=False):
        self.model = model
        self.jit_compile = bool(jit_compile)
        self._programs = {}

    # -- compiled pieces, one program each, traced once per batch shape

    def _program(self, key, fn):
        entry = self._programs.get(key)
        if entry is None:
            # No autograph: the pieces have no tensor-dependent Python control flow.
            program = tf.function(fn, jit_compile=self.jit_compile, reduce_retracing=True, autograph=False)
            entry = self._programs[key] = _QuietlyTraced(program)
        return entry

    @property
    def num_programs(self):
        """How many pieces have been compiled so far (for tests of reuse)."""
        return len(self._programs)

    def stem(self, images):
        """Input normalisation and stem: the representation before stage 0."""
        return self._program("stem", lambda x: self.model.embed(x, training=False))(images)

    def enter(self, stage, h):
        """Stage ``stage``'s transition (identity when it has none)."""
        if self.model.transitions[stage] is None:
            return h
        return self._program(("enter", stage), lambda v: self.model.enter_stage(v, stage, training=False))(h)

    def block(self, stage, index, h, with_norms=False):
        """One application ``h + f(h)`` of block ``(stage, index)``.

        With ``with_norms`` also returns the per-example norms ``||f(h)||`` and
        ``||h||`` (the update size of the convergence index).
        """
        block = self.model.stages[stage][index]
        if with_norms:

            def step_with_norms(v):
                update = block.residual(v, training=False)
                return v + update, _per_example_norm(update), _per_example_norm(v)

            return self._program(("block", stage, index, True), step_with_norms)(h)
        return self._program(("block", stage, index, False), lambda v: v + block.residual(v, training=False))(h)

    def score(self, h, labels):
        """Head and scoring: per-example loss and 0/1 correctness."""
        multi_label = self.model.multi_label

        def head_and_score(v, y):
            logits = tf.cast(self.model.classify(v, training=False), tf.float32)
            return per_example_loss(logits, y, multi_label), per_example_correct(logits, y, multi_label)

        return self._program("score", head_and_score)(h, labels)

    # -- schedules built from the pieces

    def run_blocks(self, stage, order, h):
        """Apply the blocks of ``stage`` listed in ``order`` to ``h``."""
        for t in order:
            h = self.block(stage, t, h)
        return h

    def tail(self, stage, h, labels):
        """Stages after ``stage`` under the trained schedule, then head and scoring.

        ``h`` is the output of stage ``stage``'s blocks.
        """
        for s in range(stage + 1, self.model.num_stages):
            h = self.run_blocks(s, range(len(self.model.stages[s])), self.enter(s, h))
        return self.score(h, labels)

    def run_schedule(self, images, labels, schedule):
        """Per-example loss and correctness under a full ``schedule`` (one list per stage)."""
        schedule = self.model.validate_schedule(schedule)
        h = self.stem(images)
        for s, order in enumerate(schedule):
            h = self.run_blocks(s, order, self.enter(s, h))
        return self.score(h, labels)

    def trace(self, images, labels):
        """The trained schedule with every block's input and update norm kept (a `Trace`)."""
        states, updates, state_norms = [], [], []
        h = self.stem(images)
        for s, blocks in enumerate(self.model.stages):
            h = self.enter(s, h)
            xs, us, ns = [h], [], []
            for t in range(len(blocks)):
                h, u, n = self.block(s, t, h, with_norms=True)
                xs.append(h)
                us.append(u)
                ns.append(n)
            states.append(xs)
            updates.append(us)
            state_norms.append(ns)
        loss, correct = self.score(h, labels)
        return Trace(states, updates, state_norms, loss, correct)


class _QuietlyTraced:
    """A compiled piece whose first traces do not log TensorFlow's retracing warning.

    Dozens of pieces share a few Python closures, so TensorFlow's heuristic takes
    their single traces for a function "retraced in a loop" and warns on stderr.
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


def _per_example_norm(v):
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

    def __contains__(self, key):
        return key in self._sums
