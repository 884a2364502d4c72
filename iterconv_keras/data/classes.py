"""Class names of the datasets iterconv trains on.

A zoo version's ``classify`` signature returns these names, and its model card
lists them; a dataset without an entry here (or a model whose class count does
not match) gets ``"0".."K-1"``.
"""

_CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_FASHION_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
_DIGITS = tuple(str(d) for d in range(10))

DATASET_CLASS_NAMES = {
    "digitclutter": _DIGITS,
    "digitdebris": _DIGITS,
    "mnist": _DIGITS,
    "fashion_mnist": _FASHION_NAMES,
    "cifar10": _CIFAR10_NAMES,
}


def class_names_for(dataset, num_classes):
    """The class names of ``dataset``, or ``"0".."K-1"`` when unknown or mismatched.

    Args:
        dataset: dataset name (see `iterconv_keras.data.sources.DATASET_NAMES`) or None.
        num_classes: K, the model's number of outputs.

    Returns:
        A list of K strings.

    Example:
        >>> class_names_for("fashion_mnist", 10)[:2]
        ['t-shirt/top', 'trouser']
    """
    names = DATASET_CLASS_NAMES.get(dataset)
    if names is None or len(names) != num_classes:
        return [str(k) for k in range(num_classes)]
    return list(names)
