"""The device every command runs on: ``"auto"`` (CUDA when present, else the CPU) or a torch device name."""

from __future__ import annotations

import re

import torch

from pyrolora.errors import ConfigError

__all__ = ["check_device_name", "resolve_device"]

_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str, where: str = "device") -> str:
    """``name`` if it is ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``; else a ConfigError naming ``where``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}.")
    return name


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``name``: ``"auto"`` (or ``None``) is ``cuda`` when ``torch.cuda.is_available()``,
    else ``cpu``.

    Raises:
        ConfigError: an unknown name, or a CUDA device on a machine without one (the message says to use
            ``auto`` or ``cpu``).
    """
    if isinstance(name, torch.device):
        return name
    name = check_device_name("auto" if name is None else name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but torch sees no CUDA GPU; use 'auto' or 'cpu'.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s); use 'cuda:0'."
            )
    return device
