"""Strategies of the J-RAS federation, on Flower's Message API.

All strategies share :class:`JRASStrategyMixin`, which adds to Flower's own:

* **local entries**: state keys that stay at the sites (FedBN's normalisation
  entries; the retriever when only the segmenter is aggregated) are neither sent
  nor aggregated; the global model keeps its values for them (:mod:`server.local_entries`);
* **dtypes**: aggregated entries keep the model's dtypes (integer counters stay integers);
  entries travel in the transfer dtype (:mod:`server.transfer`);
* **round offset**: after a resume, rounds are numbered on from the checkpoint;
* **update validation**: before aggregation every train reply is checked
  (:func:`~server.validation.validate_update`: keys, shapes, dtypes, finite values,
  plausible buffers, the absolute update-norm bound, and a positive whole ``num-examples``),
  then against the round's own update-norm bound (``norm-bound-factor`` times the median);
  failing replies are rejected and logged (:mod:`server.screening`);
* **example weights**: the kept replies' claimed ``num-examples`` become their aggregation
  weights under ``example-weights`` (claimed, capped relative to the round's median, or
  equal), in one place for every weighted strategy and the evaluation aggregates;
* **metric ranges**: a reply's metrics reach an aggregate only if each is finite and in
  its range (Dice in [0, 1], losses and times >= 0, ...); out-of-range ones are left out
  and logged by node id, the update itself may still be aggregated (:mod:`server.metrics`).
  The train metrics are aggregated here; Flower's strategies then see each reply's weight
  alone and aggregate the arrays;
* **site failures**: error replies (a ClientApp that raised, a SuperNode that went
  away) are logged with the site's error text, and sites that sent nothing within
  the round timeout are logged as timed out; the round goes on with the others
  while at least ``min_train_nodes`` valid replies remain, else the aggregate is
  skipped and the global model stays as it is;
* **evaluation in the train exchange** (``evaluate_in_train``): each round's train
  messages also ask the sites to evaluate the model they carry (the previous round's
  aggregate) before training; the metrics come back in the train reply (an ``evaluate``
  MetricRecord, removed before aggregation) and are logged as that round's evaluation.
  Only the last round has an evaluation phase of its own: a round is one exchange
  (:mod:`server.schedule`, :mod:`server.metrics`);
* **bookkeeping**: per-site and aggregated metrics, failures (with their error
  text), timeouts, rejected replies and bytes of arrays sent and received go to a
  :class:`~server.tracking.RoundRecorder` (:mod:`server.bookkeeping`).

:func:`build_strategy` picks FedAvg (default), FedProx, FedBN, FedAdam, FedAvgM or a robust
aggregation (FedMedian, FedTrimmedAvg, Krum) from :class:`~server.settings.ServerSettings`;
:func:`server.privacy.with_privacy` wraps it in Flower's server-side fixed-clipping DP when
``dp = "fixed"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum

from federation.protocol import Arrays, weighted_average
from federation.records import arrays_to_record, record_to_arrays
from server.bookkeeping import record_replies, record_sent, server_work
from server.local_entries import merge_into_global, shared_record, without_local
from server.messages import error_text, site_label
from server.metrics import (
    aggregate_evaluations,
    aggregate_train_metrics,
    keep_weights_only,
    mean_of_measured,
    only_metric_record,
    take_evaluations,
    untrusted_metrics,
)
from server.schedule import (
    evaluate_config,
    evaluate_first_config,
    is_diagnostics_round,
    is_evaluation_deferred,
)
from server.screening import Verdict, keep_valid, screen_reply, weigh_replies
from server.settings import ServerSettings
from server.tracking import RoundRecorder
from server.transfer import from_wire, to_wire
from server.validation import DEFAULT_NORM_BOUND_FACTOR, DEFAULT_WEIGHTING, ExampleWeighting

__all__ = [
    "JRASFedAdam",
    "JRASFedAvgM",
    "JRASFedAvg",
    "JRASFedBN",
    "JRASFedMedian",
    "JRASFedProx",
    "JRASFedTrimmedAvg",
    "JRASKrum",
    "JRASStrategyMixin",
    "arrays_to_record",
    "build_strategy",
    "error_text",
    "record_to_arrays",
    "site_label",
]


class JRASStrategyMixin:
    """Local entries, dtype restoration, round offset, update validation and bookkeeping
    for a FedAvg-family strategy.

    Must come before the Flower strategy in the bases. Call :meth:`setup_jras` once.
    """

    local_keys: frozenset[str] = frozenset()
    buffer_keys: frozenset[str] = frozenset()
    round_offset: int = 0
    recorder: RoundRecorder | None = None
    max_update_norm: float = 0.0
    norm_bound_factor: float = DEFAULT_NORM_BOUND_FACTOR
    weighting: ExampleWeighting = DEFAULT_WEIGHTING
    round_timeout: float | None = None
    transfer_dtype: str = "float32"
    diagnostics_every: int = 1
    last_round: int = 0
    evaluate_in_train: bool = False
    _global: Arrays | None = None
    _outbox: dict[str, list[Message]] | None = None
    _screened: bool = False
    _train_metrics: MetricRecord | None = None

    def setup_jras(
        self,
        local_keys: Iterable[str] = (),
        round_offset: int = 0,
        recorder: RoundRecorder | None = None,
        max_update_norm: float = 0.0,
        buffer_keys: Iterable[str] = (),
        round_timeout: float | None = None,
        transfer_dtype: str = "float32",
        diagnostics_every: int = 1,
        last_round: int = 0,
        evaluate_in_train: bool = False,
        norm_bound_factor: float = DEFAULT_NORM_BOUND_FACTOR,
        weighting: ExampleWeighting = DEFAULT_WEIGHTING,
    ) -> None:
        """Set what the J-RAS additions need (see :func:`build_strategy` for the arguments)."""
        self.local_keys = frozenset(local_keys)
        self.buffer_keys = frozenset(buffer_keys)
        self.round_offset = int(round_offset)
        self.recorder = recorder
        self.max_update_norm = float(max_update_norm)
        self.round_timeout = round_timeout
        self.transfer_dtype = transfer_dtype
        self.diagnostics_every = int(diagnostics_every)
        self.last_round = int(last_round)
        self.evaluate_in_train = bool(evaluate_in_train)
        self.norm_bound_factor = float(norm_bound_factor)
        self.weighting = weighting
        self._outbox = {}

    # ------------------------------------------------------------------ rounds
    def global_round(self, server_round: int) -> int:
        """Flower's round counter as the run's round (numbered on from a resumed checkpoint)."""
        return server_round + self.round_offset

    def wants_diagnostics(self, rnd: int) -> bool:
        """Whether round ``rnd``'s evaluation adds the retrieval diagnostics: every
        ``diagnostics_every``-th round and the last one (every round when the last is unknown)."""
        return is_diagnostics_round(rnd, self.last_round, self.diagnostics_every)

    def evaluation_deferred(self, rnd: int) -> bool:
        """Whether round ``rnd``'s model is evaluated at the start of the next round's
        training instead of in an evaluation phase of its own (every round but the last,
        with ``evaluate_in_train``)."""
        fraction_evaluate = float(getattr(self, "fraction_evaluate", 1.0))
        return is_evaluation_deferred(rnd, self.last_round, self.evaluate_in_train, fraction_evaluate)

    def _evaluates_first(self, rnd: int, server_round: int) -> bool:
        """Whether round ``rnd``'s train messages also ask for the evaluation of the model
        they carry: round ``rnd - 1``'s, if this run made it (or a resumed run finds its
        record still waiting in the log)."""
        if not self.evaluation_deferred(rnd - 1) or rnd < 2:
            return False
        return server_round > 1 or (self.recorder is not None and self.recorder.pending_round == rnd - 1)

    # ------------------------------------------------------------------ helpers
    def _weighted_by_key(self) -> str:
        return getattr(self, "weighted_by_key", "num-examples")

    def _send(self, phase: str, messages: list[Message]) -> list[Message]:
        """Cast the phase's outgoing messages for the wire, count their bytes and keep them
        to find the sites that do not answer."""
        messages = to_wire(messages, self.transfer_dtype)
        record_sent(messages, self.recorder)
        self._outbox = {**(self._outbox or {}), phase: messages}
        return messages

    def _record(self, phase: str, replies: list[Message], rnd: int = 0) -> None:
        """Log and record the phase's replies against the messages that went out."""
        sent = (self._outbox or {}).pop(phase, [])
        record_replies(rnd, phase, sent, replies, self.round_timeout, self.recorder)

    def postprocess_aggregate(self, aggregated: Arrays, replies: list[Message]) -> Arrays:
        """Hook for subclasses: adjust the aggregated shared entries."""
        return aggregated

    def average_buffers_plainly(self, aggregated: Arrays, replies: list[Message]) -> Arrays:
        """``aggregated`` with its buffer entries replaced by the replies' weighted mean: a
        server optimiser's step is for trained parameters (it could e.g. make a variance
        negative)."""
        keys = [k for k in aggregated if k in self.buffer_keys]
        if not keys or not replies:
            return aggregated
        client_arrays = [record_to_arrays(next(iter(m.content.array_records.values()))) for m in replies]
        key = self._weighted_by_key()
        weights = [float(next(iter(m.content.metric_records.values()))[key]) for m in replies]
        aggregated = dict(aggregated)
        aggregated.update(weighted_average(client_arrays, weights, keys))
        return aggregated

    # ------------------------------------------------------------------ validation
    def check_reply(self, msg: Message, reference: Arrays | None) -> Verdict:
        """Why a (non-error) train reply must be rejected (None: accepted), and its update norm."""
        return screen_reply(msg, reference, self._weighted_by_key(), self.max_update_norm, self.buffer_keys)

    def screen_train_replies(self, rnd: int, replies: list[Message]) -> list[Message] | None:
        """Record the round's train replies, drop those failing :meth:`check_reply` or the
        round's relative update-norm bound, weigh the others (``example-weights``) and
        aggregate their in-range train metrics (kept for :meth:`aggregate_train`).

        Returns the replies to aggregate, in :func:`~server.screening.aggregation_order`
        (error replies are kept for Flower to count; the others' MetricRecords reduced to
        their weights), or None when fewer than ``min_train_nodes`` valid ones remain
        (after failed, timed-out and rejected sites): then the round's aggregate is skipped
        and the global model stays as it is.
        """
        key = self._weighted_by_key()
        aggregate = getattr(self, "evaluate_metrics_aggr_fn", None)
        take_evaluations(rnd - 1, replies, aggregate, key, self.recorder, self.weighting)
        self._record("train", replies, rnd)
        dropped = untrusted_metrics(rnd, replies, key, self.recorder)
        from_wire(replies, self.transfer_dtype)
        reference = None
        if self._global is not None:
            reference = without_local(self._global, self.local_keys)
        needed = int(getattr(self, "min_train_nodes", 1))
        kept = keep_valid(rnd, replies, lambda msg: self.check_reply(msg, reference), needed, self.recorder,
                          self.norm_bound_factor)
        self._train_metrics = None
        if kept is None:
            return None
        weigh_replies(rnd, kept, key, self.weighting, self.recorder)
        self._train_metrics = aggregate_train_metrics(kept, dropped, getattr(self, "train_metrics_aggr_fn", None), key)
        keep_weights_only(kept, key)
        return kept

    # ------------------------------------------------------------------ Strategy API
    @server_work
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = self.global_round(server_round)
        if self.recorder is not None:
            self.recorder.start_round(rnd)
        self._global = record_to_arrays(arrays)
        if self._evaluates_first(rnd, server_round):
            config = evaluate_first_config(config, self.wants_diagnostics(rnd - 1))
        messages = list(super().configure_train(rnd, shared_record(arrays, self.local_keys), config, grid))  # type: ignore[misc]
        return self._send("train", messages)

    @server_work
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.global_round(server_round)
        replies = list(replies)
        if self._screened:  # already screened by a wrapper (DP) before clipping
            self._screened = False
        else:
            screened = self.screen_train_replies(rnd, replies)
            if screened is None:
                return None, None
            replies = screened
        aggregated, _ = super().aggregate_train(rnd, replies)  # type: ignore[misc]
        metrics, self._train_metrics = self._train_metrics, None
        if metrics is not None and self.recorder is not None:
            self.recorder.add_global_metrics("train", metrics)
        if aggregated is None:
            return None, metrics
        shared = self.postprocess_aggregate(record_to_arrays(aggregated), [m for m in replies if not m.has_error()])
        return merge_into_global(self._global, shared), metrics

    @server_work
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = self.global_round(server_round)
        if self.recorder is not None:
            self.recorder.start_round(rnd)
        if self.evaluation_deferred(rnd):
            return []
        config = evaluate_config(config, self.wants_diagnostics(rnd), final=0 < self.last_round <= rnd)
        messages = list(super().configure_evaluate(rnd, shared_record(arrays, self.local_keys), config, grid))  # type: ignore[misc]
        return self._send("evaluate", messages)

    @server_work
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = self.global_round(server_round)
        replies = list(replies)
        self._record("evaluate", replies, rnd)
        records = [(site_label(m), only_metric_record(m)) for m in replies if not m.has_error()]
        aggregate = getattr(self, "evaluate_metrics_aggr_fn", None)
        dropped, metrics = aggregate_evaluations(rnd, records, aggregate, self._weighted_by_key(), self.weighting)
        if self.recorder is not None:
            for site, reason in dropped.items():
                self.recorder.add_site_error("evaluate", site, f"evaluation dropped: {reason}")
            if metrics is not None:
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


class JRASFedMedian(JRASStrategyMixin, FedMedian):
    """Coordinate-wise median of the sites' entries (robust to a minority of outliers)."""


class JRASFedTrimmedAvg(JRASStrategyMixin, FedTrimmedAvg):
    """Coordinate-wise mean after cutting ``beta`` of the sites at each tail."""


class JRASKrum(JRASStrategyMixin, Krum):
    """Krum: the one site update closest to its ``n - f - 2`` nearest neighbours."""


class JRASFedAdam(JRASStrategyMixin, FedAdam):
    """FedAdam on the trained parameters; buffers (running statistics, counters) are
    plainly averaged, since an adaptive step could e.g. make a variance negative.

    Its moments ``m_t``/``v_t`` are saved in checkpoints and restored on resume.
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.current_arrays is not None and self.local_keys:
            self.current_arrays = without_local(self.current_arrays, self.local_keys)
        return messages

    def postprocess_aggregate(self, aggregated: Arrays, replies: list[Message]) -> Arrays:
        return self.average_buffers_plainly(aggregated, replies)

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


class JRASFedAvgM(JRASStrategyMixin, FedAvgM):
    """FedAvg with server momentum (FedAvgM): the averaged update is a pseudo-gradient that
    a heavy-ball buffer accumulates, ``v <- momentum * v + (w - mean_i w_i)``, and the
    global model steps ``w <- w - server_learning_rate * v``. Buffers (running statistics,
    counters) are plainly averaged, as under :class:`JRASFedAdam`.

    Its momentum buffer is saved in checkpoints and restored on resume.
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        # the step starts from the model the sites received (the global model may have been
        # replaced between rounds, e.g. on resume, and its buffers are averaged plainly)
        self.current_arrays = shared_record(arrays, self.local_keys)
        return messages

    def postprocess_aggregate(self, aggregated: Arrays, replies: list[Message]) -> Arrays:
        return self.average_buffers_plainly(aggregated, replies)

    def state_arrays(self) -> Arrays:
        keys = list(self.current_arrays.keys()) if self.current_arrays is not None else []
        if self.momentum_vector is None or len(keys) != len(self.momentum_vector):
            return {}
        return {f"momentum.{k}": np.asarray(v) for k, v in zip(keys, self.momentum_vector, strict=True)}

    def load_state_arrays(self, arrays: Arrays) -> None:
        momentum = {k[len("momentum."):]: v for k, v in arrays.items() if k.startswith("momentum.")}
        self.momentum_vector = list(momentum.values()) or None


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
        buffer_keys: state keys that are buffers (FedAdam and FedAvgM average them plainly).
        round_offset: rounds already done (resume).
        recorder: per-round bookkeeping.
    """
    common: dict[str, Any] = {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": settings.min_nodes,
        "min_evaluate_nodes": settings.min_nodes if settings.fraction_evaluate > 0 else 0,
        "min_available_nodes": settings.min_nodes,
        "train_metrics_aggr_fn": mean_of_measured,
        "evaluate_metrics_aggr_fn": mean_of_measured,
    }
    name = settings.strategy
    strategy: JRASStrategyMixin
    if name == "fedmedian":
        strategy = JRASFedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = JRASFedTrimmedAvg(**common, beta=settings.trim_beta)
    elif name == "krum":
        strategy = JRASKrum(**common, num_malicious_nodes=settings.krum_num_malicious)
    elif name == "fedavg":
        strategy = JRASFedAvg(**common)
    elif name == "fedprox":
        strategy = JRASFedProx(**common, proximal_mu=settings.proximal_mu)
    elif name == "fedbn":
        strategy = JRASFedBN(**common)
    elif name == "fedadam":
        strategy = JRASFedAdam(
            **common, eta=settings.server_lr, beta_1=settings.beta_1, beta_2=settings.beta_2, tau=settings.tau
        )
    elif name == "fedavgm":
        strategy = JRASFedAvgM(**common, server_learning_rate=settings.server_learning_rate,
                               server_momentum=settings.server_momentum)
    else:
        raise ValueError(f"unknown strategy {name!r}")
    strategy.setup_jras(local_keys, round_offset, recorder, settings.max_update_norm, buffer_keys, settings.round_timeout,
                        settings.transfer_dtype, settings.diagnostics_every, round_offset + settings.num_rounds,
                        settings.evaluate_in_train, settings.norm_bound_factor, settings.weighting)
    return strategy
