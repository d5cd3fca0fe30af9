"""Calibration data: one FP sampler pass records UNet inputs at every interval-th step."""
from .calibration_set import CalibrationSet
from .capture import capture_calibration, model_fingerprint

__all__ = ["CalibrationSet", "capture_calibration", "model_fingerprint"]
