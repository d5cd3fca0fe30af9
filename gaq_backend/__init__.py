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

from .config import CalibrationConfig, ConfigError, QuantConfig, SamplerConfig, preset  # noqa: E402
from .algorithms import MinMaxConfig, available_algorithms, register_algorithm  # noqa: E402
from .api import quantize  # noqa: E402
from .calibration import CalibrationSet, capture_calibration  # noqa: E402
from .serialization import load_quantized  # noqa: E402

__all__ = ["quantize", "QuantConfig", "CalibrationConfig", "SamplerConfig", "MinMaxConfig", "ConfigError", "preset",
           "available_algorithms", "register_algorithm", "CalibrationSet", "capture_calibration", "load_quantized"]
