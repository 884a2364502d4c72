"""The ``iterconv`` command line (installed as the ``iterconv_cli`` package).

Commands are thin: they parse options, build a config and call one library
function. Heavy imports (TensorFlow, Keras) happen inside the commands so that
``iterconv --help`` answers instantly.
"""
