"""Named architectures: one generic model, variants as rows of keyword arguments.

Input shape and number of classes come from the dataset; a variant fixes the
rest. ``tiny`` is for tests, ``small`` trains in minutes on a 2-core CPU at
32x32, the ``paper_*`` rows are GPU-scale networks for MNIST-like (28x28x1)
and CIFAR-like (32x32x3) inputs. Their depths and widths are this project's
choice (the paper's exact architectures were not available to us; see
``docs/method.md``).

``small_contractive`` is ``small`` with the contractive residual form of
docs/lipschitz.md, "A block that converges by construction" (beyond the paper): ``alpha = 0.5``, ``c = 0.5``, so every
block map has Lipschitz constant ``L = 1 - 0.5 * (1 - 0.5) = 0.75`` and 16 extra
iterations shrink the update to at most ``0.75^16 = 1.0%`` (CI >= 0.99). A
larger c (0.9: L = 0.95, 0.95^16 = 44%) would guarantee little within the
evaluated iterations; a smaller one (0.25 with each conv at 0.5) leaves g
little room to compute. ``alpha = 0.5`` is the usual Krasnosel'skii-Mann
average, halfway between staying and jumping to g(x).

The module imports nothing: ``iterconv train --variant`` takes its choices from
`list_variants` at start-up, and ``--help`` must not load TensorFlow
(tests/test_layering.py keeps it so).
"""

_REGISTRY = {}


def register_variant(name, description, **kwargs):
    """Add a named row of `IterativeResNet` keyword arguments.

    Raises:
        ValueError: if ``name`` is already registered.
    """
    if name in _REGISTRY:
        raise ValueError(f"variant {name!r} is already registered")
    _REGISTRY[name] = {"description": description, "kwargs": dict(kwargs)}


def list_variants():
    """Names of all registered variants, in registration order.

    Example:
        >>> import iterconv_keras as ick
        >>> ick.list_variants()[:2]
        ['tiny', 'small']
    """
    return list(_REGISTRY)


def variant_kwargs(name):
    """The architecture keyword arguments of variant ``name`` (a copy)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(_REGISTRY)}")
    return dict(_REGISTRY[name]["kwargs"])


def create_model(variant, image_shape, num_classes, **overrides):
    """Build an `IterativeResNet` from a named variant.

    Args:
        variant: name of a registered variant.
        image_shape: ``(H, W, C)`` of the inputs.
        num_classes: number of outputs.
        **overrides: any `IterativeResNet` argument (``coupling``,
            ``multi_label``, ``input_mean``, ...) added to or replacing the row.

    Example:
        >>> import iterconv_keras as ick
        >>> model = ick.create_model("small", (32, 32, 1), 10, coupling=0.9, multi_label=True)
    """
    from iterconv_keras.models.resnet import IterativeResNet

    kwargs = variant_kwargs(variant)
    kwargs.update(overrides)
    return IterativeResNet(image_shape, num_classes, **kwargs)


register_variant(
    "tiny", "2 stages x 2 blocks, 4/8 channels: unit tests",
    stage_widths=(4, 8), blocks_per_stage=2, stem_stride=1,
)
register_variant(
    "small", "3 stages x 4 blocks, 16/32/64 channels, stride-2 stem: minutes on a 2-core CPU",
    stage_widths=(16, 32, 64), blocks_per_stage=4, stem_stride=2,
)
register_variant(
    "paper_mnist", "3 stages x 8 blocks, 32/64/128 channels: 28x28x1 inputs, GPU scale",
    stage_widths=(32, 64, 128), blocks_per_stage=8, stem_stride=1,
)
register_variant(
    "paper_cifar", "3 stages x 8 blocks, 64/128/256 channels: 32x32x3 inputs, GPU scale",
    stage_widths=(64, 128, 256), blocks_per_stage=8, stem_stride=1,
)
register_variant(
    "small_contractive",
    "small with contractive blocks x <- x/2 + g(x)/2, Lip(g) <= 0.5: every block map a contraction, L = 0.75",
    stage_widths=(16, 32, 64), blocks_per_stage=4, stem_stride=2,
    residual_form="contractive", alpha=0.5, lipschitz=0.5,
)
