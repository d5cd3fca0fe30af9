"""The model the project ships, and how it was made."""
from .embedded import EMBEDDED_MODEL_DIR, embedded_unet_config, load_unet, build_unet

__all__ = ["EMBEDDED_MODEL_DIR", "embedded_unet_config", "load_unet", "build_unet"]
