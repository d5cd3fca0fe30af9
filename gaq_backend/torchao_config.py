"""torchao front door: ``quantize_(unet, GAQConfig(config, step="prepare"))``, the user's own forward
passes, then ``quantize_(unet, GAQConfig(config, step="convert"))``.

The handler is registered with torchao's ``register_quantize_module_handler`` and applies to the
module the filter selects, which must be the UNet itself (``filter_fn=unet_root``, or any filter that
matches the root, ``fqn == ""``). ``prepare`` attaches gaq's recorder to the UNet; ``convert`` removes
it and quantizes from what it recorded, exactly as ``quantize(unet, config, forward_loop=...)`` does
for the same calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .api import (check_config, check_quantizable, check_sampling_loop, drop_stale_fused_projections, finish_recording,
                  new_recorder, quantize_recorded)
from .config import ConfigError, QuantConfig


def unet_root(module: nn.Module, fqn: str) -> bool:
    """The filter that selects the UNet passed to ``quantize_`` itself."""
    return fqn == ""


@dataclass
class GAQConfig(AOBaseConfig):
    config: QuantConfig
    step: Literal["prepare", "convert"] = "prepare"
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.config, QuantConfig):
            raise ConfigError(f"GAQConfig.config must be a gaq QuantConfig; got {type(self.config).__name__}")
        if self.step not in ("prepare", "convert"):
            raise ConfigError(f"GAQConfig.step must be 'prepare' or 'convert'; got {self.step!r}")


@register_quantize_module_handler(GAQConfig)
def _gaq_transform(module: nn.Module, config: GAQConfig) -> nn.Module:
    if not hasattr(module, "config") or not hasattr(module.config, "in_channels"):
        raise ConfigError(f"GAQConfig applies to a whole diffusers UNet; the filter selected a {type(module).__name__} "
                          "(use filter_fn=gaq_backend.unet_root or lambda m, fqn: fqn == '')")
    if config.step == "prepare":
        check_config(config.config)
        check_sampling_loop(config.config, None)   # the loop between prepare and convert is the user's, not gaq's
        check_quantizable(module)
        if getattr(module, "_gaq_recorder", None) is not None:
            raise ConfigError("GAQConfig(step='prepare') was already applied to this UNet; run step='convert' next")
        drop_stale_fused_projections(module)
        recorder = new_recorder(module, config.config)
        recorder.__enter__()
        module.eval()  # recorded as the other front doors record: no dropout
        module._gaq_recorder = recorder
        return module
    recorder = getattr(module, "_gaq_recorder", None)
    if recorder is None:
        raise ConfigError("GAQConfig(step='convert') needs step='prepare' and forward passes first")
    recorder.__exit__(None, None, None)
    del module._gaq_recorder
    return quantize_recorded(module, config.config, finish_recording(recorder, config.config), config.progress)
