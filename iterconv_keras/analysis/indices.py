"""Indices of iterative convergence measured on a model (recurrence, divergence, convergence, parameters).

The formulas (iterconv's operationalisation of those of Lippl, Peters &
Kriegeskorte, PLoS One 19(3): e0293440, 2024; docs/indices.md) are in
`iterconv_keras.analysis.formulas`; this module runs the block schedules they
need (`iterconv_keras.analysis.programs`) and assembles the ``indices`` document.
"""

import numpy as np
import tensorflow as tf

from iterconv_keras.analysis import certify as certify_lib
from iterconv_keras.analysis.formulas import (
    chance_accuracy,
    chance_loss,
    convergence_index,
    convergence_rate,
    divergence_terms,
    mean_or_nan,
    recurrence_median,
    recurrence_terms,
)
from iterconv_keras.analysis.programs import StagePrograms, Totals, padded_batches, per_example_norm
from iterconv_keras.models.coupling import group_rho

DEFAULT_EXTRA_ITERATIONS = (1, 2, 4, 8, 16)
# |L(drop_t) - L(full)| below this (nats) makes RI_t a ratio of noise: t is skipped.
DEFAULT_TOLERANCE = 1e-3
# The same for the accuracy version (a fraction of examples).
DEFAULT_ACCURACY_TOLERANCE = 0.01


# --------------------------------------------------------------------------- effective parameters


def effective_parameters(model):
    """Effective number of parameters under coupling (docs/indices.md, item 4).

    For each coupled group (one parameter position, e.g. ``conv1.kernel``, in the
    T blocks of a stage) with copies theta_t and mean theta_bar:

        rho   = (T / (T - 1)) * sum_t ||theta_t - theta_bar||^2 / sum_t ||theta_t||^2
        P_eff = P_uncoupled + sum_groups P_block * (1 + (T - 1) * clip(rho, 0, 1))

    Counts trainable parameters (BatchNorm moving statistics are not learned).

    Returns:
        dict with ``parameters``, ``effective_parameters`` and ``per_stage`` (a
        list of ``{"stage", "rho", "effective_parameters", "parameters"}``, rho
        weighted by group size).
    """
    per_stage = []
    coupled = 0
    for s, blocks in enumerate(model.stages):
        block_vars = [block.trainable_variables for block in blocks]
        size = sum(int(np.prod(v.shape)) for vs in block_vars for v in vs)
        coupled += size
        if len(blocks) < 2:
            per_stage.append({"stage": s, "rho": None, "effective_parameters": size, "parameters": size})
            continue
        count, weighted_rho, effective = len(blocks), 0.0, 0.0
        for copies in zip(*block_vars, strict=True):
            rho = group_rho([np.asarray(v) for v in copies])
            p_block = int(np.prod(copies[0].shape))
            weighted_rho += rho * p_block
            effective += p_block * (1 + (count - 1) * rho)
        per_block = size / count
        per_stage.append(
            {"stage": s, "rho": weighted_rho / per_block, "effective_parameters": effective, "parameters": size}
        )
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    uncoupled = total - coupled
    return {
        "parameters": total,
        "effective_parameters": uncoupled + sum(row["effective_parameters"] for row in per_stage),
        "per_stage": per_stage,
    }


# --------------------------------------------------------------------------- measuring


def measure(programs, x, y, *, extra_iterations=DEFAULT_EXTRA_ITERATIONS, batch_size=256, progress=None):
    """Run every schedule the indices need and return the masked totals.

    One compiled program per batch (`suite_program`): the trained-schedule pass
    keeps every block's input; then, for each stage s, ``drop_t``/``rep_t``
    start from the cached input of block t and the extra iterations continue
    from the cached output of stage s, and the later stages run once on all of
    stage s's variants side by side. Nothing before stage s is recomputed.

    Args:
        programs: a `StagePrograms` for the model.
        x, y: images and labels.
        extra_iterations: increasing positive ints K.
        batch_size: examples per compiled call.
        progress: optional callable ``progress(batches_done)``, called per batch.

    Returns:
        a `Totals` with keys ``("full",)``, ``("drop", s, t)``, ``("rep", s, t)``,
        ``("extra", s, K)`` (each suffixed by ``"loss"`` or ``"correct"``) and
        ``("update", s, k)``, ``("norm", s, k)``.
    """
    extra = validate_extra_iterations(extra_iterations)
    sizes = tuple(len(blocks) for blocks in programs.model.stages)
    keys = suite_keys(sizes, extra)
    program = programs.compiled(
        ("indices", extra), lambda images, labels: suite_program(programs, extra, images, labels)
    )
    totals = Totals()
    for xb, yb, mask in padded_batches(x, y, min(batch_size, int(x.shape[0]))):
        for key, vector in zip(keys, program(xb, yb), strict=True):
            totals.add(key, vector, mask)
        if progress is not None:
            progress(1)
    return totals


def suite_keys(stage_sizes, extra):
    """The names of `suite_program`'s outputs, in order.

    Args:
        stage_sizes: number of blocks T of each stage.
        extra: the increasing extra-iteration counts K.
    """
    keys = [("full", "loss"), ("full", "correct")]
    for s, count in enumerate(stage_sizes):
        keys += [(kind, s, k) for k in range(count + extra[-1]) for kind in ("update", "norm")]
        keys += [variant + (score,) for variant in _variants(s, count, extra) for score in ("loss", "correct")]
    return keys


def _variants(stage, count, extra):
    """The schedules of one stage, in the order `suite_program` stacks them."""
    variants = [(kind, stage, t) for t in range(1, count) for kind in ("drop", "rep")]
    return variants + [("extra", stage, k) for k in extra]


def suite_program(programs, extra, images, labels):
    """Every per-example vector the indices need, for one batch (compiled by `measure`).

    Args:
        programs: a `StagePrograms` (its graph-building pieces are used).
        extra: the increasing extra-iteration counts K.
        images, labels: one batch.

    Returns:
        list of ``[batch]`` tensors named by `suite_keys`.
    """
    out = {}
    states = []
    h = programs.embed(images)
    for s, blocks in enumerate(programs.model.stages):
        h = programs.enter(s, h)
        kept = [h]
        for t in range(len(blocks)):
            h = _measured_step(programs, out, s, t, t, h)
            kept.append(h)
        states.append(kept)
    out["full", "loss"], out["full", "correct"] = programs.scores(programs.head(h), labels)
    for s, kept in enumerate(states):
        _stage_variants(programs, out, s, kept, extra, labels)
    sizes = tuple(len(blocks) for blocks in programs.model.stages)
    return [out[key] for key in suite_keys(sizes, extra)]


def _measured_step(programs, out, stage, index, k, h):
    """``h + f(h)`` for block ``index``, recording ``||f(h)||`` and ``||h||`` as step ``k``."""
    update = programs.residual(stage, index, h)
    out["update", stage, k] = per_example_norm(update)
    out["norm", stage, k] = per_example_norm(h)
    return h + update


def _stage_variants(programs, out, s, states, extra, labels):
    count = len(states) - 1
    outputs = {}
    for t in range(1, count):
        # Both variants share the trained prefix: start from block t's cached input.
        outputs["drop", s, t] = programs.run_blocks(s, range(t + 1, count), states[t])
        outputs["rep", s, t] = programs.run_blocks(s, [t - 1, *range(t + 1, count)], states[t])
    # One chain of extra iterations serves every K (divergence) and the update curve (convergence).
    h = states[count]
    for k in range(1, extra[-1] + 1):
        h = _measured_step(programs, out, s, count - 1, count - 1 + k, h)
        if k in extra:
            outputs["extra", s, k] = h
    # The later stages run once on all variants side by side: larger matrix
    # products for the small late feature maps than one pass per variant.
    variants = _variants(s, count, extra)
    stacked = tf.concat([outputs[v] for v in variants], axis=0)
    loss, correct = programs.scores(
        programs.tail_logits(s, stacked), tf.concat([labels] * len(variants), axis=0)
    )
    for v, v_loss, c in zip(variants, tf.split(loss, len(variants)), tf.split(correct, len(variants)), strict=True):
        out[v + ("loss",)] = v_loss
        out[v + ("correct",)] = c


def validate_extra_iterations(extra_iterations):
    """Return ``extra_iterations`` as a tuple of increasing positive ints, or raise ValueError."""
    extra = tuple(extra_iterations)
    if not extra or not all(isinstance(k, int) and k > 0 for k in extra) or list(extra) != sorted(set(extra)):
        raise ValueError(f"extra_iterations must be increasing positive ints, got {extra_iterations!r}")
    return extra


# --------------------------------------------------------------------------- the suite


def compute_indices(
    model,
    x,
    y,
    *,
    extra_iterations=DEFAULT_EXTRA_ITERATIONS,
    tolerance=DEFAULT_TOLERANCE,
    accuracy_tolerance=DEFAULT_ACCURACY_TOLERANCE,
    batch_size=256,
    programs=None,
    progress=None,
):
    """Recurrence, divergence and convergence indices, per stage and overall.

    Args:
        model: an `IterativeResNet`.
        x: images ``[N, H, W, C]`` (uint8, or float in [0, 1]).
        y: labels ``[N]`` or multi-hot ``[N, K]`` for a multi-label model.
        extra_iterations: the K of the divergence index, increasing; the largest
            is K_max of the convergence index. Default ``(1, 2, 4, 8, 16)``.
        tolerance: RI_t is skipped when ``|L(drop_t) - L(full)| <= tolerance``
            (nats), and the loss version of DI is null when the trained loss is
            not more than this below the chance-level loss. Default 1e-3.
        accuracy_tolerance: the same for the accuracy versions (RI, and DI null
            when accuracy is not more than this above chance). Default 0.01.
        batch_size: examples per compiled call. Default 256.
        programs: optional `StagePrograms` to reuse compiled pieces.
        progress: optional callable ``progress(batches_done)``.

    Returns:
        dict: ``{"accuracy", "loss", "indices"}`` where ``indices`` follows the
        ``iterconv eval --json`` document described in docs/indices.md (``recurrence``,
        ``recurrence_median``, ``divergence``, ``convergence``, ``convergence_rate``,
        ``effective_parameters``, ``parameters``, ``per_stage`` with
        ``contraction_bound``, ``lipschitz``, ``curves``) plus the accuracy/loss
        twins, the skip counts and the settings used. Undefined values are NaN.
    """
    extra = validate_extra_iterations(extra_iterations)
    programs = programs or StagePrograms(model)
    totals = measure(programs, x, y, extra_iterations=extra, batch_size=batch_size, progress=progress)
    chance_acc = chance_accuracy(y, model.num_classes, model.multi_label)
    chance_nll = chance_loss(y, model.num_classes, model.multi_label)
    full_acc, full_loss = totals.mean(("full", "correct")), totals.mean(("full", "loss"))
    per_stage = [
        _stage_indices(totals, s, len(blocks), extra, tolerance, accuracy_tolerance, chance_acc, chance_nll)
        for s, blocks in enumerate(model.stages)
    ]
    certificates = [[certify_lib.block_certificate(block) for block in blocks] for blocks in model.stages]
    for row, stage in zip(per_stage, certificates, strict=True):
        # The last block is the one the extra iterations repeat: its certified L bounds the rate.
        row["contraction_bound"] = stage[-1]["contraction_bound"]
    params = effective_parameters(model)
    for row, counts in zip(per_stage, params["per_stage"], strict=True):
        row["rho"] = counts["rho"]
        row["effective_parameters"] = counts["effective_parameters"]
    indices = {
        name: mean_or_nan([row[name] for row in per_stage])
        for name in (
            "recurrence", "divergence", "convergence", "convergence_rate",
            "recurrence_accuracy", "divergence_loss", "convergence_relative",
        )
    }
    indices["recurrence_median"] = recurrence_median(per_stage)
    indices["effective_parameters"] = params["effective_parameters"]
    indices["parameters"] = params["parameters"]
    indices["recurrence_skipped"] = sum(row["recurrence_skipped"] for row in per_stage)
    # The DI denominators are the trained network's distance from chance, the same for every stage.
    indices["divergence_skipped"] = not full_acc - chance_acc > accuracy_tolerance
    indices["divergence_loss_skipped"] = not chance_nll - full_loss > tolerance
    indices["per_stage"] = per_stage
    indices["lipschitz"] = {
        "certified": [[c["certified"] for c in stage] for stage in certificates],
        "bound": model.lipschitz,
        "residual_form": model.residual_form,
        "alpha": model.alpha,
        "contraction_bound": [[c["contraction_bound"] for c in stage] for stage in certificates],
    }
    indices["curves"] = _mean_curves(per_stage, extra)
    indices["settings"] = {
        "extra_iterations": list(extra),
        "tolerance": tolerance,
        "accuracy_tolerance": accuracy_tolerance,
        "divergence_tolerance": {"accuracy": accuracy_tolerance, "loss": tolerance},
        "chance_accuracy": chance_acc,
        "chance_loss": chance_nll,
        "performance": "loss (mean cross-entropy); *_accuracy keys use accuracy",
    }
    return {"accuracy": full_acc, "loss": full_loss, "indices": indices}


def _stage_indices(totals, s, count, extra, tolerance, accuracy_tolerance, chance_acc, chance_nll):
    full_loss, full_acc = totals.mean(("full", "loss")), totals.mean(("full", "correct"))
    ts = range(1, count)
    drop_loss = [totals.mean(("drop", s, t, "loss")) for t in ts]
    rep_loss = [totals.mean(("rep", s, t, "loss")) for t in ts]
    ri_loss = recurrence_terms(full_loss, drop_loss, rep_loss, tolerance)
    ri_acc = recurrence_terms(
        full_acc, [totals.mean(("drop", s, t, "correct")) for t in ts],
        [totals.mean(("rep", s, t, "correct")) for t in ts], accuracy_tolerance,
    )
    acc_k = [totals.mean(("extra", s, k, "correct")) for k in extra]
    loss_k = [totals.mean(("extra", s, k, "loss")) for k in extra]
    di_acc = divergence_terms(full_acc, acc_k, chance_acc, accuracy_tolerance)
    # Loss version: the same ratio with losses (lower is better), 1 = chance-level loss.
    di_loss = divergence_terms(-full_loss, [-v for v in loss_k], -chance_nll, tolerance)
    updates = [totals.mean(("update", s, k)) for k in range(count + extra[-1])]
    norms = [totals.mean(("norm", s, k)) for k in range(count + extra[-1])]
    relative = [u / n if n > 0 else float("nan") for u, n in zip(updates, norms, strict=True)]
    return {
        "stage": s,
        "recurrence": mean_or_nan(ri_loss),
        "divergence": mean_or_nan(di_acc),
        "convergence": convergence_index(updates, count),
        "convergence_rate": convergence_rate(updates, count, extra[-1]),
        "recurrence_accuracy": mean_or_nan(ri_acc),
        "divergence_loss": mean_or_nan(di_loss),
        "convergence_relative": _relative_convergence(relative, count),
        "recurrence_skipped": sum(term is None for term in ri_loss),
        "recurrence_per_block": ri_loss,
        "recurrence_accuracy_per_block": ri_acc,
        # The terms' parts, so another summary (a ratio of sums, say) needs no re-evaluation.
        "recurrence_losses": {"full": full_loss, "drop": drop_loss, "rep": rep_loss},
        "divergence_per_k": di_acc,
        "divergence_loss_per_k": di_loss,
        "blocks": count,
        "curves": {
            "extra_iterations": list(extra),
            "accuracy": acc_k,
            "loss": loss_k,
            # Along the T trained blocks, then the K_max extra iterations of the last one.
            "update_norm": updates,
            "relative_update": relative,
        },
    }


def _relative_convergence(relative, count):
    # Reported beside CI to show why CI uses absolute updates: for f(x) = -a x this stays 0.
    if not relative[count - 1] > 0:
        return float("nan")
    return 1.0 - relative[-1] / relative[count - 1]


def _mean_curves(per_stage, extra):
    """Curves over K averaged over stages (each stage manipulated on its own).

    Absolute update sizes of stages of different widths are not comparable (the
    widest stage would dominate a mean), so the top-level ``update_norm`` is each
    stage's update after K extra iterations relative to its last trained update,
    ``u_(T+K) / u_T``, averaged over stages. ``relative_update`` (``u / ||x||``)
    is dimensionless already and averaged as it is.
    """

    def at_k(row, name):
        curve = row["curves"][name]
        if name in ("accuracy", "loss"):
            return curve
        # Update curves run along trained blocks first; pick the K-th extra iteration.
        last = row["blocks"] - 1
        values = [curve[last + k] for k in extra]
        if name == "update_norm":
            values = [v / curve[last] if curve[last] > 0 else float("nan") for v in values]
        return values

    return {
        "extra_iterations": list(extra),
        **{
            name: [mean_or_nan(list(values)) for values in zip(*(at_k(row, name) for row in per_stage), strict=True)]
            for name in ("accuracy", "loss", "update_norm", "relative_update")
        },
    }
