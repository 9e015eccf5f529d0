"""Global checkpoints of a federation: one file, rewritten atomically after every round.

A checkpoint holds the global round, the global model state (``seg.*``/``retr.*``),
the method configuration, the run configuration and optional strategy state
(FedAdam moments). Its ``state``/``config`` layout is that of
:mod:`jras_core.checkpoint`, so ``jras eval`` reads it too. No Flower import here.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.protocol import Arrays, arrays_to_state, state_to_arrays
from jras_core.checkpoint import load_file
from jras_core.config import ConfigError
from jras_core.files import atomic_write_bytes

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
KIND = "jras-federated"


@dataclass
class Checkpoint:
    """A global checkpoint.

    Attributes:
        round: the last completed global round.
        arrays: the global model state as named numpy arrays.
        config: the method configuration (``JRASConfig.to_dict()``).
        run_config: the Flower run configuration.
        strategy_state: strategy-specific named arrays (e.g. ``m_t.<key>``, ``v_t.<key>``).
        created: UNIX time of writing.
    """

    round: int
    arrays: Arrays
    config: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)
    strategy_state: Arrays = field(default_factory=dict)
    created: float = 0.0


def checkpoint_path(path: str | Path) -> Path:
    """``path`` itself if it names a file, else ``path/checkpoint.pt``."""
    path = Path(path)
    return path / CHECKPOINT_FILE if path.is_dir() or not path.suffix else path


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` (a file, or a folder for ``checkpoint.pt``) atomically:
    temporary file, fsync, ``os.replace``, fsync of the folder.

    A crash at any point leaves the previous checkpoint readable. Temporary files that a
    killed writer left next to the target are removed after a successful write (one
    server writes a run folder).
    """
    target = checkpoint_path(path)
    payload = {
        "kind": KIND,
        "round": int(ckpt.round),
        "state": arrays_to_state(ckpt.arrays),
        "config": _plain(ckpt.config),
        "run_config": _plain(ckpt.run_config),
        "strategy_state": arrays_to_state(ckpt.strategy_state),
        "created": float(ckpt.created or time.time()),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(target, buf.getvalue())
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        stale.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted checkpoint write", stale)
    log.info("checkpoint of round %d written to %s", ckpt.round, target)
    return target


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors only, no pickled code)."""
    target = checkpoint_path(path)
    data = load_file(target)
    if not isinstance(data, dict) or data.get("kind") != KIND or "state" not in data:
        raise ConfigError(f"{target}: not a federated J-RAS checkpoint")
    return Checkpoint(
        round=int(data["round"]),
        arrays=state_to_arrays(data["state"]),
        config=dict(data.get("config") or {}),
        run_config=dict(data.get("run_config") or {}),
        strategy_state=state_to_arrays(data.get("strategy_state") or {}),
        created=float(data.get("created", 0.0)),
    )


def arrays_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Same keys and identical values."""
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
