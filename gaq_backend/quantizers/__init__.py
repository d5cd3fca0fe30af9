"""Fake quantizers: simulate integer arithmetic in float with straight-through gradients."""
from .uniform import UniformQuantizer, round_ste, search_mse_scale

__all__ = ["UniformQuantizer", "round_ste", "search_mse_scale"]
