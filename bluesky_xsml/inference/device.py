"""Choosing the device and the autocast precision for inference."""

from __future__ import annotations

import torch

from ..errors import ConfigurationError

__all__ = ["choose_device", "resolve_precision", "cpu_supports_bf16"]


def choose_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' was requested but torch sees no CUDA device")
    return dev


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX) for oneDNN."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    for name in checks:
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a capability probe: any failure means no  # pragma: no cover
            pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into ``"fp32"``, ``"bf16"`` or ``"fp16"`` for ``device``."""
    allowed = ("auto", "fp32", "bf16", "fp16")
    if precision not in allowed:
        raise ConfigurationError(f"precision must be one of {allowed}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"
