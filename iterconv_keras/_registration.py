"""Register iterconv's Keras classes as soon as Keras is imported.

Keras resolves a saved custom class (``"iterconv>IterativeResNet"``) only
through its registry, which our class decorators fill when their modules are
imported; it imports the module named in a config only for Keras' own
packages. Importing those modules eagerly in ``iterconv_keras/__init__`` would
load TensorFlow on ``import iterconv_keras`` (and on every ``iterconv``
command). Instead:

- if Keras is already imported, the classes are registered at once;
- otherwise a one-shot import hook waits for ``import keras`` to finish and
  registers them then (a post-import hook in the manner of PEP 369).

When an iterconv module is what imported Keras (``from iterconv_keras.models
import blocks`` in a fresh process), registering at that moment would import
`resnet`, which needs the half-initialised ``blocks``. Registration then waits
until no iterconv module is initialising: the hook also watches the imports of
``iterconv_keras.*`` modules and registers when the outermost one completes.

Either way, ``import iterconv_keras, keras; keras.saving.load_model(path)``
works with Keras' default ``compile=True`` (the Digitclutter metric is
registered too).
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

# Every module that defines a registered Keras class.
REGISTERING_MODULES = (
    "iterconv_keras.models.resnet",
    "iterconv_keras.models.metrics",
)
_PACKAGE = "iterconv_keras"


def register_now():
    """Import every module that registers a Keras class (imports TensorFlow)."""
    for name in REGISTERING_MODULES:
        importlib.import_module(name)


def register_when_keras_loads():
    """Register now if Keras is loaded, else once ``import keras`` completes."""
    if sys.modules.get("keras") is not None:
        register_now()
    elif not any(isinstance(finder, _KerasImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KerasImportHook())


def _iterconv_module_initialising(besides):
    """Whether an iterconv module other than ``besides`` is part-way through its import."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name != besides and (name == _PACKAGE or name.startswith(_PACKAGE + "."))
    )


class _KerasImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loaders of Keras and of iterconv's modules.

    It stays installed until the classes are registered: TensorFlow asks
    ``importlib.util.find_spec("keras")`` at import only to see whether Keras
    is installed, and that look-up must not use up the hook.
    """

    def __init__(self):
        self._looking = False
        self.keras_loaded = False

    def find_spec(self, fullname, path, target=None):
        watched = fullname == "keras" or fullname.startswith(_PACKAGE + ".")
        if not watched or self._looking:
            return None
        self._looking = True  # the look-up below may come back through this finder
        try:
            spec = (importlib.util.find_spec(fullname) if fullname == "keras"
                    else importlib.machinery.PathFinder.find_spec(fullname, path, target))
        finally:
            self._looking = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def after_import(self, name):
        """Called when module ``name`` has executed (it still counts as initialising)."""
        if name == "keras":
            self.keras_loaded = True
        if not self.keras_loaded or _iterconv_module_initialising(besides=name):
            return
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        register_now()


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader, hook):
        self._loader = loader
        self._hook = hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._hook.after_import(module.__name__)

    def __getattr__(self, name):
        # Resource readers and the like: whatever the wrapped loader offers.
        return getattr(self._loader, name)
