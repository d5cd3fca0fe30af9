"""Calibration algorithms, registered by name (``algorithm: <name>`` in a recipe).

Importing this package registers the built-in algorithms.
"""
from .registry import AlgorithmSpec, UnknownAlgorithmError, available_algorithms, get_algorithm, register_algorithm
from . import minmax  # noqa: F401  (registers "minmax")
from .minmax import MinMaxConfig

__all__ = ["AlgorithmSpec", "UnknownAlgorithmError", "available_algorithms", "get_algorithm", "register_algorithm", "MinMaxConfig"]
