"""The operator norm of a convolution on a feature map: an estimate from below, a certificate from above.

The norm that matters for a Lipschitz bound is that of the linear map
``x -> conv(x, W)`` on the block's feature map (SAME zero padding, stride 1,
input ``(H, W, cin)``), not that of the reshaped ``(kh*kw*cin, cout)`` kernel
matrix (`reshaped_kernel_norm`, what `keras.layers.SpectralNormalization`
normalises), which can understate it.

- `conv_operator_norm` / `converged_operator_norm`: power iteration with the
  convolution and its adjoint (the transposed convolution), on a persistent
  vector (Miyato et al., ICLR 2018; Gouk et al. 2018). Each value is a *lower*
  bound of the norm: an estimate.
- `certified_operator_norm`: an *upper* bound that provably holds. The
  zero-padded convolution on an H x W map is a restriction of the circular
  convolution on an (H + p) x (W + p) torus (`circular_size`), whose singular
  values are those of the kernel's 2-D DFT at each frequency (Sedghi, Gupta &
  Long, "The singular values of convolutional layers", ICLR 2019).

`iterconv_keras.models.lipschitz` builds the constraint on both (``docs/lipschitz.md``).
"""

import numpy as np
import tensorflow as tf

ESTIMATE_ITERATIONS = 1000
"""Default power iterations of `converged_operator_norm` (an estimate, for reports).

Conv operators have many singular values close to the top one, so power
iteration converges slowly (roughly as 1/k in the worst case)."""

# The certified norm is computed in float64 from the float32 kernel; FFT and SVD
# rounding (about 1e-15 relative to these quantities) is covered many times over.
CERTIFIED_RELATIVE_MARGIN = 1e-9
CERTIFIED_ABSOLUTE_MARGIN = 1e-9
"""Margins of `certified_operator_norm`: ``sigma * (1 + rel) + abs * sum|K|``."""

_VECTOR_SEED = 20190101


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


def initial_vector(input_shape):
    """Deterministic unit vector of shape ``(1, H, W, C)``.

    Deterministic (a fixed seed, not the global random state) so that every block
    of a stage starts with the same vector and, at coupling strength 1, the
    constraint keeps the blocks bitwise identical.
    """
    rng = np.random.default_rng(_VECTOR_SEED)
    u = rng.standard_normal((1, *input_shape)).astype(np.float32)
    return u / np.linalg.norm(u)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""Dtypes a convolution may compute in (a Keras dtype policy's compute dtype)."""


def as_computed(kernel, compute_dtype="float32"):
    """The float32 ``kernel`` as a layer computing in ``compute_dtype`` multiplies with it (float32 array).

    A layer under a mixed dtype policy casts its float32 kernel to 16 bits in every
    call, so the convolution it applies is that of the rounded kernel, whose norm can
    be a fraction of a percent above the float32 one. Certificates are taken of
    this kernel. For ``"float32"`` the kernel is returned as it is.

    Args:
        kernel: the float32 kernel (array or variable).
        compute_dtype: one of `COMPUTE_DTYPES`.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    kernel = np.asarray(kernel, dtype=np.float32)
    if compute_dtype == "float32":
        return kernel
    return tf.cast(tf.cast(kernel, compute_dtype), tf.float32).numpy()


def reshaped_kernel_norm(kernel):
    """Largest singular value of the ``(kh*kw*cin, cout)`` kernel matrix.

    What `keras.layers.SpectralNormalization` normalises; reported for comparison.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    return float(np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), ord=2))


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


def certified_computed_norm(kernel, map_shape, compute_dtype="float32"):
    """`certified_operator_norm` of ``kernel`` as stored (float32) and as computed in ``compute_dtype``: the larger.

    Under a mixed dtype policy the convolution applies the kernel rounded to 16
    bits (`as_computed`); the larger of the two certificates bounds the layer in
    either precision, so a model certified in one stays certified when it is
    loaded and run in the other. For ``"float32"`` it is `certified_operator_norm`.

    Args:
        kernel: ``(kh, kw, cin, cout)`` float32 kernel (array or variable).
        map_shape: ``(H, W)`` or ``(H, W, cin)`` of the map the convolution acts on.
        compute_dtype: one of `COMPUTE_DTYPES`.
    """
    kernel = np.asarray(kernel, dtype=np.float32)
    stored = certified_operator_norm(kernel, map_shape)
    if compute_dtype == "float32":
        return stored
    return max(stored, certified_operator_norm(as_computed(kernel, compute_dtype), map_shape))
