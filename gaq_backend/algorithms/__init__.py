"""Calibration algorithms, registered by name (``algorithm: <name>`` in a recipe).

Importing this package registers the built-in algorithms.
"""
from .registry import AlgorithmSpec, UnknownAlgorithmError, available_algorithms, get_algorithm, register_algorithm
from .minmax import MinMaxConfig
from .uniform import UniformConfig
from .temporal import TemporalConfig
from .gradient_aligned import GradientAlignedConfig

__all__ = ["AlgorithmSpec", "UnknownAlgorithmError", "available_algorithms", "get_algorithm", "register_algorithm",
           "MinMaxConfig", "UniformConfig", "TemporalConfig", "GradientAlignedConfig"]
