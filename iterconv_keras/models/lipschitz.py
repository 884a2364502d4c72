"""Lipschitz constraint on the residual functions: soft spectral normalisation.

Each convolution ``W`` inside a residual function ``f`` is rescaled after every
optimizer step:

    W <- W * min(1, c_l / sigma(W))

where ``sigma(W)`` is the operator norm of the *convolution on the block's
feature map* (SAME padding, stride 1, input shape ``(H, W, C)``), estimated by
power iteration with a convolution and its adjoint (the transposed
convolution) on a persistent vector. One iteration per training step, many at
construction, at the end of ``fit`` and in `enforce` / `certify`. Only kernels
above the bound are scaled ("soft" spectral normalisation of invertible ResNets,
Behrmann et al., ICML 2019, after Gouk et al. 2018; power iteration with a
persistent vector as in Miyato et al., ICLR 2018). The norm of the reshaped
``(kh*kw*cin, cout)`` kernel matrix, which `keras.layers.SpectralNormalization`
uses, is a different quantity and can understate the operator norm.

Per-layer share of the target ``c`` (see ``docs/lipschitz.md``): batch
normalisation inside ``f`` has its per-channel gain capped at 1
(`GainCappedBatchNormalization`), the activation has a known Lipschitz constant
``L`` (1 for ReLU and tanh), and each of the two convolutions is bounded by
``sqrt(c) / L``, so ``Lip(f) <= 1 * L * sqrt(c)/L * 1 * L * sqrt(c)/L = c`` for
``f`` as evaluated at inference.

This is the project's operationalisation of the Lipschitz constraint of Lippl,
Peters & Kriegeskorte (PLoS One 19(3): e0293440, 2024); their exact formula was
not available to us.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from iterconv_keras.models._checks import positive_shape

# Largest |derivative| of each block activation, rounded up (verified on a grid by
# tests/test_lipschitz.py). GELU (keras' default, exact erf form) peaks at
# x = sqrt(2) with Phi(sqrt 2) + sqrt(2) phi(sqrt 2) = 1.12890; SiLU at x ~ 2.40
# with 1.09984.
ACTIVATION_LIPSCHITZ = {"relu": 1.0, "tanh": 1.0, "gelu": 1.1290, "silu": 1.0999}

TRAIN_ITERATIONS = 1
"""Power iterations per optimizer step (on the persistent vector)."""

INIT_ITERATIONS = 200
"""Power iterations of the projection at model construction (a feasible start)."""

ENFORCE_ITERATIONS = 1000
"""Power iterations of `enforce`, run at the end of ``fit`` and before export.

Conv operators have many singular values close to the top one, so power
iteration converges slowly (roughly as 1/k in the worst case); 200 iterations
after training left kernels up to 7e-4 relative above their bound as measured
by a further 1000 iterations, 1000 left them within 3.1e-4 (tiny variant, Adam)."""

CERTIFY_ITERATIONS = 1000
"""Power iterations per convolution used by `certify`."""

_VECTOR_SEED = 20190101


def validate_bound(value, name="lipschitz"):
    """Return ``value`` as a positive finite float, or None when it is None.

    Raises:
        ValueError: if ``value`` is not a number, is NaN or infinite, or is <= 0.
            The message echoes the value.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    try:
        bound = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}") from None
    if not math.isfinite(bound) or bound <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return bound


def activation_lipschitz(activation):
    """Lipschitz constant of a block activation named in `ACTIVATION_LIPSCHITZ`."""
    if activation not in ACTIVATION_LIPSCHITZ:
        raise ValueError(
            f"no Lipschitz constant known for activation {activation!r}; "
            f"choose one of {sorted(ACTIVATION_LIPSCHITZ)}"
        )
    return ACTIVATION_LIPSCHITZ[activation]


def per_conv_bound(lipschitz, activation="relu"):
    """Bound ``c_l`` of each of the two convolutions of ``f`` for a target ``c``.

    With batch-norm gains capped at 1 and activations of Lipschitz constant ``L``,
    ``f = conv2 . act . bn2 . conv1 . act . bn1`` has ``Lip(f) <= L^2 * c_l^2``;
    ``c_l = sqrt(c) / L`` makes that exactly ``c``.

    Args:
        lipschitz: float c > 0, the target bound on Lip(f).
        activation: name of the block activation. Default ``"relu"``.
    """
    return math.sqrt(validate_bound(lipschitz)) / activation_lipschitz(activation)


# -- the operator norm of a convolution ------------------------------------------


def _conv(u, kernel):
    return tf.nn.conv2d(u, kernel, strides=1, padding="SAME")


def _conv_adjoint(v, kernel, input_shape):
    # conv2d_transpose with the same kernel, stride and padding is the exact
    # adjoint (matrix transpose) of conv2d, which power iteration needs.
    return tf.nn.conv2d_transpose(v, kernel, output_shape=input_shape, strides=1, padding="SAME")


def conv_operator_norm(kernel, vector, iterations=1):
    """Power-iteration estimate of the operator norm of a SAME, stride-1 convolution.

    Each iteration maps the unit vector ``u`` to ``w = A^T A u`` (a convolution and
    a transposed convolution) and estimates ``sigma = sqrt(||w||)``, a lower bound
    of the largest singular value that converges to it; ``u`` is then replaced by
    ``w / ||w||``. The vector is the feature map the convolution acts on, so this is
    the norm of the convolution as an operator on ``(H, W, Cin)`` inputs, not the
    norm of the reshaped kernel matrix.

    Args:
        kernel: ``(kh, kw, cin, cout)`` tensor (Keras / TF layout).
        vector: ``(1, H, W, cin)`` tensor of unit norm, the current estimate of the
            top right-singular vector.
        iterations: Python int >= 1.

    Returns:
        ``(sigma, vector)``: the scalar estimate and the updated unit vector. A zero
        kernel gives ``sigma = 0`` and leaves the vector unchanged.
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    kernel = tf.convert_to_tensor(kernel)
    u = tf.cast(tf.convert_to_tensor(vector), kernel.dtype)
    shape = tf.shape(u)
    norm = tf.zeros((), kernel.dtype)
    for _ in range(iterations):
        u, norm = _power_step(u, kernel, shape)
    return tf.sqrt(norm), u


def _power_step(u, kernel, shape):
    w = _conv_adjoint(_conv(u, kernel), kernel, shape)
    norm = tf.norm(w)
    # A zero kernel maps everything to 0; keep the old vector rather than NaN.
    u = tf.where(norm > 0, w / tf.maximum(norm, tf.constant(1e-30, norm.dtype)), u)
    return u, norm


@tf.function(reduce_retracing=True)
def _power_loop(kernel, u, iterations):
    # Graph-mode loop for the many-iteration estimates (eager would dispatch
    # thousands of small ops one by one).
    shape = tf.shape(u)

    def body(i, u, norm):
        u, norm = _power_step(u, kernel, shape)
        return i + 1, u, norm

    _, u, norm = tf.while_loop(
        lambda i, u, norm: i < iterations, body, (tf.constant(0), u, tf.zeros((), kernel.dtype))
    )
    return tf.sqrt(norm), u


def converged_operator_norm(kernel, vector, iterations=ENFORCE_ITERATIONS):
    """`conv_operator_norm` with many iterations, run as one graph (for eval/export)."""
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    kernel = tf.convert_to_tensor(kernel)
    u = tf.cast(tf.convert_to_tensor(vector), kernel.dtype)
    return _power_loop(kernel, u, tf.constant(iterations))


def rescale(kernel, sigma, bound):
    """``kernel * min(1, bound / sigma)``: only kernels above the bound change.

    Below the bound the factor is exactly 1.0, so the kernel is returned bitwise
    unchanged; ``sigma = 0`` gives ``bound / 0 = inf`` and the factor 1.
    """
    kernel = tf.convert_to_tensor(kernel)
    return kernel * tf.minimum(tf.constant(1.0, kernel.dtype), bound / sigma)


def initial_vector(input_shape):
    """Deterministic unit vector of shape ``(1, H, W, C)``.

    Deterministic (a fixed seed, not the global random state) so that every block
    of a stage starts with the same vector and, at coupling strength 1, the
    constraint keeps the blocks bitwise identical.
    """
    rng = np.random.default_rng(_VECTOR_SEED)
    u = rng.standard_normal((1, *input_shape)).astype(np.float32)
    return u / np.linalg.norm(u)


def reshaped_kernel_norm(kernel):
    """Largest singular value of the ``(kh*kw*cin, cout)`` kernel matrix.

    What `keras.layers.SpectralNormalization` normalises; reported for comparison.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    return float(np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), ord=2))


@keras.saving.register_keras_serializable(package="iterconv")
class ConvOperatorNormBound(keras.constraints.Constraint):
    """Kernel constraint ``W <- W * min(1, bound / sigma(W))`` with sigma the conv operator norm.

    Used as the ``kernel_constraint`` of a SAME, stride-1 ``Conv2D``, so Keras'
    optimizer applies it after every update (`keras.optimizers.Optimizer.apply`).
    It owns a non-trainable persistent power-iteration vector of the layer's input
    shape; the layer that uses it must track ``constraint.vector`` so the vector
    is saved with the model (`ResidualBlock` does). Soft spectral normalisation
    after Behrmann et al. (ICML 2019) and Gouk et al. (2018).

    Args:
        bound: float > 0, the largest operator norm allowed.
        input_shape: ``(H, W, Cin)``, the feature map the convolution acts on.
        iterations: int >= 1, power iterations per call. Default 1 (per step).
        name: str, name of the vector variable. Default ``"power_vector"``.

    Example:
        >>> constraint = ConvOperatorNormBound(0.9, (8, 8, 4))
        >>> conv = keras.layers.Conv2D(4, 3, padding="same", kernel_constraint=constraint)
    """

    def __init__(self, bound, input_shape, iterations=TRAIN_ITERATIONS, name="power_vector"):
        self.bound = validate_bound(bound, "bound")
        if self.bound is None:
            raise ValueError("bound must be a positive finite number, got None")
        shape = positive_shape(input_shape, "input_shape", ("H", "W", "Cin"))
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        self.input_shape = shape
        self.iterations = iterations
        self.name = str(name)
        self.vector = keras.Variable(
            initial_vector(shape), trainable=False, dtype="float32", name=self.name
        )

    def __call__(self, kernel):
        kernel = tf.convert_to_tensor(kernel)
        sigma, u = conv_operator_norm(kernel, self.vector, self.iterations)
        self.vector.assign(u)
        return rescale(kernel, sigma, self.bound)

    def enforce(self, kernel_variable, iterations=ENFORCE_ITERATIONS):
        """Project ``kernel_variable`` in place with many iterations; return sigma before."""
        sigma, u = converged_operator_norm(kernel_variable, self.vector, iterations)
        self.vector.assign(u)
        kernel_variable.assign(rescale(kernel_variable, sigma, self.bound))
        return float(sigma)

    def get_config(self):
        return {
            "bound": self.bound,
            "input_shape": list(self.input_shape),
            "iterations": self.iterations,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="iterconv")
class GainCappedBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalisation whose per-channel gain ``|gamma| / sqrt(var + eps)`` is at most ``max_gain``.

    The gain actually applied is ``clip(gamma / sqrt(var + eps), -max_gain, max_gain)``,
    with the moving variance at inference and the batch variance in training (so
    training sees the same function family as inference).
    At inference the layer is affine with Lipschitz constant ``<= max_gain`` by
    construction, whatever the moving statistics are; ``gamma`` itself is not
    modified, so coupled blocks keep identical trainable weights while their
    moving statistics differ (method.md section 3). Where the cap binds, the
    layer no longer amplifies small activations to unit variance.

    Args:
        max_gain: float > 0, the cap on the per-channel gain. Default 1.0.
        **kwargs: `keras.layers.BatchNormalization` arguments (``momentum``,
            ``synchronized``, ``name``, ...); only ``axis=-1``, no ``renorm``.

    Example:
        >>> norm = GainCappedBatchNormalization(max_gain=1.0, momentum=0.9)
    """

    def __init__(self, max_gain=1.0, **kwargs):
        super().__init__(**kwargs)
        self.max_gain = validate_bound(max_gain, "max_gain")
        if self.max_gain is None:
            raise ValueError("max_gain must be a positive finite number, got None")
        if self.renorm:
            raise ValueError(f"GainCappedBatchNormalization does not support renorm, got renorm={self.renorm!r}")
        if self.axis != -1:
            raise ValueError(f"GainCappedBatchNormalization normalises the last axis only, got axis={self.axis!r}")

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and self._fusable(inputs, mask):
            return self._fused_training_call(inputs)
        # Same statistics and updates as BatchNormalization.call (without renorm);
        # only the scale is capped before the affine map.
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = keras.ops.cast(inputs, compute_dtype)
        moving_mean = keras.ops.cast(self.moving_mean, compute_dtype)
        moving_variance = keras.ops.cast(self.moving_variance, compute_dtype)
        if training and self.trainable:
            mean, variance = self._moments(inputs, mask)
            self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        else:
            mean, variance = moving_mean, moving_variance
        # tf.nn.batch_normalization's own arithmetic (so the layer is BatchNormalization
        # bitwise where the cap does not bind) with a clip of the gain in between.
        gain = keras.ops.rsqrt(variance + self.epsilon)
        if self.scale:
            gain = gain * keras.ops.cast(self.gamma, compute_dtype)
        gain = keras.ops.clip(gain, -self.max_gain, self.max_gain)
        offset = -mean * gain
        if self.center:
            offset = keras.ops.cast(self.beta, compute_dtype) + offset
        outputs = inputs * gain + offset
        return keras.ops.cast(outputs, self.compute_dtype)

    def _fusable(self, inputs, mask):
        return (mask is None and not self.synchronized and len(inputs.shape) == 4
                and inputs.dtype == tf.float32 and self.compute_dtype == "float32")

    def _fused_training_call(self, inputs):
        gamma = self.gamma if self.scale else tf.ones_like(self.moving_mean)
        beta = self.beta if self.center else tf.zeros_like(self.moving_mean)
        outputs, mean, variance = _capped_batch_norm(inputs, gamma, beta, self.epsilon, self.max_gain)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return outputs

    def inference_gains(self):
        """Per-channel gains applied at inference, as a NumPy array."""
        variance = np.asarray(self.moving_variance, dtype=np.float64)
        scale = np.sqrt(variance + self.epsilon)
        gamma = np.asarray(self.gamma, dtype=np.float64) if self.scale else np.ones_like(variance)
        return np.minimum(np.abs(gamma) / scale, self.max_gain)

    def get_config(self):
        config = super().get_config()
        config["max_gain"] = self.max_gain
        return config


def _capped_batch_norm(x, gamma, beta, epsilon, max_gain):
    """Training-mode gain-capped batch norm on TensorFlow's fused kernels.

    Forward: one ``FusedBatchNormV3`` (scale 1) gives ``xhat`` and the batch
    statistics; ``y = xhat * clip(gamma / std, +-max_gain) * std + beta``.
    Backward: ``FusedBatchNormGradV3`` gives batch norm's gradient for the applied
    scale; in channels where the cap binds the scale is ``max_gain * std``, which
    depends on x through std, so the function there is ``max_gain * (x - mean) +
    beta`` and the term batch norm's gradient subtracts for std must be added
    back: ``dx += gain * xhat * sum(dy * xhat) / n``, and ``dgamma = 0``. This is
    the exact gradient of the capped function without a separate
    ``tf.nn.moments`` pass (tests/test_normalization.py compares it with the
    separate-ops layer).

    Returns:
        ``(y, batch_mean, biased_batch_variance)``.
    """
    empty = tf.constant([], x.dtype)

    @tf.custom_gradient
    def capped(x, gamma, beta):
        ones = tf.ones_like(gamma)
        xhat, mean, corrected, saved_mean, saved_variance, reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=ones, offset=tf.zeros_like(gamma), mean=empty, variance=empty,
            epsilon=epsilon, is_training=True, data_format="NHWC",
        )
        # The statistics from the documented outputs, not the reserve spaces (which
        # hold the inverse variance under cuDNN); the kernel's variance is
        # Bessel-corrected, batch norm normalises with the biased one.
        count = tf.cast(tf.size(x) // tf.size(gamma), x.dtype)
        variance = corrected * ((count - 1.0) / tf.maximum(count, 1.0))
        std = tf.sqrt(variance + epsilon)
        gain = tf.clip_by_value(gamma / std, -max_gain, max_gain)
        binds = tf.cast(tf.abs(gamma / std) > max_gain, x.dtype)
        scale = gain * std
        y = xhat * scale + beta

        def grad(dy, dmean, dvariance):
            # The batch statistics returned beside y feed only the moving averages,
            # which are not differentiated (as in Keras' layer).
            del dmean, dvariance
            dx, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=scale, reserve_space_1=saved_mean, reserve_space_2=saved_variance,
                reserve_space_3=reserve, epsilon=epsilon, data_format="NHWC", is_training=True,
            )
            dx = dx + xhat * (binds * gain * dscale / count)
            return dx, (1.0 - binds) * dscale, doffset

        return (y, tf.identity(mean), tf.identity(variance)), grad

    # Tensors, not variables: the custom gradient then covers gamma and beta directly.
    return capped(tf.convert_to_tensor(x), tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta))


# -- model-level helpers --------------------------------------------------------


def constrained_blocks(model):
    """``[(stage, index, block)]`` of the blocks of ``model`` that carry a bound."""
    return [
        (s, t, block)
        for s, blocks in enumerate(model.stages)
        for t, block in enumerate(blocks)
        if getattr(block, "lipschitz", None) is not None
    ]


def enforce(model, iterations=ENFORCE_ITERATIONS):
    """Project every constrained kernel of ``model`` with many power iterations.

    Training takes one iteration per step on the persistent vector, so the last
    steps can leave a kernel marginally above its bound; this runs ``iterations``
    more (continuing from the persistent vectors) and rescales. Called by
    `IterativeResNet` at construction and at the end of ``fit``; call it before
    evaluating or exporting a model you trained with your own loop.

    Args:
        model: an `IterativeResNet` (anything with ``stages`` of `ResidualBlock`).
        iterations: int >= 1, power iterations per convolution. Default
            `ENFORCE_ITERATIONS`.

    Returns:
        list of the operator-norm estimates before projection, one per convolution.
    """
    sigmas = []
    for _, _, block in constrained_blocks(model):
        for conv in block.convolutions:
            sigmas.append(conv.kernel_constraint.enforce(conv.kernel, iterations))
    return sigmas


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


def certify(model, *, inputs=None, iterations=CERTIFY_ITERATIONS, jacobian_iterations=30,
            num_random=4, seed=0):
    """Certified bound and empirical estimate of ``Lip(f)`` for every block of ``model``.

    The certified bound of a block is the product of its per-layer bounds at
    inference: each conv's operator norm (power iteration with ``iterations``
    steps from the persistent vector, which does not modify the model), each
    batch-norm layer's largest gain and the activation's Lipschitz constant
    (twice each). The empirical estimate is the largest Jacobian norm of
    ``f`` (`jacobian_norms`) over the probe points: the block's actual inputs on
    ``inputs`` if given (via ``model.forward_intermediates``), otherwise
    ``num_random`` standard-normal feature maps. Works on unconstrained models
    too (then ``bound`` is None and the numbers show how far f is from any bound).

    Power iteration converges from below, so the certified bound is accurate to
    the power iteration's tolerance, not a rigorous upper bound in floating point.

    Args:
        model: an `IterativeResNet`.
        inputs: optional batch of images ``(N, H, W, C)`` in [0, 1].
        iterations: int, power iterations per convolution. Default `CERTIFY_ITERATIONS`.
        jacobian_iterations: int, power iterations on each Jacobian. Default 30.
        num_random: int, random probe points per block when ``inputs`` is None.
        seed: int, seed of random probes and start vectors.

    Returns:
        A JSON-ready dict: ``lipschitz`` (the model's c or None), ``iterations``,
        ``max_certified``, ``max_empirical`` and ``blocks``, a list of dicts with
        ``stage``, ``block``, ``name``, ``bound``, ``conv_norms``,
        ``reshaped_kernel_norms``, ``norm_gains``, ``activation_lipschitz``,
        ``certified`` and ``empirical``.
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
        "max_empirical": max(r["empirical"] for r in reports),
        "blocks": reports,
    }


def _certify_block(block, s, t, x, iterations, jacobian_iterations, seed):
    conv_norms = []
    for conv in block.convolutions:
        constraint = conv.kernel_constraint
        if isinstance(constraint, ConvOperatorNormBound):
            start = constraint.vector
        else:
            start = initial_vector(tuple(x.shape[1:3]) + (conv.kernel.shape[2],))
        sigma, _ = converged_operator_norm(conv.kernel, start, iterations)
        conv_norms.append(float(sigma))
    gains = [_norm_gain(norm) for norm in block.normalizations]
    act = activation_lipschitz(block.activation)
    certified = float(np.prod(conv_norms) * np.prod(gains) * act ** len(conv_norms))
    empirical = jacobian_norms(lambda h: block.residual(h, training=False), x, jacobian_iterations, seed)
    return {
        "stage": s,
        "block": t,
        "name": block.name,
        "bound": block.lipschitz,
        "conv_norms": conv_norms,
        "reshaped_kernel_norms": [reshaped_kernel_norm(conv.kernel) for conv in block.convolutions],
        "norm_gains": gains,
        "activation_lipschitz": act,
        "certified": certified,
        "empirical": float(np.max(empirical)),
    }


def _norm_gain(layer):
    """Largest per-channel inference gain of a normalisation layer inside f."""
    if isinstance(layer, GainCappedBatchNormalization):
        return float(np.max(layer.inference_gains()))
    if isinstance(layer, keras.layers.BatchNormalization):
        variance = np.asarray(layer.moving_variance, dtype=np.float64)
        gamma = np.asarray(layer.gamma, dtype=np.float64) if layer.scale else np.ones_like(variance)
        return float(np.max(np.abs(gamma) / np.sqrt(variance + layer.epsilon)))
    return 1.0  # Identity (norm="none")
