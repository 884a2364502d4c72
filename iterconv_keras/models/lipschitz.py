"""Lipschitz constraint on the residual functions: soft spectral normalisation, certified.

Each convolution ``W`` inside a residual function ``f`` is rescaled after every
optimizer step:

    W <- W * min(1, c_l / sigma(W))

where ``sigma(W)`` is the operator norm of the *convolution on the block's
feature map* (SAME zero padding, stride 1, input shape ``(H, W, C)``),
*estimated* by power iteration with a convolution and its adjoint (the
transposed convolution) on a persistent vector, one iteration per training
step. Only kernels above the bound are scaled ("soft" spectral normalisation of
invertible ResNets, Behrmann et al., ICML 2019, after Gouk et al. 2018; power
iteration with a persistent vector as in Miyato et al., ICLR 2018). The norm of
the reshaped ``(kh*kw*cin, cout)`` kernel matrix, which
`keras.layers.SpectralNormalization` uses, is a different quantity and can
understate the operator norm.

A power-iteration value is a lower bound of sigma. `certified_operator_norm` is
an upper bound that provably holds: the zero-padded convolution on an H x W map
is a restriction of the circular convolution on a torus of (H + p) x (W + p),
p = (k - 1) / 2, whose singular values are those of the kernel's 2-D DFT at
each frequency (Sedghi, Gupta & Long, "The singular values of convolutional
layers", ICLR 2019). `enforce` (run at the end of ``fit`` and before export)
rescales every kernel by this certified value, so the saved model satisfies its
bound with a proof rather than an estimate.

Per-layer share of the target ``c`` (see ``docs/lipschitz.md``): batch
normalisation inside ``f`` has its per-channel gain capped at 1
(`normalization.GainCappedBatchNormalization`), the activation has a known
Lipschitz constant ``L`` (1 for ReLU and tanh), and each of the two
convolutions is bounded by ``sqrt(c) / L``, so
``Lip(f) <= 1 * L * sqrt(c)/L * 1 * L * sqrt(c)/L = c`` for ``f`` as evaluated
at inference.

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
"""Power iterations of `initial_projection` at model construction: a feasible start for
training (which works with estimates) and warm persistent vectors."""

ESTIMATE_ITERATIONS = 1000
"""Default power iterations of `converged_operator_norm` (an estimate, for reports).

Conv operators have many singular values close to the top one, so power
iteration converges slowly (roughly as 1/k in the worst case)."""

# The certified norm is computed in float64 from the float32 kernel; FFT and SVD
# rounding (about 1e-15 relative to these quantities) is covered many times over.
CERTIFIED_RELATIVE_MARGIN = 1e-9
CERTIFIED_ABSOLUTE_MARGIN = 1e-9
"""Margins of `certified_operator_norm`: ``sigma * (1 + rel) + abs * sum|K|``."""

PROJECTION_MARGIN = 1e-6
"""`enforce` scales a kernel to ``bound * (1 - PROJECTION_MARGIN)``, so rounding the
rescaled kernel to float32 cannot lift its certified norm above the bound."""

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
    # conv2d_transpose with a tensor output_shape loses the static shape, which
    # tf.while_loop needs to stay fixed (a 1x1 map otherwise fails to trace).
    w = tf.ensure_shape(_conv_adjoint(_conv(u, kernel), kernel, shape), u.shape)
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


def converged_operator_norm(kernel, vector, iterations=ESTIMATE_ITERATIONS):
    """`conv_operator_norm` with many iterations, run as one graph: an estimate from below."""
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
    after Behrmann et al. (ICML 2019) and Gouk et al. (2018). Per step sigma is a
    power-iteration estimate; `enforce` projects with the certified bound.

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

    def enforce(self, kernel_variable):
        """Rescale ``kernel_variable`` in place so its certified norm is <= the bound.

        Returns:
            float, the `certified_operator_norm` of the kernel before projection.
        """
        kernel = np.asarray(kernel_variable, dtype=np.float32)
        sigma = certified_operator_norm(kernel, self.input_shape)
        if sigma > self.bound:
            kernel_variable.assign(project_certified(kernel, self.input_shape, self.bound))
        return sigma

    def project_estimated(self, kernel_variable, iterations=INIT_ITERATIONS):
        """Rescale ``kernel_variable`` in place by a power-iteration estimate from the persistent vector.

        The estimate is a lower bound, so this is not certified (`enforce` is);
        it warms the vector for training. Returns the estimate before projection.
        """
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


# -- a certified upper bound ---------------------------------------------------------


def circular_size(map_shape, kernel_shape):
    """Torus size ``(N1, N2)`` on which the zero-padded convolution is a restriction.

    For an odd ``k x k`` kernel with reach ``p = (k - 1) / 2`` on an ``H x W`` map,
    output pixel ``i`` reads input rows ``i - p .. i + p``. On a torus of
    ``N >= H + p`` rows the rows ``-p .. -1`` wrap to ``N - p .. N - 1 >= H`` and
    rows ``H .. H + p - 1`` stay below ``N``: all of them are rows the zero
    extension of an ``H``-row map leaves at 0, so the circular convolution reads
    exactly what zero padding reads. Taps with ``|offset| >= H`` never meet the
    map (they only read padding) and are cropped first, which keeps ``N`` at
    least the kernel size. Stride 1 only.

    Args:
        map_shape: ``(H, W, ...)`` of the feature map.
        kernel_shape: ``(kh, kw, ...)`` with odd ``kh`` and ``kw``.

    Returns:
        ``((N1, N2), (p1, p2))``: the torus size and the reach of the cropped kernel.
    """
    height, width = int(map_shape[0]), int(map_shape[1])
    kh, kw = int(kernel_shape[0]), int(kernel_shape[1])
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"the certified bound needs an odd kernel (SAME padding centres it), got {kh}x{kw}")
    p1, p2 = min(kh // 2, height - 1), min(kw // 2, width - 1)
    return (height + p1, width + p2), (p1, p2)


def certified_operator_norm(kernel, map_shape):
    """A certified upper bound of the operator norm of a SAME, stride-1 zero-padded convolution.

    With ``E`` the zero extension of an ``H x W`` map onto a torus of
    `circular_size` and ``R`` the restriction back, the zero-padded convolution
    is ``R C E`` with ``C`` the circular convolution on the torus (see
    `circular_size`). ``E`` and ``R`` have norm 1, so ``||R C E|| <= ||C||``; and
    ``C`` is block-diagonalised by the 2-D DFT, its singular values being those
    of the ``cin x cout`` matrices ``K_hat(w)`` of the kernel's DFT at every
    frequency ``w`` of the torus (Sedghi, Gupta & Long, ICLR 2019). So
    ``max_w sigma_max(K_hat(w))`` bounds the zero-padded operator from above.
    Computed in float64 with a rounding margin (`CERTIFIED_RELATIVE_MARGIN`,
    `CERTIFIED_ABSOLUTE_MARGIN`). Exact for a single-tap kernel; for the all-ones
    3x3 kernel it is 9, the limit of the zero-padded norm on large maps.

    Args:
        kernel: ``(kh, kw, cin, cout)`` array (Keras / TF layout), odd ``kh``, ``kw``.
        map_shape: ``(H, W)`` or ``(H, W, cin)`` of the map the convolution acts on.

    Returns:
        float, an upper bound of the largest singular value.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be (kh, kw, cin, cout), got shape {kernel.shape}")
    (n1, n2), (p1, p2) = circular_size(map_shape, kernel.shape)
    c1, c2 = kernel.shape[0] // 2, kernel.shape[1] // 2
    cropped = kernel[c1 - p1 : c1 + p1 + 1, c2 - p2 : c2 + p2 + 1]
    # A real kernel's spectrum is conjugate-symmetric (same singular values), so
    # the half spectrum of rfft2 holds every distinct value.
    spectrum = np.fft.rfft2(cropped, s=(n1, n2), axes=(0, 1))
    top = float(np.linalg.svd(spectrum, compute_uv=False).max())
    return top * (1.0 + CERTIFIED_RELATIVE_MARGIN) + CERTIFIED_ABSOLUTE_MARGIN * float(np.abs(cropped).sum())


def project_certified(kernel, map_shape, bound):
    """``kernel`` (float32) scaled so its `certified_operator_norm` is <= ``bound``; unchanged if already."""
    kernel = np.asarray(kernel, dtype=np.float32)
    sigma = certified_operator_norm(kernel, map_shape)
    target = bound * (1.0 - PROJECTION_MARGIN)
    while sigma > bound:
        # The bound is homogeneous in the kernel, so one rescale lands on target up
        # to float32 rounding, which the margin absorbs; the loop is the proof.
        kernel = (kernel.astype(np.float64) * (target / sigma)).astype(np.float32)
        sigma = certified_operator_norm(kernel, map_shape)
    return kernel


# -- model-level helpers --------------------------------------------------------


def constrained_blocks(model):
    """``[(stage, index, block)]`` of the blocks of ``model`` that carry a bound."""
    return [
        (s, t, block)
        for s, blocks in enumerate(model.stages)
        for t, block in enumerate(blocks)
        if getattr(block, "lipschitz", None) is not None
    ]


def enforce(model):
    """Project every constrained kernel of ``model`` so its *certified* norm is within its bound.

    Training estimates sigma with one power iteration per step, from below, so
    kernels can sit above their bound between projections. This rescales each
    kernel whose `certified_operator_norm` exceeds the bound to
    ``bound * (1 - PROJECTION_MARGIN)``; kernels within it are left bitwise
    unchanged, and the persistent power-iteration vectors are not touched (a
    scalar rescaling leaves the top singular vector alone). Called by
    `IterativeResNet` at the end of ``fit`` and before export; call it before
    evaluating a model you trained with your own loop.

    Args:
        model: an `IterativeResNet` (anything with ``stages`` of `ResidualBlock`).

    Returns:
        list of the certified operator norms before projection, one per convolution.
    """
    norms = []
    for _, _, block in constrained_blocks(model):
        for conv in block.convolutions:
            norms.append(conv.kernel_constraint.enforce(conv.kernel))
    return norms


def initial_projection(model, iterations=INIT_ITERATIONS):
    """The projection of a new model: ``iterations`` power iterations per conv, rescale by the estimate.

    Fresh He-normal kernels are far above the bound, and one power iteration per
    training step would take many steps to catch up from a cold vector; this
    starts training inside the constraint set as training measures it, with
    warm vectors. Called by `IterativeResNet` at construction (not when a saved
    model is loaded: its kernels and vectors are saved). Not certified: `enforce`
    is, and runs at the end of ``fit``.

    Args:
        model: an `IterativeResNet`.
        iterations: int >= 1. Default `INIT_ITERATIONS`.

    Returns:
        list of the estimates before projection, one per convolution.
    """
    return [
        conv.kernel_constraint.project_estimated(conv.kernel, iterations)
        for _, _, block in constrained_blocks(model)
        for conv in block.convolutions
    ]
