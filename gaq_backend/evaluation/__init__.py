"""Measuring a quantized model against its FP original."""
from .images import save_grid, side_by_side, to_uint8
from .noise import noise_mse

__all__ = ["save_grid", "side_by_side", "to_uint8", "noise_mse"]
