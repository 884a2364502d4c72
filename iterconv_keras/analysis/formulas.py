"""The formulas of the indices of iterative convergence, as functions of measured numbers.

This is iterconv's operationalisation (docs/indices.md) of the three indices of
Lippl, Peters & Kriegeskorte, "Iterative convergent computation is not a useful
inductive bias for ResNets" (ICLR 2021 submission) and "Can neural networks
benefit from objectives that encourage iterative convergent computations? A case
study of ResNets and object classification" (PLoS One 19(3): e0293440, 2024). The
papers' exact formulas were not available to us; the formulas below are ours.
`iterconv_keras.analysis.indices` measures the numbers on a model; this module
needs no TensorFlow, so reports over stored results can use it.

For one stage with T trained blocks (t counted from 1, L = mean cross-entropy,
A = accuracy, chance = 1/K or the exact-set chance 1/C(K, n)):

    RI_t  = (L(drop_t) - L(rep_t)) / (L(drop_t) - L(full))      t = 2..T
            rep_t: block t replaced by a second application of block t-1
            drop_t: block t removed; t is skipped when |L(drop_t) - L(full)| <= tol
    DI(K) = (A(full) - A(full+K)) / (A(full) - chance)           K extra iterations
            of the stage's last block; DI = mean over K; null when
            A(full) - chance <= accuracy_tolerance (no meaningful denominator)
    CI    = 1 - u_(T+Kmax) / u_T,   u_k = mean_x ||f(x_k)||
    r     = (u_(T+Kmax) / u_T)^(1 / Kmax)                      convergence rate
            (< 1 converging, > 1 diverging); beside it the guaranteed
            contraction bound L of a contractive last block (r <= L, CI >= 1 - L^Kmax)

Every stage is manipulated on its own; the reported index is the mean over stages
of each stage's mean. Beside RI, ``recurrence_median`` is the median of every
stage's RI_t: where removing block t costs loss, RI_t <= 1 whenever repeating is
no better than the trained block, but it has no lower bound (a block whose removal
costs little gives a small denominator), so one term can carry the mean; the
median is the summary one term cannot move far.
"""

import math

import numpy as np


def recurrence_terms(full, drop, rep, tolerance):
    """Per-block recurrence terms ``RI_t`` of one stage, None where skipped.

    Args:
        full: performance of the trained schedule (loss or accuracy).
        drop: list over t = 2..T of the performance with block t removed.
        rep: list over t = 2..T of the performance with block t replaced by block t-1.
        tolerance: a block whose removal changes performance by less than this
            has no meaningful denominator (for example f = 0) and is skipped.

    Returns:
        list of floats or None, one per t.
    """
    terms = []
    for d, r in zip(drop, rep, strict=True):
        denominator = d - full
        terms.append(None if abs(denominator) <= tolerance else (d - r) / denominator)
    return terms


def _defined(values):
    return [v for v in values if v is not None and not math.isnan(v)]


def mean_or_nan(values):
    """Mean of the values that are not None/NaN; NaN when there are none."""
    kept = _defined(values)
    return float(np.mean(kept)) if kept else float("nan")


def median_or_nan(values):
    """Median of the values that are not None/NaN; NaN when there are none."""
    kept = _defined(values)
    return float(np.median(kept)) if kept else float("nan")


def recurrence_median(per_stage):
    """Median of the recurrence terms RI_t of every stage (skipped terms left out).

    A robust companion of the mean RI (our addition, docs/indices.md): where
    removing block t costs loss (``L(drop_t) > L(full)``), RI_t is at most 1
    when repeating block t-1 is no better than the trained block t, but it has
    no lower bound, so a single term with a small denominator can move the mean
    by more than the difference between conditions.

    Args:
        per_stage: the ``per_stage`` rows of `compute_indices` (each with
            ``recurrence_per_block``).

    Returns:
        float; NaN when every term was skipped.
    """
    return median_or_nan([term for row in per_stage for term in row["recurrence_per_block"]])


def divergence_terms(full, extended, chance, tolerance):
    """``DI(K) = (P(full) - P(full+K)) / (P(full) - chance)`` for each K.

    Written for accuracy (higher is better); the loss version passes negated
    losses and chance-level loss, for which the same ratio reads
    ``(L(full+K) - L(full)) / (L_chance - L(full))``. NaN for every K when the
    network is not more than ``tolerance`` above chance (at or below it): the
    ratio would divide by noise, or flip its sign, as RI's skip rule avoids.
    """
    denominator = full - chance
    if not denominator > tolerance:
        return [float("nan")] * len(extended)
    return [(full - e) / denominator for e in extended]


def convergence_index(updates, trained_blocks):
    """``CI = 1 - u_(T+Kmax) / u_T`` from the update sizes along one stage.

    Args:
        updates: ``[u_1, ..., u_(T+Kmax)]``, mean update norms of the T trained
            blocks followed by the extra iterations of the last block.
        trained_blocks: T.

    Returns:
        float; NaN when the last trained update is zero (nothing to compare with).
    """
    last_trained = updates[trained_blocks - 1]
    if last_trained <= 0.0:
        return float("nan")
    return 1.0 - updates[-1] / last_trained


def convergence_rate(updates, trained_blocks, extra):
    """``r = (u_(T+Kmax) / u_T)^(1 / Kmax)``: the mean factor per extra iteration.

    < 1: the updates shrink (converging); > 1: they grow. For a block map with
    Lipschitz constant L, ``u_(k+1) <= L u_k`` for every example, so ``r <= L``.

    Args:
        updates: ``[u_1, ..., u_(T+Kmax)]`` as for `convergence_index`.
        trained_blocks: T.
        extra: Kmax, the number of extra iterations at the end of ``updates``.

    Returns:
        float; NaN when the last trained update is zero.
    """
    last_trained = updates[trained_blocks - 1]
    if last_trained <= 0.0:
        return float("nan")
    return (updates[-1] / last_trained) ** (1.0 / extra)


def chance_accuracy(labels, num_classes, multi_label):
    """Accuracy of guessing: 1/K, or for sets of n of K classes the exact-set 1/C(K, n).

    For multi-label sets, n is read per example from the labels and the chance
    accuracy is averaged over the examples.
    """
    if not multi_label:
        return 1.0 / num_classes
    sizes = np.rint(np.asarray(labels, np.float64).sum(axis=-1)).astype(int)
    return float(np.mean([1.0 / math.comb(num_classes, int(n)) for n in sizes]))


def chance_loss(labels, num_classes, multi_label):
    """Loss of a network that ignores its input and predicts the class frequencies.

    ``log K`` for softmax outputs (uniform guess); for multi-label the mean binary
    entropy of each class's frequency in ``labels``.
    """
    if not multi_label:
        return math.log(num_classes)
    q = np.clip(np.asarray(labels, np.float64).mean(axis=0), 1e-12, 1 - 1e-12)
    return float(np.mean(-(q * np.log(q) + (1 - q) * np.log(1 - q))))
