"""Soft gradient coupling of the residual blocks of a stage.

For each stage and each parameter position p (the same kernel in every block),
with ``g_t`` the gradient of block t's copy and strength ``lam`` in [0, 1]:

    g_mean = (1/T) * sum_t g_t
    g'_t   = (1 - lam) * g_t + lam * g_mean

``lam = 0`` is ordinary training; ``lam = 1`` with identically initialised
blocks keeps them identical for ever (a recurrent ResNet). This is our
operationalisation of the soft gradient coupling of Lippl, Peters &
Kriegeskorte (PLoS One 2024, e0293440); see ``docs/method.md``.

Blocks keep separate variables: a literally shared variable would receive the
*sum* of the gradients, not the mean, and could not interpolate.
"""

import numpy as np


def validate_strength(strength):
    """Return ``strength`` as a float in [0, 1] or raise ``ValueError``."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"coupling must be a number in [0, 1], got {strength!r}") from None
    if not 0.0 <= value <= 1.0 or value != value:
        raise ValueError(f"coupling must be in [0, 1], got {strength!r}")
    return value


def coupling_groups(stages, variables):
    """Index groups of ``variables`` that hold the same parameter in every block.

    Args:
        stages: list of stages, each a list of shape-identical block layers.
        variables: the flat list of trainable variables the gradients refer to
            (normally ``model.trainable_variables``).

    Returns:
        A list of groups; each group lists, per block of one stage, the index in
        ``variables`` of that block's copy of one parameter. Stages with a
        single block contribute nothing.
    """
    position = {id(v): i for i, v in enumerate(variables)}
    groups = []
    for blocks in stages:
        if len(blocks) < 2:
            continue
        per_block = [block.trainable_variables for block in blocks]
        counts = {len(vs) for vs in per_block}
        if len(counts) != 1:
            raise ValueError(f"blocks of a stage must have the same variables, got counts {sorted(counts)}")
        for copies in zip(*per_block, strict=True):
            shapes = {tuple(v.shape) for v in copies}
            if len(shapes) != 1:
                raise ValueError(f"coupled variables must share a shape, got {sorted(shapes)}")
            groups.append([position[id(v)] for v in copies])
    return groups


def couple_gradients(gradients, groups, strength):
    """Mix each block's gradient with its group's mean gradient.

    Args:
        gradients: list of gradient tensors aligned with the variables that
            ``groups`` indexes.
        groups: output of `coupling_groups`.
        strength: float lambda in [0, 1], a Python constant (decided at trace time).

    Returns:
        A new list of gradients. ``strength == 0`` returns the input unchanged
        (so lambda = 0 is bitwise ordinary training) and ``strength == 1`` gives
        every block the very same mean tensor (so blocks stay bitwise identical).
    """
    if strength == 0.0:
        return list(gradients)
    coupled = list(gradients)
    for group in groups:
        copies = [gradients[i] for i in group]
        mean = _mean(copies)
        for i, g in zip(group, copies, strict=True):
            coupled[i] = mean if strength == 1.0 else (1.0 - strength) * g + strength * mean
    return coupled


def _mean(tensors):
    # add_n then one scale: a single fused op, and the same tensor for every block.
    import tensorflow as tf

    return tf.math.add_n(tensors) * (1.0 / len(tensors))


def tie_blocks(stages):
    """Copy block 0's weights into every other block of its stage.

    All variables are copied (trainable and BN moving statistics), so every
    coupling strength starts from the same network and lambda is the only
    difference between conditions.
    """
    for blocks in stages:
        first = blocks[0].weights
        for block in blocks[1:]:
            for target, source in zip(block.weights, first, strict=True):
                target.assign(source)


def group_rho(copies):
    """The normalised between-block spread rho of one coupled parameter, in [0, 1].

    ``rho = (T / (T - 1)) * sum_t ||theta_t - theta_bar||^2 / sum_t ||theta_t||^2``,
    clipped to [0, 1] (docs/indices.md, item 4): 0 for identical copies (and
    for all-zero copies), about 1 for independent copies of mean zero. The
    effective-parameter count (`iterconv_keras.analysis.indices.effective_parameters`)
    applies it per coupled group.

    Args:
        copies: the T >= 2 arrays of one parameter, one per block.
    """
    thetas = np.stack([np.ravel(c).astype(np.float64) for c in copies])
    count = thetas.shape[0]
    scale = np.sum(thetas**2)
    if scale == 0.0:
        return 0.0
    spread = np.sum((thetas - thetas.mean(axis=0)) ** 2)
    return float(np.clip(count / (count - 1) * spread / scale, 0.0, 1.0))


def between_block_distance(stages):
    """`group_rho` of each stage's whole blocks (all trainable weights as one vector), averaged over stages.

    0 means identical blocks. A one-number summary of how far coupling lets the
    blocks drift apart (the tests use it); the effective-parameter count uses
    `group_rho` per parameter instead.
    """
    values = [group_rho([_flat(block) for block in blocks]) for blocks in stages if len(blocks) >= 2]
    return float(np.mean(values)) if values else 0.0


def _flat(block):
    return np.concatenate([np.asarray(v).ravel() for v in block.trainable_variables]).astype(np.float64)
