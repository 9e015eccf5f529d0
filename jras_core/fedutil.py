"""Federation helpers that need no Flower: model state as named arrays, which
entries stay at a site, run-config parsing, and a site's federated work.

The Flower ``ClientApp`` and ``ServerApp`` only translate messages into calls
of this module, so everything here can be tested without a Flower runtime.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from jras_core.config import ConfigError, JRASConfig
from jras_core.device import place
from jras_core.models.jras import RETR_PREFIX, JRASModel, build_model
from jras_core.site import Site, SiteConfig
from jras_core.sysinfo import peak_rss_mb

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding ``jras_core``, ``client``, ``server``, ``sites`` and ``configs``
(the repository, or the installed Flower App Bundle)."""

EVALUATE_FIRST = "evaluate-first"
"""Train config flag: evaluate the received model before training and reply with the
metrics too (the server then needs no evaluation phase for that model)."""
EVALUATION = "evaluate"
"""Name of the train reply's MetricRecord holding that evaluation."""
EVALUATION_ERROR = "evaluate-error"
"""Name of the train reply's ConfigRecord saying why that evaluation failed (key ``error``)."""

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


def resolve_path(value: str | Path, roots: Iterable[Path]) -> Path:
    """An absolute path for ``value``: as is when absolute, else the first root where it exists
    (else under the first root)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    roots = [Path(r) for r in roots]
    for root in roots:
        if (root / path).exists():
            return (root / path).resolve()
    return (roots[0] / path).resolve() if roots else path.resolve()


def parse_method_overrides(text: str) -> dict[str, Any]:
    """``"train.lr=0.01; segmenter.channels=[8, 16]"`` -> ``{"train.lr": 0.01, ...}`` (values as YAML)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(";"):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"method-overrides: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


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
    return cfg.with_overrides(overrides) if overrides else cfg


def site_list(run_config: Mapping[str, Any]) -> list[str]:
    """The comma-separated ``sites`` of a simulation run config."""
    return [s.strip() for s in str(run_config.get("sites", "") or "").split(",") if s.strip()]


def method_key(cfg: JRASConfig) -> str:
    """A stable key of a method config, ignoring what may change between rounds
    (seed, proximal weight)."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("seed", "proximal_mu")}
    return json.dumps(data, sort_keys=True)


# --------------------------------------------------------------------------- a site's work


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
    """

    server_round: int = 0
    keep_norm_local: bool = False
    keep_retriever_local: bool = False
    proximal_mu: float = 0.0
    epochs: int | None = None
    transfer_dtype: str = "float32"
    diagnostics: bool = True


@dataclass
class SiteRunner:
    """A site's federated work on a cached model: load global + local state, train or
    evaluate, split the result into what is sent and what stays.

    Args:
        site: the site (``jras_core.site.Site``).
        model: a model built for the site's method config (reused across rounds).
    """

    site: Site
    model: JRASModel
    initial: Arrays = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.initial:
            self.initial = state_to_arrays(self.model.state_dict())

    def _load(self, shared: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray] | None, policy: RoundPolicy) -> set[str]:
        keep = local_keys(self.model, policy.keep_norm_local, policy.keep_retriever_local)
        check_arrays_fit(shared, self.model, "global model", expected=set(self.initial) - keep)
        shared = transfer_cast(shared, "float32")
        merged = dict(self.initial)
        if local:
            stale = set(local) - keep
            if stale:
                log.warning("site %s: ignoring %d stored local entries that are now aggregated", self.site.name, len(stale))
            merged.update({k: v for k, v in local.items() if k in keep})
        merged.update(shared)
        self.model.load_state_dict(arrays_to_state(merged), strict=True)
        return keep

    def _method_for_round(self, base: JRASConfig, policy: RoundPolicy) -> JRASConfig:
        return base.with_overrides({
            "train.seed": int(base.train.seed) + int(policy.server_round),
            "train.proximal_mu": float(policy.proximal_mu),
        })

    def train(
        self, shared: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray] | None, policy: RoundPolicy
    ) -> tuple[Arrays, Arrays, dict[str, float]]:
        """Local training from the global ``shared`` entries (plus the site's ``local`` ones).

        Returns:
            ``(shared_out, local_out, metrics)``: the entries to send, those to keep,
            and scalar metrics including ``num-examples``, ``client-time-s`` (wall) and
            ``client-cpu-s`` (this process's CPU time: the compute, also when the site
            shares a core with others).
        """
        t0, c0 = time.perf_counter(), time.process_time()
        keep = self._load(shared, local, policy)
        reference = None
        if policy.proximal_mu > 0:
            params = dict(self.model.named_parameters())
            reference = {k: params[k].detach().clone() for k in shared if k in params}
        base = self.site.method
        self.site.method = self._method_for_round(base, policy)
        try:
            metrics = self.site.train(self.model, epochs=policy.epochs, proximal_reference=reference)
        finally:
            self.site.method = base
        out_shared, out_local = split_arrays(state_to_arrays(self.model.state_dict()), keep)
        out_shared = transfer_cast(out_shared, policy.transfer_dtype)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["client-time-s"] = time.perf_counter() - t0
        metrics["client-cpu-s"] = time.process_time() - c0
        metrics["peak-rss-mb"] = peak_rss_mb()
        return out_shared, out_local, metrics

    def evaluate(
        self, shared: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray] | None, policy: RoundPolicy
    ) -> dict[str, float]:
        """Validation metrics of the global model (with the site's local entries), with
        ``client-time-s`` and ``client-cpu-s`` as in :meth:`train`."""
        t0, c0 = time.perf_counter(), time.process_time()
        self._load(shared, local, policy)
        metrics = {k: float(v) for k, v in self.site.evaluate(self.model, diagnostics=policy.diagnostics).items()}
        metrics["client-time-s"] = time.perf_counter() - t0
        metrics["client-cpu-s"] = time.process_time() - c0
        metrics["peak-rss-mb"] = peak_rss_mb()
        return metrics


_RUNNERS: dict[tuple[str, str], SiteRunner] = {}
_MODELS: dict[str, tuple[JRASModel, Arrays]] = {}


def get_runner(site_config: str | Path, method: JRASConfig) -> SiteRunner:
    """The process-wide cached :class:`SiteRunner` of a site YAML and method config
    (data and bank are built once per process, not once per round). The model is placed
    on ``train.device`` (``auto``: the machine's GPU when it has one)."""
    path = Path(site_config).resolve()
    mkey = method_key(method)
    key = (str(path), mkey)
    runner = _RUNNERS.get(key)
    if runner is None:
        if mkey not in _MODELS:
            model = build_model(method)
            initial = state_to_arrays(model.state_dict())
            place(model, method.train.device)
            _MODELS[mkey] = (model, initial)
        model, initial = _MODELS[mkey]
        site = Site(SiteConfig.from_yaml(path), method, root=path.parent)
        runner = SiteRunner(site, model, initial)
        _RUNNERS[key] = runner
        log.info("site %s ready (%s)", site.name, path)
    runner.site.method = method
    return runner


def clear_cache() -> None:
    """Forget cached sites and models (tests)."""
    _RUNNERS.clear()
    _MODELS.clear()
