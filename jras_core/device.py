"""Where the models compute and in which precision (``train.device``, ``train.precision``).

The models and each batch they see live on one device; a site's slices, its bank and
the FAISS index stay on the CPU (faiss-cpu), and a batch crosses to the device once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from jras_core.config import DEVICE_PATTERN, ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device of ``spec``: ``auto`` (CUDA when available, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: a CUDA device asked for where there is none (or not that many).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if not DEVICE_PATTERN.match(spec):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ConfigError(f"device {spec!r} asked for, but no CUDA device is available "
                              f"(torch {torch.__version__}, {build}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA "
                              f"device(s) are present (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU for an empty module)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def check_precision(device: torch.device, precision: str) -> None:
    """Raise :class:`ConfigError` when ``precision`` cannot run on ``device``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 (with a gradient scaler) needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16 or fp32")


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.autocast`` for ``precision`` on ``device`` (``fp32``: nothing changes).

    Inside, convolutions and matrix products run in bf16 or fp16; losses and softmaxes that
    autocast keeps in fp32 stay there. Outputs may be half precision: callers that keep them
    (probabilities, embeddings) convert with ``.float()``."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision]):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 training on ``device`` (None for fp32 and bf16, which need none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def place(model: nn.Module, device_spec: str | torch.device) -> torch.device:
    """Move ``model`` to the device ``device_spec`` names (:func:`resolve_device`); returns it."""
    device = resolve_device(device_spec)
    model.to(device)
    return device


__all__ = [
    "PRECISIONS", "autocast", "check_precision", "grad_scaler", "module_device", "place",
    "resolve_device",
]
