"""Calibration data: one FP sampler pass records UNet inputs at every interval-th step."""
from .capture import CalibrationSet, capture_calibration, model_fingerprint

__all__ = ["CalibrationSet", "capture_calibration", "model_fingerprint"]
