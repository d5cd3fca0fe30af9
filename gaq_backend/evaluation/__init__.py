"""Measuring a quantized model against its FP original."""
from .images import save_grid, side_by_side, to_uint8

__all__ = ["save_grid", "side_by_side", "to_uint8", "noise_mse"]


def __getattr__(name: str):
    # noise_mse needs torch; the image helpers do not (the onnxruntime sampler uses them without torch).
    if name == "noise_mse":
        from .noise import noise_mse

        return noise_mse
    raise AttributeError(f"module 'gaq_backend.evaluation' has no attribute {name!r}")
