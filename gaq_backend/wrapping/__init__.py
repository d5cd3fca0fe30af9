"""Model wrapping: replace a UNet's Conv2d / Linear / attention matmuls by fake-quant versions."""
from .layers import QuantConv2d, QuantLinear, QuantLayerMixin
from .attention import QuantAttnProcessor
from .wrap import UnsupportedLayerError, WrapReport, fit_weights, quant_layers, quantizers, weight_sizes, wrap_unet, is_kept

__all__ = ["QuantConv2d", "QuantLinear", "QuantLayerMixin", "QuantAttnProcessor", "UnsupportedLayerError",
           "WrapReport", "fit_weights", "quant_layers", "quantizers", "weight_sizes", "wrap_unet", "is_kept"]
