"""Strategies of the J-RAS federation, on Flower's Message API.

All strategies share :class:`JRASStrategyMixin`, which adds to Flower's own:

* **local entries**: state keys that stay at the sites (FedBN's normalisation
  entries; the retriever when only the segmenter is aggregated) are neither sent
  nor aggregated; the global model keeps its values for them;
* **dtypes**: aggregated entries keep the model's dtypes (integer counters stay integers);
* **round offset**: after a resume, rounds are numbered on from the checkpoint;
* **bookkeeping**: per-site and aggregated metrics, failures and bytes of arrays
  sent and received go to a :class:`~server.tracking.RoundRecorder`.

:func:`build_strategy` picks FedAvg (default), FedProx, FedBN or FedAdam from
:class:`~server.settings.ServerSettings`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from jras_core.fedutil import Arrays, cast_like, weighted_average
from server.settings import ServerSettings
from server.tracking import RoundRecorder

log = logging.getLogger(__name__)


def record_to_arrays(record: ArrayRecord) -> Arrays:
    """An ``ArrayRecord`` as named numpy arrays."""
    return {k: v.numpy() for k, v in record.items()}


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ``ArrayRecord``."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def site_label(msg: Message) -> str:
    """How a site is named in logs: its node id (names never travel in messages)."""
    return f"node-{msg.metadata.src_node_id}"


PER_SITE_ONLY = ("partition-id",)
"""Reply metrics that identify a site and mean nothing averaged: dropped from aggregates."""


def _drop_per_site(metrics: MetricRecord | None) -> MetricRecord | None:
    if metrics is None or not any(k in metrics for k in PER_SITE_ONLY):
        return metrics
    return MetricRecord({k: v for k, v in metrics.items() if k not in PER_SITE_ONLY})


def _metrics_of(msg: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        out.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return out


class JRASStrategyMixin:
    """Local entries, dtype restoration, round offset and bookkeeping for a FedAvg-family strategy.

    Must come before the Flower strategy in the bases. Call :meth:`setup_jras` once.
    """

    local_keys: frozenset[str] = frozenset()
    round_offset: int = 0
    recorder: RoundRecorder | None = None
    _global: Arrays | None = None

    def setup_jras(self, local_keys: Iterable[str] = (), round_offset: int = 0, recorder: RoundRecorder | None = None) -> None:
        self.local_keys = frozenset(local_keys)
        self.round_offset = int(round_offset)
        self.recorder = recorder

    # ------------------------------------------------------------------ helpers
    def _shared(self, arrays: ArrayRecord) -> ArrayRecord:
        if not self.local_keys:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    def _record(self, phase: str, replies: list[Message]) -> None:
        if self.recorder is None:
            return
        ok = [m for m in replies if not m.has_error()]
        self.recorder.add_failures(phase, len(replies) - len(ok))
        received = 0
        for msg in ok:
            for record in msg.content.array_records.values():
                received += record.count_bytes()
            self.recorder.add_site_metrics(phase, site_label(msg), _metrics_of(msg))
        self.recorder.add_traffic(received=received)

    def _sent(self, messages: list[Message]) -> None:
        if self.recorder is None:
            return
        self.recorder.add_traffic(sent=sum(
            record.count_bytes() for msg in messages for record in msg.content.array_records.values()
        ))

    def postprocess_aggregate(self, aggregated: Arrays, replies: list[Message]) -> Arrays:
        """Hook for subclasses: adjust the aggregated shared entries."""
        return aggregated

    # ------------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        if self.recorder is not None:
            self.recorder.start_round(rnd)
        self._global = record_to_arrays(arrays)
        messages = list(super().configure_train(rnd, self._shared(arrays), config, grid))  # type: ignore[misc]
        self._sent(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        replies = list(replies)
        self._record("train", replies)
        aggregated, metrics = super().aggregate_train(rnd, replies)  # type: ignore[misc]
        metrics = _drop_per_site(metrics)
        if metrics is not None and self.recorder is not None:
            self.recorder.add_global_metrics("train", metrics)
        if aggregated is None:
            return None, metrics
        shared = self.postprocess_aggregate(record_to_arrays(aggregated), [m for m in replies if not m.has_error()])
        merged = dict(self._global or {})
        merged.update(shared)
        return arrays_to_record(cast_like(merged, self._global or {})), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        if self.recorder is not None:
            self.recorder.start_round(rnd)
        messages = list(super().configure_evaluate(rnd, self._shared(arrays), config, grid))  # type: ignore[misc]
        self._sent(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        replies = list(replies)
        self._record("evaluate", replies)
        metrics = _drop_per_site(super().aggregate_evaluate(rnd, replies))  # type: ignore[misc]
        if metrics is not None and self.recorder is not None:
            self.recorder.add_global_metrics("evaluate", metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_arrays(self) -> Arrays:
        """Strategy state to store in a checkpoint (none by default)."""
        return {}

    def load_state_arrays(self, arrays: Arrays) -> None:
        """Restore what :meth:`state_arrays` returned."""


class JRASFedAvg(JRASStrategyMixin, FedAvg):
    """FedAvg: weighted mean of the sites' entries (weights ``num-examples``)."""


class JRASFedProx(JRASStrategyMixin, FedProx):
    """FedProx: FedAvg plus ``proximal-mu`` in the train config; sites add the proximal term."""


class JRASFedBN(JRASStrategyMixin, FedAvg):
    """FedBN: FedAvg over everything but normalisation layers, which stay at each site
    (pass their keys as local keys)."""


class JRASFedAdam(JRASStrategyMixin, FedAdam):
    """FedAdam on the trained parameters; buffers (running statistics, counters) are
    plainly averaged, since an adaptive step could e.g. make a variance negative.

    Its moments ``m_t``/``v_t`` are saved in checkpoints and restored on resume.
    """

    buffer_keys: frozenset[str] = frozenset()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.current_arrays is not None and self.local_keys:
            self.current_arrays = {k: v for k, v in self.current_arrays.items() if k not in self.local_keys}
        return messages

    def postprocess_aggregate(self, aggregated: Arrays, replies: list[Message]) -> Arrays:
        keys = [k for k in aggregated if k in self.buffer_keys]
        if not keys or not replies:
            return aggregated
        client_arrays = [record_to_arrays(next(iter(m.content.array_records.values()))) for m in replies]
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in replies]
        aggregated = dict(aggregated)
        aggregated.update(weighted_average(client_arrays, weights, keys))
        return aggregated

    def state_arrays(self) -> Arrays:
        out: Arrays = {}
        for name, moments in (("m_t", self.m_t), ("v_t", self.v_t)):
            for k, v in (moments or {}).items():
                out[f"{name}.{k}"] = np.asarray(v)
        return out

    def load_state_arrays(self, arrays: Arrays) -> None:
        m = {k[4:]: v for k, v in arrays.items() if k.startswith("m_t.")}
        v = {k[4:]: v for k, v in arrays.items() if k.startswith("v_t.")}
        self.m_t = m or None
        self.v_t = v or None


def build_strategy(
    settings: ServerSettings,
    local_keys: Iterable[str] = (),
    buffer_keys: Iterable[str] = (),
    round_offset: int = 0,
    recorder: RoundRecorder | None = None,
) -> JRASStrategyMixin:
    """The strategy named by ``settings.strategy``.

    Args:
        settings: server settings from the run config.
        local_keys: state keys that stay at the sites (normalisation entries for FedBN,
            ``retr.*`` when only the segmenter is aggregated).
        buffer_keys: state keys that are buffers (FedAdam averages them plainly).
        round_offset: rounds already done (resume).
        recorder: per-round bookkeeping.
    """
    common: dict[str, Any] = {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": settings.min_nodes,
        "min_evaluate_nodes": settings.min_nodes if settings.fraction_evaluate > 0 else 0,
        "min_available_nodes": settings.min_nodes,
    }
    name = settings.strategy
    strategy: JRASStrategyMixin
    if name == "fedavg":
        strategy = JRASFedAvg(**common)
    elif name == "fedprox":
        strategy = JRASFedProx(**common, proximal_mu=settings.proximal_mu)
    elif name == "fedbn":
        strategy = JRASFedBN(**common)
    elif name == "fedadam":
        strategy = JRASFedAdam(
            **common, eta=settings.server_lr, beta_1=settings.beta_1, beta_2=settings.beta_2, tau=settings.tau
        )
        strategy.buffer_keys = frozenset(buffer_keys)
    else:
        raise ValueError(f"unknown strategy {name!r}")
    strategy.setup_jras(local_keys, round_offset, recorder)
    return strategy
