"""iterconv: iterative convergent computation in residual networks (Keras 3 / TensorFlow).

The front door. Every name below is imported on first use (PEP 562), so
``import iterconv_keras`` costs milliseconds and loads no TensorFlow; the
command line relies on that for ``iterconv --help`` and ``iterconv zoo list``.

Keras finds custom classes only through its registry, so the package also
arranges for its Keras classes to be registered as soon as Keras itself is
imported (see `iterconv_keras._registration`): after ``import iterconv_keras``,
``keras.saving.load_model(path)`` loads every model iterconv writes.

Example:

    import iterconv_keras as ick

    model = ick.create_model("tiny", (32, 32, 1), 10)
    ick.list_variants()            # ['tiny', 'small', ...]
    ick.list_pretrained()          # the zoo's models (ModelNotFound if there is no zoo)
    model = ick.load_model("fashion-mnist-small")

Reference: Lippl, Peters & Kriegeskorte, "Can neural networks benefit from
objectives that encourage iterative convergent computations? A case study of
ResNets and object classification", PLoS One 19(3): e0293440 (2024).
"""

import importlib

from iterconv_keras import _env, _registration
from iterconv_keras.version import __version__

_env.configure()
_registration.register_when_keras_loads()

# Public name -> (module, attribute in that module).
_EXPORTS = {
    "create_model": ("iterconv_keras.models.variants", "create_model"),
    "list_variants": ("iterconv_keras.models.variants", "list_variants"),
    "IterativeResNet": ("iterconv_keras.models.resnet", "IterativeResNet"),
    "ResidualBlock": ("iterconv_keras.models.blocks", "ResidualBlock"),
    "list_pretrained": ("iterconv_keras.zoo", "list_pretrained"),
    "load_model": ("iterconv_keras.loading", "load_model"),
    "TrainConfig": ("iterconv_keras.config", "TrainConfig"),
    "train": ("iterconv_keras.training", "train"),
    "evaluate": ("iterconv_keras.analysis.evaluation", "evaluate"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'iterconv_keras' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
