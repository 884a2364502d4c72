"""iterconv: iterative convergent computation in residual networks (Keras 3).

Importing the package configures TensorFlow's environment (oneDNN on unless the
user chose) but does not import TensorFlow; submodules import it when needed.
"""

from iterconv_keras import _env

_env.configure()

__version__ = "0.1.0"
