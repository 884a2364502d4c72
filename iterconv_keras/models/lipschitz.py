"""Lipschitz constraint on the residual functions: soft spectral normalisation.

Each convolution ``W`` inside a residual function ``f`` is rescaled after every
optimizer step:

    W <- W * min(1, c_l / sigma(W))

where ``sigma(W)`` is the operator norm of the *convolution on the block's
feature map* (SAME padding, stride 1, input shape ``(H, W, C)``), estimated by
power iteration with a convolution and its adjoint (the transposed
convolution) on a persistent vector. One iteration per training step, many at
construction, at the end of ``fit`` and in `enforce`. Only kernels
above the bound are scaled ("soft" spectral normalisation of invertible ResNets,
Behrmann et al., ICML 2019, after Gouk et al. 2018; power iteration with a
persistent vector as in Miyato et al., ICLR 2018). The norm of the reshaped
``(kh*kw*cin, cout)`` kernel matrix, which `keras.layers.SpectralNormalization`
uses, is a different quantity and can understate the operator norm.

Per-layer share of the target ``c`` (see ``docs/lipschitz.md``): batch
normalisation inside ``f`` has its per-channel gain capped at 1
(`normalization.GainCappedBatchNormalization`), the activation has a known Lipschitz constant
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

from iterconv_keras.models._checks import positive_number, positive_shape

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

_VECTOR_SEED = 20190101


def validate_bound(value, name="lipschitz"):
    """Return ``value`` as a positive finite float, or None when it is None.

    Raises:
        ValueError: if ``value`` is not a number, is NaN or infinite, or is <= 0.
            The message echoes the value.
    """
    return None if value is None else positive_number(value, name)


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
