"""Lipschitz constraint on the residual functions: soft spectral normalisation, certified.

Each convolution ``W`` inside a residual function ``f`` is rescaled after every
optimizer step:

    W <- W * min(1, c_l / sigma(W))

where ``sigma(W)`` is the operator norm of the *convolution on the block's
feature map* (SAME zero padding, stride 1, input shape ``(H, W, C)``),
*estimated* by power iteration on a persistent vector, one iteration per
training step (`operator_norm.conv_operator_norm`). Only kernels above the bound
are scaled ("soft" spectral normalisation of invertible ResNets, Behrmann et
al., ICML 2019, after Gouk et al. 2018; power iteration with a persistent
vector as in Miyato et al., ICLR 2018).

A power-iteration value is a lower bound of sigma; `enforce` (run at the end of
``fit`` and before export) rescales every kernel by the certified upper bound
`operator_norm.certified_operator_norm` (Sedghi, Gupta & Long, ICLR 2019), so
the saved model satisfies its bound with a proof rather than an estimate.

So that this final projection changes little, training steps compare the
estimate *times a certificate ratio* with the bound: the ratio is the certified
bound over a converged estimate of each kernel, measured at the start of ``fit``
and after every epoch (`refresh_certificate_ratios`). Without it, training keeps
the estimate (about the exact norm) at the bound while the certified bound sits
up to 1.3x above it on 4x4 maps, and the final projection would shrink such
kernels by that much after training.

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

from iterconv_keras.models import operator_norm
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


PROJECTION_MARGIN = 1e-6
"""`enforce` scales a kernel to ``bound * (1 - PROJECTION_MARGIN)``, so rounding the
rescaled kernel to float32 cannot lift its certified norm above the bound (the margin
doubles on each further round `project_certified` needs, as 16-bit rounding may)."""

RATIO_ITERATIONS = 100
"""Power iterations of the converged estimate a certificate ratio divides the certified bound by."""


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


def rescale(kernel, sigma, bound):
    """``kernel * min(1, bound / sigma)``: only kernels above the bound change.

    Below the bound the factor is exactly 1.0, so the kernel is returned bitwise
    unchanged; ``sigma = 0`` gives ``bound / 0 = inf`` and the factor 1.
    """
    kernel = tf.convert_to_tensor(kernel)
    return kernel * tf.minimum(tf.constant(1.0, kernel.dtype), bound / sigma)


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
        compute_dtype: the dtype the convolution computes in (its layer's
            ``compute_dtype``): ``"float32"`` (default), ``"bfloat16"`` or
            ``"float16"``. Under a mixed dtype policy the layer rounds the kernel
            to 16 bits in every call; the certificates (`enforce`, the
            certificate ratio) then bound the rounded kernel as well as the
            float32 one (`operator_norm.certified_computed_norm`). The power
            iteration runs in float32 either way.

    Example:
        >>> constraint = ConvOperatorNormBound(0.9, (8, 8, 4))
        >>> conv = keras.layers.Conv2D(4, 3, padding="same", kernel_constraint=constraint)
    """

    def __init__(self, bound, input_shape, iterations=TRAIN_ITERATIONS, name="power_vector", compute_dtype="float32"):
        self.bound = validate_bound(bound, "bound")
        if self.bound is None:
            raise ValueError("bound must be a positive finite number, got None")
        shape = positive_shape(input_shape, "input_shape", ("H", "W", "Cin"))
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        if compute_dtype not in operator_norm.COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {operator_norm.COMPUTE_DTYPES}, got {compute_dtype!r}")
        self.input_shape = shape
        self.iterations = iterations
        self.name = str(name)
        self.compute_dtype = compute_dtype
        self.vector = keras.Variable(
            operator_norm.initial_vector(shape), trainable=False, dtype="float32", name=self.name
        )
        # Certified bound / estimate of this kernel (>= 1), measured by
        # `refresh_certificate_ratio`; 1 until then. Deliberately not tracked by the
        # layer: it is derived from the kernel, so it is not saved, and a loaded
        # model re-measures it when it trains.
        self.certificate_ratio = keras.Variable(
            1.0, trainable=False, dtype="float32", name=f"{self.name}_certificate_ratio"
        )

    def __call__(self, kernel):
        kernel = tf.convert_to_tensor(kernel)
        sigma, u = operator_norm.conv_operator_norm(kernel, self.vector, self.iterations)
        self.vector.assign(u)
        return rescale(kernel, sigma * self.certificate_ratio, self.bound)

    def refresh_certificate_ratio(self, kernel_variable, iterations=RATIO_ITERATIONS):
        """Set the ratio of ``kernel_variable``'s certified bound to its converged estimate; return it.

        The estimate runs ``iterations`` power iterations from a copy of the
        persistent vector (which it leaves alone, so training's own iteration is
        not disturbed).
        """
        kernel = np.asarray(kernel_variable, dtype=np.float32)
        certified = self.certified_norm(kernel)
        estimate, _ = operator_norm.converged_operator_norm(kernel, tf.identity(self.vector), iterations)
        estimate = float(estimate)
        ratio = max(1.0, certified / estimate) if estimate > 0 else 1.0
        self.certificate_ratio.assign(ratio)
        return ratio

    def certified_norm(self, kernel):
        """The certified norm of ``kernel`` as stored and as computed in ``compute_dtype`` (the larger)."""
        return operator_norm.certified_computed_norm(kernel, self.input_shape, self.compute_dtype)

    def enforce(self, kernel_variable):
        """Rescale ``kernel_variable`` in place so its certified norm is <= the bound.

        Returns:
            float, the `certified_norm` of the kernel before projection.
        """
        kernel = np.asarray(kernel_variable, dtype=np.float32)
        sigma = self.certified_norm(kernel)
        if sigma > self.bound:
            kernel_variable.assign(project_certified(kernel, self.input_shape, self.bound, self.compute_dtype))
        return sigma

    def project_estimated(self, kernel_variable, iterations=INIT_ITERATIONS):
        """Rescale ``kernel_variable`` in place by a power-iteration estimate from the persistent vector.

        The estimate is a lower bound, so this is not certified (`enforce` is);
        it warms the vector for training. Returns the estimate before projection.
        """
        sigma, u = operator_norm.converged_operator_norm(kernel_variable, self.vector, iterations)
        self.vector.assign(u)
        kernel_variable.assign(rescale(kernel_variable, sigma, self.bound))
        return float(sigma)

    def get_config(self):
        return {
            "bound": self.bound,
            "input_shape": list(self.input_shape),
            "iterations": self.iterations,
            "name": self.name,
            "compute_dtype": self.compute_dtype,
        }


# -- the certified projection --------------------------------------------------------


def project_certified(kernel, map_shape, bound, compute_dtype="float32"):
    """``kernel`` (float32) scaled so its certified norm is <= ``bound``; unchanged if already.

    The norm is `operator_norm.certified_computed_norm`: for a 16-bit
    ``compute_dtype`` the scaled kernel is rounded to values that dtype represents
    exactly, so the kernel the layer computes with is the one certified, in
    either precision.
    """
    kernel = np.asarray(kernel, dtype=np.float32)
    sigma = operator_norm.certified_computed_norm(kernel, map_shape, compute_dtype)
    margin = PROJECTION_MARGIN
    while sigma > bound:
        # The bound is homogeneous in the kernel, so one rescale lands on target up
        # to rounding (float32, or the 16-bit compute dtype), which the margin
        # absorbs; the loop is the proof, and a wider margin each round ends it.
        scaled = (kernel.astype(np.float64) * (bound * (1.0 - margin) / sigma)).astype(np.float32)
        kernel = operator_norm.as_computed(scaled, compute_dtype)
        sigma = operator_norm.certified_computed_norm(kernel, map_shape, compute_dtype)
        margin *= 2.0
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


def refresh_certificate_ratios(model):
    """Re-measure every constrained kernel's certificate ratio; return them (one per convolution).

    Called by `IterativeResNet.fit` before training and after every epoch, so
    training steps keep the certified bound, not only the estimate, near the
    per-convolution bound. Identical kernels (coupling lambda = 1) with
    identical power vectors get identical ratios, so the blocks stay identical.
    """
    ratios = []
    for _, _, block in constrained_blocks(model):
        for conv in block.convolutions:
            ratios.append(conv.kernel_constraint.refresh_certificate_ratio(conv.kernel))
    return ratios


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
