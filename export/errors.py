"""The exporter's refusal of a model folder: one class, raised before anything is written."""


class ModelError(ValueError):
    """The model folder is missing, incomplete, of another family, or not loadable as asked."""
