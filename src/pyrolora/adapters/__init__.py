"""LoRA-XS adapters: frozen SVD factors, a latent r x r core per adapted module, injection by target names."""

from pyrolora.adapters.config import ALL_LINEAR, LoraXSConfig
from pyrolora.adapters.injection import HEAD_MODULE_NAMES, AdapterSet, inject_adapters
from pyrolora.adapters.layer import LoraXSLinear
from pyrolora.adapters.projection import svd_factors

__all__ = [
    "ALL_LINEAR",
    "HEAD_MODULE_NAMES",
    "AdapterSet",
    "LoraXSConfig",
    "LoraXSLinear",
    "inject_adapters",
    "svd_factors",
]
