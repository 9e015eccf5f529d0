"""The federation protocol, shared by the server and the sites: what travels and how.

Model state as named arrays and their wire format, which entries stay at a site, how
updates are averaged, the run config's keys and how they make the method config, and what
the server asks of a site in a round. It needs no Flower and no site data: the ``ServerApp``
imports it without loading a site's data, bank or retrieval stack.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jras_core.config import ConfigError, JRASConfig, parse_overrides
from jras_core.files import PROJECT_ROOT, resolve_path
from jras_core.models.jras import RETR_PREFIX, JRASModel

log = logging.getLogger(__name__)

EVALUATE_FIRST = "evaluate-first"
"""Train config flag: evaluate the received model before training and reply with the
metrics too (the server then needs no evaluation phase for that model)."""
EVALUATION = "evaluate"
"""Name of the train reply's MetricRecord holding that evaluation."""
EVALUATION_ERROR = "evaluate-error"
"""Name of the train reply's ConfigRecord saying why that evaluation failed (key ``error``)."""
FINAL_ROUND = "final-round"
"""Evaluation config flag: the model sent is the run's final global model (the last round's)."""
LAST_ROUND = "last-round"
"""Train config entry: the run's last round, which places each round's local epochs in the
whole training (the learning rate under ``train.lr_schedule``)."""
PERSONALISE = "personalise"
"""Run-config key: at the final round each site adapts the final global model to its own
annotated cases and keeps the result (:meth:`client.site_runner.SiteRunner.personalise`)."""

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
)
"""Module types whose parameters and buffers FedBN keeps at each site."""

Arrays = dict[str, np.ndarray]


# --------------------------------------------------------------------------- state <-> arrays


def state_to_arrays(state: Mapping[str, torch.Tensor]) -> Arrays:
    """A ``state_dict`` as named numpy arrays (CPU copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def arrays_to_state(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Named numpy arrays as a ``state_dict`` of tensors."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def arrays_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Raw size of the arrays in bytes."""
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))


TRANSFER_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
"""Wire formats of model entries (``transfer-dtype`` in the run config)."""


def transfer_cast(arrays: Mapping[str, np.ndarray], dtype: str) -> Arrays:
    """The floating-point entries of ``arrays`` cast to ``dtype`` (``float32`` or ``float16``);
    integer entries (counters) unchanged. Used on the way out (``float16`` halves the bytes of
    a round) and on the way in (back to ``float32`` before the model or the aggregation)."""
    if dtype not in TRANSFER_DTYPES:
        raise ConfigError(f"transfer-dtype must be one of {list(TRANSFER_DTYPES)}, got {dtype!r}")
    target = TRANSFER_DTYPES[dtype]
    out: Arrays = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        out[k] = v.astype(target) if np.issubdtype(v.dtype, np.floating) and v.dtype != target else v
    return out


def norm_keys(model: nn.Module) -> set[str]:
    """State keys of normalisation layers: weights, biases, running statistics, counters."""
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict())
    return keys


def buffer_keys(model: nn.Module) -> set[str]:
    """State keys that are buffers (running statistics, counters), not trained parameters."""
    params = {k for k, _ in model.named_parameters()}
    return set(model.state_dict().keys()) - params


def local_keys(model: JRASModel, keep_norm_local: bool, keep_retriever_local: bool) -> set[str]:
    """State keys that never leave a site.

    Args:
        model: the J-RAS model (keys ``seg.*`` / ``retr.*``).
        keep_norm_local: FedBN: normalisation entries stay at each site.
        keep_retriever_local: only the segmenter is aggregated; the retriever stays at each site.
    """
    state_keys = set(model.state_dict().keys())
    out: set[str] = set()
    if keep_norm_local:
        out |= norm_keys(model)
    if keep_retriever_local:
        out |= {k for k in state_keys if k.startswith(RETR_PREFIX)}
    return out & state_keys


def split_arrays(arrays: Mapping[str, np.ndarray], local: Iterable[str]) -> tuple[Arrays, Arrays]:
    """``(shared, local)`` parts of ``arrays``."""
    local = set(local)
    shared = {k: v for k, v in arrays.items() if k not in local}
    kept = {k: v for k, v in arrays.items() if k in local}
    return shared, kept


def cast_like(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Arrays:
    """Give each array the dtype of the same-named reference array (integers are rounded).

    Weighted averaging turns integer counters (``num_batches_tracked``) into floats;
    this restores the model's own dtypes.
    """
    out: Arrays = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        ref = reference.get(k)
        if ref is not None and v.dtype != ref.dtype:
            if np.issubdtype(ref.dtype, np.integer):
                v = np.rint(v)
            v = v.astype(ref.dtype)
        out[k] = v
    return out


def weighted_average(arrays: list[Mapping[str, np.ndarray]], weights: list[float], keys: Iterable[str]) -> Arrays:
    """Weighted mean of the named ``keys`` over several clients' arrays."""
    if not arrays or len(arrays) != len(weights):
        raise ValueError("weighted_average needs one weight per set of arrays")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: Arrays = {}
    for k in keys:
        acc = None
        for a, w in zip(arrays, weights):
            term = np.asarray(a[k], dtype=np.float64) * (w / total)
            acc = term if acc is None else acc + term
        out[k] = acc
    return out


def check_arrays_fit(arrays: Mapping[str, np.ndarray], model: nn.Module, source: str, expected: Iterable[str] | None = None) -> None:
    """Raise :class:`ConfigError` unless ``arrays`` hold exactly ``expected`` keys
    (default: all of ``model``'s state keys) with the model's shapes."""
    state = model.state_dict()
    want = set(state) if expected is None else set(expected)
    got = set(arrays)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ConfigError(
            f"{source}: model entries do not match the configured model "
            f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''})"
        )
    for k in want:
        if tuple(np.shape(arrays[k])) != tuple(state[k].shape):
            raise ConfigError(
                f"{source}: entry {k!r} has shape {tuple(np.shape(arrays[k]))}, "
                f"the configured model expects {tuple(state[k].shape)}"
            )


# --------------------------------------------------------------------------- run config

RUN_CONFIG_OVERRIDES: dict[str, tuple[str, Any]] = {
    "local-epochs": ("train.epochs", 0),
    "image-size": ("preprocess.size", 0),
    "fusion": ("segmenter.fusion", ""),
    "retriever-mode": ("retriever.mode", ""),
    "seed": ("train.seed", -1),
    "device": ("train.device", ""),
    "precision": ("train.precision", ""),
}
"""Run-config key -> (method config key, value meaning "keep the method config's value")."""


def parse_method_overrides(text: str) -> dict[str, Any]:
    """``"train.lr=0.01; segmenter.channels=[8, 16]"`` -> ``{"train.lr": 0.01, ...}``:
    :func:`~jras_core.config.parse_overrides` of the ``;``-separated items."""
    return parse_overrides((text or "").split(";"), source="method-overrides")


def method_from_run_config(run_config: Mapping[str, Any], roots: Iterable[Path] = (PROJECT_ROOT,)) -> JRASConfig:
    """The method configuration of a run.

    ``method-config`` (a JRAS YAML, relative paths against ``roots``; empty: the
    defaults), then the named run-config overrides (:data:`RUN_CONFIG_OVERRIDES`),
    then ``method-overrides`` (``"key=value; ..."``).
    """
    path = str(run_config.get("method-config", "") or "")
    cfg = JRASConfig.from_yaml(resolve_path(path, roots)) if path else JRASConfig()
    overrides: dict[str, Any] = {}
    for key, (dotted, keep) in RUN_CONFIG_OVERRIDES.items():
        if key in run_config and run_config[key] != keep:
            overrides[dotted] = run_config[key]
    overrides.update(parse_method_overrides(str(run_config.get("method-overrides", "") or "")))
    return cfg.with_overrides(overrides, source="run config") if overrides else cfg


def site_list(run_config: Mapping[str, Any]) -> list[str]:
    """The comma-separated ``sites`` of a simulation run config."""
    return [s.strip() for s in str(run_config.get("sites", "") or "").split(",") if s.strip()]


def method_key(cfg: JRASConfig) -> str:
    """A stable key of a method config, ignoring what may change between rounds
    (seed, proximal weight)."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("seed", "proximal_mu")}
    return json.dumps(data, sort_keys=True)


# --------------------------------------------------------------------------- a round


@dataclass
class RoundPolicy:
    """What the server asked of a site for one round.

    Attributes:
        server_round: the global round number.
        keep_norm_local: FedBN (normalisation entries stay local).
        keep_retriever_local: only the segmenter is aggregated.
        proximal_mu: FedProx weight (0: no proximal term).
        epochs: local epochs (None: the method config's ``train.epochs``).
        transfer_dtype: wire format of the model entries the site sends back
            (``float32`` or ``float16``).
        diagnostics: the evaluation adds the retrieval diagnostics (oracle, random and
            no guides; :func:`jras_core.training.evaluate.evaluate`).
        final: the model evaluated is the run's final global model (:data:`FINAL_ROUND`).
        last_round: the run's last round (0: not known), which with ``server_round`` places
            the round's local epochs in the whole training (``train.lr_schedule``).
    """

    server_round: int = 0
    keep_norm_local: bool = False
    keep_retriever_local: bool = False
    proximal_mu: float = 0.0
    epochs: int | None = None
    transfer_dtype: str = "float32"
    diagnostics: bool = True
    final: bool = False
    last_round: int = 0
