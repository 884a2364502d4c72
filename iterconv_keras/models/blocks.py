"""The residual block: ``x <- x + f(x)`` with no activation after the addition.

Because nothing follows the addition, applying a block twice is exactly two
iterations of the map ``x -> x + f(x)``; this is what lets a schedule repeat,
drop or extend blocks (docs/method.md, "Architecture").

Two residual forms share that shape (an injected choice, not two classes):

- ``"plain"``: ``f = g``, the branch ``norm -> act -> conv -> norm -> act -> conv``.
- ``"contractive"``: ``f = alpha * (g - id)``, i.e. ``x <- (1 - alpha) x + alpha g(x)``,
  with the Lipschitz constraint ``Lip(g) <= c < 1`` and ``0 < alpha <= 1``. The block
  map then has Lipschitz constant at most ``L = 1 - alpha (1 - c) < 1``: a
  contraction, so iterating it converges to its unique fixed point from every
  input (Banach fixed-point theorem) and each iteration shrinks the update by
  at least L; a relaxed (Krasnosel'skii-Mann) fixed-point iteration of g. This
  goes beyond Lippl, Peters & Kriegeskorte (PLoS One 2024), whose constraint
  bounds ``x + f(x)`` only by ``1 + c`` (``docs/lipschitz.md``).
"""

import keras

from iterconv_keras.models import lipschitz as lipschitz_lib
from iterconv_keras.models.normalization import FusedBatchNormalization, GainCappedBatchNormalization

NORMS = ("batch", "sync_batch", "none")
ACTIVATIONS = ("relu", "gelu", "tanh", "silu")
RESIDUAL_FORMS = ("plain", "contractive")
DEFAULT_ALPHA = 0.5
"""Step size of the contractive form when none is given: L = 1 - (1 - c) / 2."""


def validate_residual_form(residual_form, alpha, lipschitz):
    """Check a residual form and resolve its step size; return ``(residual_form, alpha)``.

    Args:
        residual_form: one of `RESIDUAL_FORMS`.
        alpha: None or a float in (0, 1]; only the contractive form takes one
            (None there means `DEFAULT_ALPHA`); the plain form refuses any.
        lipschitz: the block's bound c (validated float or None); the contractive
            form needs ``c < 1``.

    Raises:
        ValueError: echoing the offending value.
    """
    if residual_form not in RESIDUAL_FORMS:
        raise ValueError(f"residual_form must be one of {RESIDUAL_FORMS}, got {residual_form!r}")
    if residual_form == "plain":
        if alpha is not None:
            raise ValueError(f"alpha applies to residual_form='contractive' only, got alpha={alpha!r} "
                             "with residual_form='plain'")
        return residual_form, None
    if lipschitz is None or lipschitz >= 1.0:
        raise ValueError(f"residual_form='contractive' needs the Lipschitz constraint with lipschitz=c < 1 "
                         f"(the bound on g), got lipschitz={lipschitz!r}")
    alpha = DEFAULT_ALPHA if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
    return residual_form, float(alpha)


def contraction_bound(alpha, lipschitz_g):
    """``1 - alpha (1 - Lip(g))``: the Lipschitz constant of ``x -> (1 - alpha) x + alpha g(x)``.

    ``||(1 - a)(x - y) + a (g(x) - g(y))|| <= ((1 - a) + a Lip(g)) ||x - y||``.
    """
    return 1.0 - alpha * (1.0 - lipschitz_g)


def make_norm(norm, momentum, name, max_gain=None, dtype=None):
    """The normalisation layer named by ``norm`` (one of `NORMS`).

    ``max_gain`` (float or None) caps the per-channel gain of batch normalisation
    (`normalization.GainCappedBatchNormalization`), as a Lipschitz-constrained
    residual function needs. ``dtype`` is the layer's dtype policy (None: Keras'
    global one); batch normalisation computes its statistics in float32 under a
    mixed policy either way.
    """
    if norm == "none":
        return keras.layers.Identity(name=name, dtype=dtype)
    if max_gain is not None:
        return GainCappedBatchNormalization(
            max_gain=max_gain, momentum=momentum, synchronized=norm == "sync_batch", name=name, dtype=dtype
        )
    if norm == "batch":
        # TensorFlow's fused kernel: the same function as Keras' layer, faster
        # (one op instead of ~10 each way; see iterconv_keras/models/normalization.py).
        return FusedBatchNormalization(momentum=momentum, name=name, dtype=dtype)
    return keras.layers.BatchNormalization(momentum=momentum, synchronized=True, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="iterconv")
class ResidualBlock(keras.layers.Layer):
    """Pre-activation residual block ``x + f(x)`` that keeps the input's shape.

    ``f`` is ``norm -> act -> conv -> norm -> act -> conv`` (He et al. 2016,
    "Identity mappings in deep residual networks"). The block is its own layer
    so a model can address it by (stage, index) and run it any number of times
    (Lippl, Peters & Kriegeskorte, PLoS One 2024, e0293440).

    Args:
        filters: int, channels of the input, the output and both convolutions.
        kernel_size: int, odd spatial size of both kernels. Default 3.
        norm: ``"batch"`` (BatchNormalization), ``"sync_batch"`` (batch statistics
            synchronised across `tf.distribute` replicas, so a multi-device step
            equals the one-device step) or ``"none"``. Default ``"batch"``.
        norm_momentum: float in (0, 1), moving-average momentum of batch
            normalisation. Default 0.9, so short CPU runs get usable statistics.
        activation: one of ``"relu"``, ``"gelu"``, ``"tanh"``, ``"silu"``.
            Default ``"relu"``.
        kernel_initializer: initializer of both kernels. Default ``"he_normal"``.
        lipschitz: None (unconstrained, default) or float c > 0: constrain the
            branch ``g`` (``f`` itself for the plain form) at inference to
            ``Lip(g) <= c`` (docs/lipschitz.md). Each conv
            kernel gets a `lipschitz.ConvOperatorNormBound` of
            ``sqrt(c) / L_act`` (applied after every optimizer step) and batch
            normalisation becomes `normalization.GainCappedBatchNormalization` with
            gain <= 1. Needs a static input height and width (the conv operator
            norm is taken on the block's feature map). See ``docs/lipschitz.md``
            (Behrmann et al. 2019; Gouk et al. 2018).
        residual_form: ``"plain"`` (``f = g``, default) or ``"contractive"``
            (``f = alpha (g - id)``, needs ``lipschitz`` < 1; the block map is then a
            contraction with constant ``1 - alpha (1 - c)``; docs/lipschitz.md,
            "A block that converges by construction").
        alpha: None or float in (0, 1], the step of the contractive form
            (None: `DEFAULT_ALPHA`); the plain form takes none. Default None.
        **kwargs: standard layer arguments (``name``, ``dtype``). The dtype policy
            is passed on to the block's own layers, so ``dtype="mixed_bfloat16"``
            computes the branch in bfloat16 with float32 variables (batch
            normalisation statistics stay float32; docs/scaling.md, "Precision").

    Example:
        >>> block = ResidualBlock(16)
        >>> y = block(keras.ops.zeros((2, 8, 8, 16)))
        >>> constrained = ResidualBlock(16, lipschitz=0.9)
        >>> contractive = ResidualBlock(16, lipschitz=0.5, residual_form="contractive", alpha=0.5)
    """

    def __init__(
        self,
        filters,
        kernel_size=3,
        norm="batch",
        norm_momentum=0.9,
        activation="relu",
        kernel_initializer="he_normal",
        lipschitz=None,
        residual_form="plain",
        alpha=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.lipschitz = lipschitz_lib.validate_bound(lipschitz)
        self.residual_form, self.alpha = validate_residual_form(residual_form, alpha, self.lipschitz)
        if not isinstance(filters, int) or filters < 1:
            raise ValueError(f"filters must be a positive int, got {filters!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0.0 < float(norm_momentum) < 1.0:
            raise ValueError(f"norm_momentum must be in (0, 1), got {norm_momentum!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.filters = filters
        self.kernel_size = kernel_size
        self.norm = norm
        self.norm_momentum = float(norm_momentum)
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        self.norm1 = self._make_norm("norm1")
        self.conv1 = self._make_conv("conv1")
        self.norm2 = self._make_norm("norm2")
        self.conv2 = self._make_conv("conv2")
        self.act = keras.layers.Activation(activation, name="act", dtype=self.dtype_policy)
        self.feature_shape = None

    def _make_norm(self, name):
        # Capped at gain 1 when constrained: the convs then take the whole budget.
        max_gain = None if self.lipschitz is None else 1.0
        return make_norm(self.norm, self.norm_momentum, name, max_gain=max_gain, dtype=self.dtype_policy)

    def _make_conv(self, name):
        return keras.layers.Conv2D(
            self.filters,
            self.kernel_size,
            padding="same",
            use_bias=self.norm == "none",
            kernel_initializer=self.kernel_initializer,
            name=name,
            dtype=self.dtype_policy,
        )

    def build(self, input_shape):
        if input_shape[-1] != self.filters:
            raise ValueError(
                f"{self.name}: a residual block keeps the shape, so its input needs "
                f"{self.filters} channels, got input shape {tuple(input_shape)}"
            )
        self.feature_shape = tuple(input_shape[1:])
        if self.lipschitz is not None:
            self._attach_constraints()
        self.norm1.build(input_shape)
        self.conv1.build(input_shape)
        self.norm2.build(input_shape)
        self.conv2.build(input_shape)

    def _attach_constraints(self):
        # Set before the convs build, so their kernels carry the constraint and
        # Keras' optimizer applies it after each update. The block tracks the
        # power-iteration vectors, so they are saved, loaded and copied by
        # coupling.tie_blocks with the other weights.
        if any(d is None for d in self.feature_shape):
            raise ValueError(
                f"{self.name}: lipschitz={self.lipschitz!r} needs a static input height, "
                f"width and channels (the conv operator norm depends on them), got "
                f"input shape {(None, *self.feature_shape)}"
            )
        bound = lipschitz_lib.per_conv_bound(self.lipschitz, self.activation)
        vectors = []
        for conv in self.convolutions:
            conv.kernel_constraint = lipschitz_lib.ConvOperatorNormBound(
                bound, self.feature_shape, name=f"{conv.name}_power_vector", compute_dtype=conv.compute_dtype
            )
            vectors.append(conv.kernel_constraint.vector)
        self.power_vectors = vectors

    @property
    def normalizations(self):
        """The normalisation layers of ``f``, in order."""
        return (self.norm1, self.norm2)

    @property
    def convolutions(self):
        """The convolutions of ``f``, in order (what a Lipschitz constraint acts on)."""
        return (self.conv1, self.conv2)

    @property
    def contraction_bound(self):
        """The guaranteed Lipschitz constant ``1 - alpha (1 - c)`` of the contractive block map, else None."""
        if self.residual_form != "contractive":
            return None
        return contraction_bound(self.alpha, self.lipschitz)

    def branch(self, x, training=None):
        """``g(x)``: the constrained branch ``norm -> act -> conv -> norm -> act -> conv``."""
        h = self.conv1(self.act(self.norm1(x, training=training)))
        return self.conv2(self.act(self.norm2(h, training=training)))

    def residual(self, x, training=None):
        """``f(x)``: the update the block adds to its input (``g(x)``, or ``alpha (g(x) - x)``)."""
        g = self.branch(x, training=training)
        if self.residual_form == "contractive":
            return self.alpha * (g - x)
        return g

    def call(self, x, training=None):
        return x + self.residual(x, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "norm": self.norm,
                "norm_momentum": self.norm_momentum,
                "activation": self.activation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "lipschitz": self.lipschitz,
                "residual_form": self.residual_form,
                "alpha": self.alpha,
            }
        )
        return config
