"""gaq: post-training quantization of diffusion UNets (W4A8 and friends), with gradient-aligned calibration."""
import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# diffusers imports torchao when installed; on CPU torchao logs about missing CUDA kernels. Quiet that noise.
_os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
for _name in ("torchao", "torch._dynamo", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message=".*register_constant.*")

# Resolved on first use, so that torch-free parts (the onnxruntime sampler behind ``gaq sample --onnx``)
# can import this package on a machine without torch.
_LAZY = {
    "CalibrationConfig": "config", "ConfigError": "config", "QuantConfig": "config", "SamplerConfig": "config",
    "preset": "config", "MinMaxConfig": "algorithms", "available_algorithms": "algorithms",
    "register_algorithm": "algorithms", "quantize": "api", "CalibrationSet": "calibration",
    "capture_calibration": "calibration", "load_quantized": "serialization", "save_quantized": "serialization",
    "UniformConfig": "algorithms.uniform", "TemporalConfig": "algorithms.temporal",
    "GradientAlignedConfig": "algorithms.gradient_aligned", "CalibrationRecord": "algorithms.result",
    "GAQConfig": "torchao_config", "unet_root": "torchao_config",
    "layer_sensitivity": "evaluation.sensitivity", "float_weights": "evaluation.sensitivity",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'gaq_backend' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
