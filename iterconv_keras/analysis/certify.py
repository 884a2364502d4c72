"""How Lipschitz is each residual function? A certificate and estimates per block, for any model.

For every block of an `IterativeResNet` (constrained or not), the residual
function ``f = conv2 . act . norm2 . conv1 . act . norm1`` at inference has
``Lip(f) <= ||conv2|| * L_act * gain2 * ||conv1|| * L_act * gain1``.
`block_certificate` evaluates this product with *certified* conv norms
(`operator_norm.certified_operator_norm`: an upper bound by the circular
convolution's exact singular values, Sedghi, Gupta & Long, ICLR 2019) and the
batch norms' inference gains: a bound that provably holds for every input of
the block's shape. `certify` adds, for comparison, the same product with
power-iteration estimates of the conv norms (lower bounds of the true norms)
and an empirical lower bound of ``Lip(f)`` from the Jacobian at probe points
(`jacobian_norms`). See ``docs/lipschitz.md``; the constraint itself is
`iterconv_keras.models.lipschitz` (after Behrmann et al., ICML 2019, and Gouk
et al. 2018), our operationalisation of Lippl, Peters & Kriegeskorte (PLoS One
19(3): e0293440, 2024).
"""

import numpy as np
import tensorflow as tf

from iterconv_keras.models import blocks as blocks_lib
from iterconv_keras.models import lipschitz as lipschitz_lib
from iterconv_keras.models import operator_norm
from iterconv_keras.models.normalization import inference_gains

ESTIMATE_ITERATIONS = operator_norm.ESTIMATE_ITERATIONS
"""Power iterations per convolution for the estimated conv norms."""


def jacobian_norms(fn, x, iterations=30, seed=0):
    """Per-example power-iteration estimate of ``||d fn / dx||`` at each example of ``x``.

    ``fn`` must act on each example independently (a block at inference). With
    ``v`` a unit vector per example, an iteration computes ``J v`` by forward-mode
    autodiff and ``J^T (J v)`` by reverse mode; ``sqrt(||J^T J v||)`` is a lower
    bound of the Jacobian's spectral norm, hence of ``Lip(fn)``.

    Args:
        fn: callable on a batch ``(N, H, W, C)``.
        x: the points, ``(N, H, W, C)``.
        iterations: int >= 1. Default 30.
        seed: int seed of the start vectors. Default 0.

    Returns:
        NumPy array of N estimates.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    v = tf.random.stateless_normal(tf.shape(x), seed=(seed, 0))
    axes = list(range(1, len(x.shape)))
    v = v / _example_norms(v, axes, keepdims=True)
    # One traced step reused by every iteration (eager autodiff is ~10x slower).
    step = tf.function(lambda v: _jacobian_step(fn, x, v, axes), autograph=False)
    norms = tf.zeros(tf.shape(x)[:1])
    for _ in range(iterations):
        v, norms = step(v)
    return np.sqrt(np.asarray(norms, dtype=np.float64))


def _jacobian_step(fn, x, v, axes):
    with tf.GradientTape() as tape:
        tape.watch(x)
        with tf.autodiff.ForwardAccumulator(x, v) as accumulator:
            y = fn(x)
        jv = accumulator.jvp(y)
    jtjv = tape.gradient(y, x, output_gradients=jv)
    norms = _example_norms(jtjv, axes)
    return jtjv / tf.maximum(_example_norms(jtjv, axes, keepdims=True), 1e-30), norms


def _example_norms(t, axes, keepdims=False):
    return tf.sqrt(tf.reduce_sum(tf.square(t), axis=axes, keepdims=keepdims))


def _block_inputs(model, inputs, num_random, seed):
    """Per block, the points at which its Jacobian is probed."""
    if inputs is not None:
        out = model.forward_intermediates(inputs, training=False)
        points = {}
        for s, blocks in enumerate(model.stages):
            h = [out["stage_inputs"][s]] + list(out["block_outputs"][s])
            for t in range(len(blocks)):
                points[(s, t)] = h[t]
        return points
    rng = np.random.default_rng(seed)
    points = {}
    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            shape = tuple(block.feature_shape)
            points[(s, t)] = rng.standard_normal((num_random, *shape)).astype(np.float32)
    return points


def block_certificate(block):
    """The certified ``Lip(f)`` of one block's residual function at inference, and its factors.

    Args:
        block: a built `ResidualBlock`.

    For the contractive form (``x <- (1 - alpha) x + alpha g(x)``) the product
    bounds ``Lip(g)``, the constrained branch, and ``contraction_bound`` is the
    certified Lipschitz constant of the block map, ``1 - alpha (1 - Lip(g))``:
    below 1, iterating the block provably converges.

    Each conv norm is `operator_norm.certified_computed_norm`: of the kernel as stored
    and as the layer computes with it (rounded to 16 bits under a mixed dtype policy).

    Returns:
        dict with ``conv_norms_certified`` (one per conv), ``norm_gains`` (the
        largest inference gain of each normalisation), ``activation_lipschitz``,
        ``certified`` (their product, with the activation constant once per conv)
        and ``contraction_bound`` (None for the plain form).
    """
    conv_norms = [
        operator_norm.certified_computed_norm(conv.kernel, block.feature_shape, conv.compute_dtype)
        for conv in block.convolutions
    ]
    gains = [float(np.max(inference_gains(norm))) for norm in block.normalizations]
    act = lipschitz_lib.activation_lipschitz(block.activation)
    certified = float(np.prod(conv_norms) * np.prod(gains) * act ** len(conv_norms))
    contractive = block.residual_form == "contractive"
    return {
        "conv_norms_certified": conv_norms,
        "norm_gains": gains,
        "activation_lipschitz": act,
        "certified": certified,
        "contraction_bound": blocks_lib.contraction_bound(block.alpha, certified) if contractive else None,
    }


def certified_lipschitz(model):
    """Certified ``Lip(f)`` of every block: a list over stages of lists over blocks (fast: no iteration)."""
    return [[block_certificate(block)["certified"] for block in blocks] for blocks in model.stages]


def certify(model, *, inputs=None, iterations=ESTIMATE_ITERATIONS, jacobian_iterations=30,
            num_random=4, seed=0):
    """Certified bound, estimate and empirical lower bound of ``Lip(f)`` for every block of ``model``.

    - ``certified`` (`block_certificate`): the product of certified conv norms,
      batch-norm inference gains and activation constants; an upper bound of
      ``Lip(f)`` that provably holds for every input of the block's shape.
    - ``estimated``: the same product with each conv norm estimated by
      ``iterations`` power iterations from the persistent vector (the model is
      not modified); each conv estimate is a lower bound of the true conv norm.
    - ``empirical``: the largest Jacobian norm of ``f`` (`jacobian_norms`) over
      the probe points, the block's actual inputs on ``inputs`` if given (via
      ``model.forward_intermediates``), otherwise ``num_random`` standard-normal
      feature maps: a lower bound of ``Lip(f)``.

    So ``empirical <= Lip(f) <= certified`` and ``estimated <= certified``.
    Works on unconstrained models too (then ``bound`` is None and the numbers
    show how far f is from any bound).

    Args:
        model: an `IterativeResNet`.
        inputs: optional batch of images ``(N, H, W, C)`` in [0, 1].
        iterations: int, power iterations per convolution. Default `ESTIMATE_ITERATIONS`.
        jacobian_iterations: int, power iterations on each Jacobian. Default 30.
        num_random: int, random probe points per block when ``inputs`` is None.
        seed: int, seed of random probes and start vectors.

    Returns:
        A JSON-ready dict: ``lipschitz`` (the model's c or None), ``iterations``,
        ``probe``, ``max_certified``, ``max_estimated``, ``max_empirical`` and
        ``blocks``, a list of dicts with ``stage``, ``block``, ``name``,
        ``bound``, ``per_conv_bound``, ``conv_norms_certified``,
        ``conv_norms_estimated``, ``reshaped_kernel_norms``, ``norm_gains``,
        ``activation_lipschitz``, ``certified``, ``contraction_bound``,
        ``estimated`` and ``empirical``. For contractive blocks the Lipschitz
        numbers are those of the branch g, which the constraint bounds.
    """
    points = _block_inputs(model, inputs, num_random, seed)
    reports = []
    for s, blocks in enumerate(model.stages):
        for t, block in enumerate(blocks):
            reports.append(_certify_block(block, s, t, points[(s, t)], iterations, jacobian_iterations, seed))
    return {
        "lipschitz": getattr(model, "lipschitz", None),
        "iterations": int(iterations),
        "probe": "inputs" if inputs is not None else f"{num_random} random normal feature maps",
        "max_certified": max(r["certified"] for r in reports),
        "max_estimated": max(r["estimated"] for r in reports),
        "max_empirical": max(r["empirical"] for r in reports),
        "blocks": reports,
    }


def _certify_block(block, s, t, x, iterations, jacobian_iterations, seed):
    certificate = block_certificate(block)
    estimates = []
    for conv in block.convolutions:
        constraint = conv.kernel_constraint
        if isinstance(constraint, lipschitz_lib.ConvOperatorNormBound):
            start = constraint.vector
        else:
            start = operator_norm.initial_vector(tuple(block.feature_shape[:2]) + (conv.kernel.shape[2],))
        sigma, _ = operator_norm.converged_operator_norm(conv.kernel, start, iterations)
        estimates.append(float(sigma))
    act = certificate["activation_lipschitz"]
    estimated = float(np.prod(estimates) * np.prod(certificate["norm_gains"]) * act ** len(estimates))
    # The branch g: the function the constraint bounds (f itself for the plain form).
    empirical = jacobian_norms(lambda h: block.branch(h, training=False), x, jacobian_iterations, seed)
    return {
        "stage": s,
        "block": t,
        "name": block.name,
        "bound": block.lipschitz,
        "per_conv_bound": None if block.lipschitz is None else lipschitz_lib.per_conv_bound(
            block.lipschitz, block.activation),
        "conv_norms_certified": certificate["conv_norms_certified"],
        "conv_norms_estimated": estimates,
        "reshaped_kernel_norms": [operator_norm.reshaped_kernel_norm(conv.kernel) for conv in block.convolutions],
        "norm_gains": certificate["norm_gains"],
        "activation_lipschitz": act,
        "certified": certificate["certified"],
        "contraction_bound": certificate["contraction_bound"],
        "estimated": estimated,
        "empirical": float(np.max(empirical)),
    }
