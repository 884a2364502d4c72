"""Coupling under `tf.distribute`: sum the gradients across replicas first, then couple.

With several replicas, each computes the gradients of its share of the global
batch, and Keras' TensorFlow optimizer sums them across replicas inside
``optimizer.apply`` (``_all_reduce_sum_gradients``, one all-reduce of the whole
gradient list). Coupling the *local* gradients before that sum gives every copy
of a block the same tensor on each replica, but the all-reduce then sums the
copies as separate tensors. An all-reduce may add the replicas' terms in a
different order for different tensors (packing into one buffer, ring chunks that
start on different replicas), and with three or more replicas floating-point
addition depends on the order, so at lambda = 1 the blocks would stay bitwise
identical only where the all-reduce happens to treat them alike.

`apply_coupled` therefore sums first (one all-reduce of the same list of
gradients the optimizer would sum), couples the sums, which are the same tensor
values on every replica, and hands them to ``optimizer.apply`` with the
optimizer's own sum switched off for that call. The identity at lambda = 1 then
holds by construction for any number of replicas and any all-reduce.

Soft gradient coupling is our operationalisation of Lippl, Peters & Kriegeskorte
(PLoS One 2024, e0293440); see ``docs/method.md`` and ``docs/scaling.md``.
"""

import threading

import tensorflow as tf

from iterconv_keras.models import coupling as coupling_lib

# The Keras TensorFlow optimizer's method that sums gradients across replicas
# (keras/src/backend/tensorflow/optimizer.py, checked for Keras 3.15).
_KERAS_SUM = "_all_reduce_sum_gradients"


def replicas_in_sync():
    """Replicas of the current replica context (1 outside `tf.distribute` or in cross-replica context)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def all_reduce_sum(gradients):
    """Each gradient summed over the replicas, ``None`` kept; one all-reduce, as Keras' optimizer does it.

    Args:
        gradients: list of gradient tensors (or None) in the replica context.
    """
    present = [g for g in gradients if g is not None]
    summed = iter(tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if g is None else next(summed) for g in gradients]


def apply_coupled(optimizer, gradients, variables, groups, strength):
    """Sum ``gradients`` across replicas, couple them, and apply them with ``optimizer``.

    Called in the replica context of a `tf.distribute` strategy with more than
    one replica, in place of ``optimizer.apply(couple(gradients), variables)``.

    Args:
        optimizer: a Keras optimizer (a `keras.optimizers.LossScaleOptimizer` too).
        gradients: this replica's gradients, aligned with ``variables``.
        variables: the trainable variables.
        groups: `coupling.coupling_groups` of ``variables``.
        strength: coupling strength lambda in [0, 1].
    """
    coupled = coupling_lib.couple_gradients(all_reduce_sum(gradients), groups, strength)
    switches = [_switch(o) for o in _optimizers(optimizer)]
    for switch in switches:
        switch.enter()
    try:
        optimizer.apply(coupled, variables)
    finally:
        for switch in switches:
            switch.exit()


def _optimizers(optimizer):
    # A LossScaleOptimizer applies through its inner optimizer, whose update sums.
    inner = getattr(optimizer, "inner_optimizer", None)
    return [optimizer] if inner is None else [optimizer, inner]


def check_supported(optimizer):
    """Raise `RuntimeError` now, not inside a traced step, when coupling cannot skip Keras' sum.

    Coupling after the cross-replica sum relies on Keras' private
    ``_all_reduce_sum_gradients`` (Keras 3.15). If a Keras version keeps the name
    but sums elsewhere, `tests/test_distribution.py`'s independent computation of a
    coupled two-replica step (sum, then couple, once) fails.
    """
    for target in _optimizers(optimizer):
        if getattr(target, _KERAS_SUM, None) is None:
            raise RuntimeError(
                f"{type(target).__name__} has no {_KERAS_SUM}: this Keras version sums gradients across replicas "
                "elsewhere, so coupled training with several replicas cannot skip that sum; use one replica"
            )


def _switch(optimizer):
    switch = optimizer.__dict__.get(_KERAS_SUM)
    if isinstance(switch, _SumSwitch):
        return switch
    original = getattr(optimizer, _KERAS_SUM, None)
    if original is None:
        raise RuntimeError(
            f"{type(optimizer).__name__} has no {_KERAS_SUM}: this Keras version sums gradients across replicas "
            "elsewhere, so coupled training with several replicas cannot skip that sum; use one replica"
        )
    switch = _SumSwitch(original)
    # An instance attribute shadows the method for this optimizer only.
    object.__setattr__(optimizer, _KERAS_SUM, switch)
    return switch


class _SumSwitch:
    """The optimizer's cross-replica sum, skipped while a replica applies already-summed gradients.

    A counter rather than a flag: `tf.distribute.MirroredStrategy` runs the
    replicas' steps in threads, and a loss-scale optimizer applies from threads
    it starts inside a merge call, all while the calling replicas are inside
    `apply_coupled`. Within one step every replica takes the same path.
    """

    def __init__(self, original):
        self.original = original
        self.active = 0
        self.lock = threading.Lock()

    def enter(self):
        with self.lock:
            self.active += 1

    def exit(self):
        with self.lock:
            self.active -= 1

    def __call__(self, grads_and_vars):
        if self.active:
            return list(grads_and_vars)
        return self.original(grads_and_vars)
