"""Argument checks shared by the model and its layers, with messages that echo the bad value."""


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
