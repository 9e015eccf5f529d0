"""A site's federated work: the cached site and model a ClientApp trains and evaluates.

The ClientApp translates Flower messages into calls of :class:`SiteRunner`; everything here
runs without a Flower runtime.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from federation.protocol import (
    Arrays,
    RoundPolicy,
    arrays_to_state,
    check_arrays_fit,
    local_keys,
    method_key,
    split_arrays,
    state_to_arrays,
    transfer_cast,
)
from jras_core.config import JRASConfig
from jras_core.device import place
from jras_core.models.jras import JRASModel, build_model
from jras_core.site import Site
from jras_core.sysinfo import peak_rss_mb
from jras_core.training.lr_schedule import TrainingSpan

log = logging.getLogger(__name__)


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
        method = self._method_for_round(self.site.method, policy)
        epochs = method.train.epochs if policy.epochs is None else policy.epochs
        span = TrainingSpan.of_round(policy.server_round, policy.last_round, epochs)
        metrics = self.site.train(self.model, epochs=epochs, proximal_reference=reference, method=method, span=span)
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

    def personalise(
        self, shared: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray] | None, policy: RoundPolicy
    ) -> dict[str, float]:
        """Adapt the global model (with the site's local entries) to the site's own annotated
        training cases (:func:`jras_core.training.finetune.adapt_site`: AdaBN, fine-tuning with
        early stopping) and save it at the site (:attr:`jras_core.site.Site.adapted_model_path`).
        The cached model stays the global one. Returns scalar figures only, prefixed
        ``personal-``: the adaptation's (epochs run, best epoch, held-out Dice before and after)
        and ``personal-dice-mean``, the adapted model's validation Dice."""
        from jras_core.training.finetune import adapt_site, save_adapted

        t0 = time.perf_counter()
        self._load(shared, local, policy)
        site, method = self.site, self.site.method
        bank = site.bank if method.uses_retrieval else None
        adapted, record = adapt_site(self.model, site.train_set, method, bank)
        path = save_adapted(site.adapted_model_path, adapted, method, record, site=site.name,
                            start=f"global model of round {policy.server_round}")
        scores = site.evaluate(adapted, diagnostics=False)
        log.info("site %s: personalised model -> %s (validation Dice %.4f)", site.name, path, scores["dice_mean"])
        del adapted
        return {**record.metrics(prefix="personal-"), "personal-dice-mean": float(scores["dice_mean"]),
                "personal-time-s": time.perf_counter() - t0}


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
        site = Site.from_yaml(path, method)
        runner = SiteRunner(site, model, initial)
        _RUNNERS[key] = runner
        log.info("site %s ready (%s)", site.name, path)
    runner.site.method = method
    return runner


def clear_cache() -> None:
    """Forget cached sites and models (tests)."""
    _RUNNERS.clear()
    _MODELS.clear()
