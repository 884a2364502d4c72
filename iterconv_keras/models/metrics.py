"""Metrics that Keras does not ship: exact-set accuracy for Digitclutter."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="iterconv")
class ExactSetAccuracy(keras.metrics.MeanMetricWrapper):
    """Fraction of images whose top-n predicted classes are exactly the n present.

    For Digitclutter (Spoerer et al. 2017) an image holds n distinct digits and
    the label is multi-hot. n is read per image from the label (its number of
    ones), so one metric serves 2- to 5-digit sets.

    Args:
        name: metric name, default ``"exact_set_accuracy"``.
        dtype: metric dtype.
    """

    def __init__(self, name="exact_set_accuracy", dtype=None):
        super().__init__(fn=exact_set_match, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


def exact_set_match(y_true, y_pred):
    """Per-example 1.0 where the top-n scores are exactly the n true classes.

    Args:
        y_true: multi-hot labels ``[batch, K]``.
        y_pred: scores or logits ``[batch, K]`` (any monotone transform works).
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    n_true = ops.sum(y_true, axis=-1, keepdims=True)
    # Rank of each class among the scores: the number of classes scoring higher.
    # A class is in the top n exactly when its rank is < n (ties broken by index).
    higher = ops.cast(ops.expand_dims(y_pred, -1) < ops.expand_dims(y_pred, -2), "float32")
    k = ops.shape(y_pred)[-1]
    index = ops.arange(k)
    tie_first = ops.cast(
        (ops.expand_dims(y_pred, -1) == ops.expand_dims(y_pred, -2))
        & (ops.expand_dims(index, -1) > ops.expand_dims(index, 0)),
        "float32",
    )
    rank = ops.sum(higher + tie_first, axis=-1)
    predicted = ops.cast(rank < n_true, "float32")
    return ops.cast(ops.all(ops.equal(predicted, y_true), axis=-1), "float32")
