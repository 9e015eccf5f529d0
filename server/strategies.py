"""Strategies of the J-RAS federation, on Flower's Message API.

All strategies share :class:`JRASStrategyMixin`, which adds to Flower's own:

* **local entries**: state keys that stay at the sites (FedBN's normalisation
  entries; the retriever when only the segmenter is aggregated) are neither sent
  nor aggregated; the global model keeps its values for them;
* **dtypes**: aggregated entries keep the model's dtypes (integer counters stay integers);
* **round offset**: after a resume, rounds are numbered on from the checkpoint;
* **update validation**: before aggregation every train reply is checked
  (:func:`~server.validation.validate_update`: keys, shapes, dtypes, finite values,
  update norm, and a positive finite ``num-examples``); failing replies are
  rejected and logged;
* **site failures**: error replies (a ClientApp that raised, a SuperNode that went
  away) are logged with the site's error text, and sites that sent nothing within
  the round timeout are logged as timed out; the round goes on with the others
  while at least ``min_train_nodes`` valid replies remain, else the aggregate is
  skipped and the global model stays as it is;
* **evaluation in the train exchange** (``evaluate_in_train``): each round's train
  messages also ask the sites to evaluate the model they carry (the previous round's
  aggregate) before training; the metrics come back in the train reply (an ``evaluate``
  MetricRecord, removed before aggregation) and are logged as that round's evaluation.
  Only the last round has an evaluation phase of its own: a round is one exchange;
* **bookkeeping**: per-site and aggregated metrics, failures (with their error
  text), timeouts, rejected replies and bytes of arrays sent and received go to a
  :class:`~server.tracking.RoundRecorder`.

:func:`build_strategy` picks FedAvg (default), FedProx, FedBN, FedAdam or a robust
aggregation (FedMedian, FedTrimmedAvg, Krum) from :class:`~server.settings.ServerSettings`;
:func:`with_privacy` wraps it in Flower's server-side fixed-clipping DP when ``dp = "fixed"``.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv

from federation.protocol import (
    EVALUATE_FIRST,
    EVALUATION,
    EVALUATION_ERROR,
    Arrays,
    cast_like,
    transfer_cast,
    weighted_average,
)
from server.settings import ServerSettings
from server.tracking import RoundRecorder
from server.validation import validate_update, validate_weight

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


def aggregation_order(msg: Message) -> tuple[int, int]:
    """Sort key of a train reply: replies are aggregated in this order, not in the order they
    arrived, so that the float sums (and a seeded federation's weights) do not depend on which
    site finished first. Simulated sites by ``partition-id``, others by node id, errors last."""
    if msg.has_error():
        return (2, int(msg.metadata.src_node_id))
    metrics = _metrics_of(msg)
    if "partition-id" in metrics:
        return (0, int(metrics["partition-id"]))
    return (1, int(msg.metadata.src_node_id))


def _drop_per_site(metrics: MetricRecord | None) -> MetricRecord | None:
    if metrics is None or not any(k in metrics for k in PER_SITE_ONLY):
        return metrics
    return MetricRecord({k: v for k, v in metrics.items() if k not in PER_SITE_ONLY})


_FLOWER_REASON = re.compile(r"^<class '([\w.]+)'>:<'(.*)'>$", re.DOTALL)


def error_text(msg: Message) -> str:
    """The error of an error reply as one readable line, ``Type: message``.

    Flower reports a ClientApp exception as ``<class 'pkg.Type'>:<'message'>``; a
    reply the SuperLink made up for a node that went away carries Flower's own reason.
    """
    reason = (msg.error.reason or "").strip() or f"error code {msg.error.code}"
    match = _FLOWER_REASON.match(reason)
    if match:
        reason = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}"
    return " ".join(reason.split())


def _metrics_of(msg: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        out.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return out


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _server_work(method: _Method) -> _Method:
    """Time a strategy step (preparing messages, screening and aggregating replies) into
    the round's ``server_time_s``."""

    @functools.wraps(method)
    def timed(self: JRASStrategyMixin, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            if self.recorder is not None:
                self.recorder.add_server_time(time.perf_counter() - t0)

    return timed  # type: ignore[return-value]


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
    round_timeout: float | None = None
    transfer_dtype: str = "float32"
    diagnostics_every: int = 1
    last_round: int = 0
    evaluate_in_train: bool = False
    _global: Arrays | None = None
    _outbox: dict[str, list[Message]] | None = None
    _screened: bool = False

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
    ) -> None:
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
        self._outbox = {}

    def wants_diagnostics(self, rnd: int) -> bool:
        """Whether round ``rnd``'s evaluation adds the retrieval diagnostics: every
        ``diagnostics_every``-th round and the last one (every round when the last is unknown)."""
        if self.last_round <= 0 or rnd >= self.last_round:
            return True
        return self.diagnostics_every > 0 and rnd % self.diagnostics_every == 0

    def evaluation_deferred(self, rnd: int) -> bool:
        """Whether round ``rnd``'s model is evaluated at the start of the next round's
        training instead of in an evaluation phase of its own (every round but the last,
        with ``evaluate_in_train``)."""
        folds = self.evaluate_in_train and float(getattr(self, "fraction_evaluate", 1.0)) > 0
        return folds and 0 < self.last_round and rnd < self.last_round

    def _evaluates_first(self, rnd: int, server_round: int) -> bool:
        """Whether round ``rnd``'s train messages also ask for the evaluation of the model
        they carry: round ``rnd - 1``'s, if this run made it (or a resumed run finds its
        record still waiting in the log)."""
        if not self.evaluation_deferred(rnd - 1) or rnd < 2:
            return False
        return server_round > 1 or (self.recorder is not None and self.recorder.pending_round == rnd - 1)

    # ------------------------------------------------------------------ helpers
    def _shared(self, arrays: ArrayRecord) -> ArrayRecord:
        if not self.local_keys:
            return arrays
        return ArrayRecord({k: v for k, v in arrays.items() if k not in self.local_keys})

    def _failures(self, rnd: int, phase: str, replies: list[Message]) -> None:
        """Log (and record) the phase's error replies with their text, and the sites that
        sent no reply at all within the round timeout."""
        sent = (self._outbox or {}).pop(phase, [])
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        for msg in replies:
            if not msg.has_error():
                continue
            site = f"node-{dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)}"
            text = error_text(msg)
            log.warning("round %d: %s failed at %s: %s", rnd, phase, site, text)
            if self.recorder is not None:
                self.recorder.add_site_error(phase, site, text)
        answered = {m.metadata.reply_to_message_id for m in replies}
        missing = [m for m in sent if m.metadata.message_id and m.metadata.message_id not in answered]
        for msg in missing:
            site = f"node-{msg.metadata.dst_node_id}"
            text = f"no reply within the round timeout ({self.round_timeout:g} s)" if self.round_timeout else "no reply"
            log.warning("round %d: %s at %s: %s", rnd, phase, site, text)
            if self.recorder is not None:
                self.recorder.add_site_error(phase, site, text)
        if self.recorder is not None and sent:
            self.recorder.set_round_stat(f"timeouts_{phase}", len(missing))

    def _record(self, phase: str, replies: list[Message], rnd: int = 0) -> None:
        self._failures(rnd, phase, replies)
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

    def _take_evaluations(self, rnd: int, replies: list[Message]) -> None:
        """Remove the evaluation of round ``rnd``'s model from train replies (the
        ``evaluate`` MetricRecord, or the ``evaluate-error`` ConfigRecord of a site whose
        evaluation failed), aggregate it as an evaluation phase would, and hand it to the
        recorder."""
        sites: dict[str, dict[str, float]] = {}
        errors: dict[str, str] = {}
        contents: list[RecordDict] = []
        for msg in replies:
            if msg.has_error():
                continue
            content = msg.content
            if EVALUATION_ERROR in content.config_records:
                errors[site_label(msg)] = str(content.config_records[EVALUATION_ERROR].get("error", "failed"))
                del content[EVALUATION_ERROR]
            if EVALUATION in content.metric_records:
                record = content.metric_records[EVALUATION]
                del content[EVALUATION]
                sites[site_label(msg)] = dict(record)
                contents.append(RecordDict({"metrics": record}))
        if not sites and not errors:
            return
        for site, text in errors.items():
            log.warning("round %d: evaluation failed at %s: %s", rnd, site, text)
        aggregate = getattr(self, "evaluate_metrics_aggr_fn", None)
        metrics = None
        if contents and aggregate is not None:
            metrics = _drop_per_site(aggregate(contents, getattr(self, "weighted_by_key", "num-examples")))
        if self.recorder is not None:
            self.recorder.add_evaluation(rnd, sites, metrics, errors)

    def _to_wire(self, messages: list[Message]) -> list[Message]:
        """Cast the outgoing model entries to the transfer dtype (in place; one cast for all)."""
        if self.transfer_dtype == "float32":
            return messages
        cast: dict[int, ArrayRecord] = {}
        for msg in messages:
            for name, record in list(msg.content.array_records.items()):
                if id(record) not in cast:
                    cast[id(record)] = arrays_to_record(transfer_cast(record_to_arrays(record), self.transfer_dtype))
                msg.content[name] = cast[id(record)]
        return messages

    def _from_wire(self, replies: list[Message]) -> None:
        """Turn the replies' model entries back to float32 (in place) before validation and aggregation."""
        if self.transfer_dtype == "float32":
            return
        for msg in replies:
            if msg.has_error():
                continue
            for name, record in list(msg.content.array_records.items()):
                msg.content[name] = arrays_to_record(transfer_cast(record_to_arrays(record), "float32"))

    def _sent(self, messages: list[Message]) -> None:
        if self.recorder is None:
            return
        self.recorder.add_traffic(sent=sum(
            record.count_bytes() for msg in messages for record in msg.content.array_records.values()
        ))

    def postprocess_aggregate(self, aggregated: Arrays, replies: list[Message]) -> Arrays:
        """Hook for subclasses: adjust the aggregated shared entries."""
        return aggregated

    # ------------------------------------------------------------------ validation
    def check_reply(self, msg: Message, reference: Arrays | None) -> str | None:
        """Why a (non-error) train reply must be rejected, or None."""
        if len(msg.content.array_records) != 1 or len(msg.content.metric_records) != 1:
            return (f"expected one ArrayRecord and one MetricRecord, got {len(msg.content.array_records)} "
                    f"and {len(msg.content.metric_records)}")
        metrics = next(iter(msg.content.metric_records.values()))
        key = getattr(self, "weighted_by_key", "num-examples")
        reason = validate_weight(metrics.get(key)) if key in metrics else f"no {key} in the metrics"
        if reason is not None:
            return reason
        if reference is None:
            return None
        try:
            arrays = record_to_arrays(next(iter(msg.content.array_records.values())))
        except Exception as exc:  # noqa: BLE001 - an undecodable array is a rejected reply
            return f"arrays cannot be read ({type(exc).__name__})"
        norm_keys = {k for k in reference if k not in self.buffer_keys}
        return validate_update(arrays, reference, self.max_update_norm, norm_keys)

    def screen_train_replies(self, rnd: int, replies: list[Message]) -> list[Message] | None:
        """Record the round's train replies and drop those failing :meth:`check_reply`.

        Returns the replies to aggregate, in :func:`aggregation_order` (error replies are
        kept for Flower to count), or
        None when fewer than ``min_train_nodes`` valid ones remain (after failed, timed-out
        and rejected sites): then the round's aggregate is skipped and the global model
        stays as it is.
        """
        self._take_evaluations(rnd - 1, replies)
        self._record("train", replies, rnd)
        self._from_wire(replies)
        reference = None
        if self._global is not None:
            reference = {k: v for k, v in self._global.items() if k not in self.local_keys}
        kept: list[Message] = []
        rejected = 0
        for msg in replies:
            reason = None if msg.has_error() else self.check_reply(msg, reference)
            if reason is None:
                kept.append(msg)
            else:
                rejected += 1
                log.warning("round %d: rejected the update of %s: %s", rnd, site_label(msg), reason)
        if self.recorder is not None:
            self.recorder.set_round_stat("rejected_replies", rejected)
        kept.sort(key=aggregation_order)
        valid = sum(1 for m in kept if not m.has_error())
        needed = int(getattr(self, "min_train_nodes", 1))
        if valid < needed:
            log.warning(
                "round %d: %d valid update(s) (%d rejected, %d failed), fewer than min-nodes %d: "
                "aggregation skipped, the global model is unchanged",
                rnd, valid, rejected, sum(1 for m in replies if m.has_error()), needed,
            )
            if self.recorder is not None:
                self.recorder.set_round_stat("aggregate_skipped", 1)
            return None
        return kept

    # ------------------------------------------------------------------ Strategy API
    @_server_work
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        if self.recorder is not None:
            self.recorder.start_round(rnd)
        self._global = record_to_arrays(arrays)
        if self._evaluates_first(rnd, server_round):
            config = ConfigRecord({**dict(config), EVALUATE_FIRST: True, "diagnostics": self.wants_diagnostics(rnd - 1)})
        messages = self._to_wire(list(super().configure_train(rnd, self._shared(arrays), config, grid)))  # type: ignore[misc]
        self._sent(messages)
        self._outbox = {**(self._outbox or {}), "train": messages}
        return messages

    @_server_work
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        replies = list(replies)
        if self._screened:  # already screened by a wrapper (DP) before clipping
            self._screened = False
        else:
            screened = self.screen_train_replies(rnd, replies)
            if screened is None:
                return None, None
            replies = screened
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

    @_server_work
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        if self.recorder is not None:
            self.recorder.start_round(rnd)
        if self.evaluation_deferred(rnd):
            return []
        config = ConfigRecord({**dict(config), "diagnostics": self.wants_diagnostics(rnd)})
        messages = self._to_wire(list(super().configure_evaluate(rnd, self._shared(arrays), config, grid)))  # type: ignore[misc]
        self._sent(messages)
        self._outbox = {**(self._outbox or {}), "evaluate": messages}
        return messages

    @_server_work
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        replies = list(replies)
        self._record("evaluate", replies, rnd)
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
    else:
        raise ValueError(f"unknown strategy {name!r}")
    strategy.setup_jras(local_keys, round_offset, recorder, settings.max_update_norm, buffer_keys, settings.round_timeout,
                        settings.transfer_dtype, settings.diagnostics_every, round_offset + settings.num_rounds,
                        settings.evaluate_in_train)
    return strategy


VARIANCE_SUFFIXES = ("running_var",)
"""Entries that must stay non-negative after DP noise (BatchNorm running variances)."""


class JRASServerSideDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP with server-side fixed clipping around a J-RAS strategy.

    What it adds to Flower's wrapper so that the J-RAS strategy keeps working:

    * replies are validated (and rejected ones counted) *before* clipping, by the inner
      strategy's :meth:`~JRASStrategyMixin.screen_train_replies`;
    * updates are clipped against the entries that were sent (local entries excluded),
      in the same key order as the replies;
    * noise goes to the aggregated floating-point shared entries only: local entries keep
      the global model's values, integer counters stay noise-free, variances are kept >= 0;
    * the noise multiplier, clipping norm and noise stdev are round stats of the recorder.

    The inner strategy keeps round offset, checkpoint state and bookkeeping: pass it (not
    the wrapper) to the round-end function.
    """

    def __init__(self, strategy: JRASStrategyMixin, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int):
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)  # type: ignore[arg-type]
        self.inner = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.current_arrays = self.inner._shared(arrays)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.inner
        rnd = server_round + inner.round_offset
        if inner.recorder is not None:
            inner.recorder.set_round_stat("dp_noise_multiplier", self.noise_multiplier)
            inner.recorder.set_round_stat("dp_clipping_norm", self.clipping_norm)
            inner.recorder.set_round_stat(
                "dp_noise_stdv", compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
            )
        kept = inner.screen_train_replies(rnd, list(replies))
        if kept is None:
            return None, None
        order = list(self.current_arrays.keys())
        for msg in kept:
            if msg.has_error():
                continue
            name, record = next(iter(msg.content.array_records.items()))
            if list(record.keys()) != order:
                msg.content[name] = ArrayRecord({k: record[k] for k in order})
        inner._screened = True
        try:
            return super().aggregate_train(server_round, kept)
        finally:
            inner._screened = False

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        clean = record_to_arrays(aggregated_arrays)
        noisy_keys = [
            k for k, v in clean.items() if k not in self.inner.local_keys and np.issubdtype(v.dtype, np.floating)
        ]
        noised = record_to_arrays(
            super()._add_noise_to_aggregated_arrays(arrays_to_record({k: clean[k] for k in noisy_keys}))
        )
        for k in noised:
            if k.endswith(VARIANCE_SUFFIXES):
                noised[k] = np.maximum(noised[k], 0).astype(clean[k].dtype)
        out = dict(clean)
        out.update(noised)
        return arrays_to_record(out)


def with_privacy(strategy: JRASStrategyMixin, settings: ServerSettings) -> Strategy:
    """The strategy to run: ``strategy`` itself, or wrapped in :class:`JRASServerSideDP` when ``dp = "fixed"``."""
    if settings.dp == "none":
        return strategy  # type: ignore[return-value]
    log.info(
        "differential privacy: server-side fixed clipping, noise multiplier %g, clipping norm %g, %d sampled sites",
        settings.dp_noise_multiplier, settings.dp_clipping_norm, settings.dp_sampled,
    )
    return JRASServerSideDP(strategy, settings.dp_noise_multiplier, settings.dp_clipping_norm, settings.dp_sampled)
