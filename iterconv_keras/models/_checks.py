"""Argument checks shared by the model and its layers, with messages that echo the bad value."""

import math


def positive_shape(value, name, axes):
    """``value`` as a tuple of positive ints, one per entry of ``axes``, or ``ValueError``.

    Args:
        value: the shape given by the caller, e.g. ``(32, 32, 1)``.
        name: argument name for the message, e.g. ``"image_shape"``.
        axes: the axes' names, e.g. ``("H", "W", "C")``.
    """
    form = "(" + ", ".join(axes) + ")"
    try:
        shape = tuple(int(d) for d in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {form} ints, got {value!r}") from None
    if len(shape) != len(axes) or min(shape) < 1:
        raise ValueError(f"{name} must be {form} with positive sizes, got {value!r}")
    return shape


def positive_number(value, name):
    """``value`` as a positive finite float, or ``ValueError`` echoing it.

    Args:
        value: the number given by the caller (bools, strings, NaN, inf and
            values <= 0 are refused).
        name: argument name for the message, e.g. ``"max_gain"``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0.0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number
