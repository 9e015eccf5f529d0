"""Model checkpoints: weights plus the method configuration, written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from jras_core.config import ConfigError, JRASConfig
from jras_core.files import atomic_write_bytes
from jras_core.models.jras import JRASModel, build_model


def save_model(path: str | Path, model: JRASModel, cfg: JRASConfig, **extra: Any) -> Path:
    """Write ``{"state": state_dict, "config": cfg, **extra}`` to ``path`` atomically."""
    buf = io.BytesIO()
    torch.save({"state": model.state_dict(), "config": cfg.to_dict(), **extra}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_file(path: str | Path) -> Any:
    """What the checkpoint file ``path`` holds (tensors and plain data only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on a bad file
        raise ConfigError(f"{path}: not a readable checkpoint ({exc})") from None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The entries of a checkpoint written by :func:`save_model` or by a federation
    (both hold ``state``, the model's state dict, and ``config``, the method configuration)."""
    data = load_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("state"), dict) or "config" not in data:
        raise ConfigError(f"{path}: not a J-RAS checkpoint (missing 'state' or 'config')")
    return data


def load_model(path: str | Path, cfg: JRASConfig | None = None) -> tuple[JRASModel, JRASConfig, dict]:
    """Read a checkpoint; returns the model (built from the stored config unless
    ``cfg`` is given), the config and the remaining stored entries."""
    path = Path(path)
    data = read_checkpoint(path)
    if cfg is None:
        stored = JRASConfig.from_dict(data["config"], source=str(path))
        # where a checkpoint was trained says nothing about this machine: it loads on any
        # device (the caller places the model, as train.device says here)
        cfg = stored.with_overrides({"train.device": "auto"}) if stored.train.device != "auto" else stored
    model = build_model(cfg)
    try:
        model.load_state_dict(data["state"])
    except RuntimeError as exc:
        raise ConfigError(f"{path}: weights do not fit the configured model ({exc})") from None
    extra = {k: v for k, v in data.items() if k not in ("state", "config")}
    return model, cfg, extra
