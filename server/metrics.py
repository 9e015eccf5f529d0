"""Metrics of the sites' replies as the server aggregates them.

A site's metrics are claims: before any of them reaches an aggregate (or is logged as the
round's), they are checked against their ranges (:func:`~server.validation.validate_metrics`:
finite; Dice and other fractions in [0, 1]; losses, times, distances, counts >= 0). A train
reply with an out-of-range metric has its metrics left out of the train aggregate (its
update may still be aggregated, if valid); an evaluation with one, or with an invalid example
count, is left out of the evaluation aggregate. Each is logged by node id, and noted in the
round's errors of that site; the per-site entries of the round's record keep what each site
sent. The accepted replies weigh as :func:`~server.screening.apply_example_weights` says.

Entries that identify a site (``partition-id``) are dropped from aggregates. With
``evaluate_in_train``, train replies also carry the evaluation of the model the sites
received (an ``evaluate`` MetricRecord, or an ``evaluate-error`` ConfigRecord when it
failed): it is taken out of the replies before aggregation, aggregated as an evaluation
phase would (:func:`aggregate_evaluations`, as for the evaluation phase's replies), and
handed to the recorder as that model's round's evaluation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

from flwr.app import Message, MetricRecord, RecordDict

from federation.protocol import EVALUATION, EVALUATION_ERROR
from server.messages import site_label
from server.screening import apply_example_weights
from server.tracking import RoundRecorder
from server.validation import (
    DEFAULT_WEIGHTING,
    ExampleWeighting,
    validate_example_count,
    validate_metrics,
)

log = logging.getLogger(__name__)

PER_SITE_ONLY = ("partition-id",)
"""Reply metrics that identify a site and mean nothing averaged: dropped from aggregates."""

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]
"""Flower's metric aggregation: the replies' contents and the weighting key to one MetricRecord."""


def mean_of_measured(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Each metric's weighted mean over the sites that measured it: Flower's weighted
    aggregation of MetricRecords, except that a NaN value (a site that could not measure the
    metric, e.g. the Dice of a class none of its cases has) is left out of that metric's mean
    instead of making it NaN. A metric no site measured stays NaN. List-valued metrics are
    averaged element by element in the same way.

    Args:
        records: one RecordDict per site, each with one MetricRecord (already checked).
        weighting_metric_name: the metric that weights each site (left out of the result).
    """
    sums: dict[str, list[float]] = {}
    weights: dict[str, list[float]] = {}
    is_list: dict[str, bool] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weighting_metric_name])
        for key, value in metrics.items():
            if key == weighting_metric_name:
                continue
            values = [float(v) for v in value] if isinstance(value, list) else [float(value)]
            is_list[key] = isinstance(value, list)
            s, ws = sums.setdefault(key, [0.0] * len(values)), weights.setdefault(key, [0.0] * len(values))
            for i, v in enumerate(values[: len(s)]):
                if not math.isnan(v):
                    s[i] += w * v
                    ws[i] += w
    out = MetricRecord()
    for key, s in sums.items():
        means = [si / wi if wi > 0 else math.nan for si, wi in zip(s, weights[key], strict=True)]
        out[key] = means if is_list[key] else means[0]
    return out


def drop_per_site(metrics: MetricRecord | None) -> MetricRecord | None:
    """``metrics`` less the :data:`PER_SITE_ONLY` entries (``metrics`` itself if it has none)."""
    if metrics is None or not any(k in metrics for k in PER_SITE_ONLY):
        return metrics
    return MetricRecord({k: v for k, v in metrics.items() if k not in PER_SITE_ONLY})


def untrusted_metrics(rnd: int, replies: list[Message], weighted_by_key: str, recorder: RoundRecorder | None) -> set[int]:
    """The train replies (by ``id``) whose metrics are out of range: logged by node id, noted
    in the site's errors (phase ``train``), counted in the round's ``dropped_metrics`` stat.
    Their updates are screened as any other's; their metrics stay out of the aggregate.

    Args:
        rnd: the (global) round.
        replies: the round's train replies (the ``evaluate`` records already taken out).
        weighted_by_key: the example count, checked with the update instead.
        recorder: per-round bookkeeping.
    """
    dropped: set[int] = set()
    for msg in replies:
        if msg.has_error() or len(msg.content.metric_records) != 1:
            continue
        reason = validate_metrics(next(iter(msg.content.metric_records.values())), skip=(weighted_by_key,))
        if reason is None:
            continue
        dropped.add(id(msg))
        log.warning("round %d: dropped the train metrics of %s: %s", rnd, site_label(msg), reason)
        if recorder is not None:
            recorder.add_site_error("train", site_label(msg), f"metrics dropped: {reason}")
    if recorder is not None:
        recorder.set_round_stat("dropped_metrics", len(dropped))
    return dropped


def aggregate_train_metrics(
    replies: list[Message], dropped: set[int], aggregate: MetricsAggregation | None, weighted_by_key: str
) -> MetricRecord | None:
    """The train metrics aggregate over the kept (weighted) replies, less those whose metrics
    were dropped (:func:`untrusted_metrics`); None when none is left or no aggregation is set."""
    contents = [m.content for m in replies if not m.has_error() and id(m) not in dropped]
    if not contents or aggregate is None:
        return None
    return drop_per_site(aggregate(contents, weighted_by_key))


def keep_weights_only(replies: list[Message], weighted_by_key: str) -> None:
    """Reduce each (non-error) reply's MetricRecord to its weight, in place, once its
    metrics are aggregated here: Flower's strategies then aggregate the arrays alone, with
    these weights, and a site's metric keys (dropped ones included) cannot make their
    replies inconsistent (which would end the run)."""
    for msg in replies:
        if msg.has_error():
            continue
        name, record = next(iter(msg.content.metric_records.items()))
        msg.content[name] = MetricRecord({weighted_by_key: record[weighted_by_key]})


def only_metric_record(msg: Message) -> MetricRecord | None:
    """The one MetricRecord of a reply, or None when it has none or several."""
    records = list(msg.content.metric_records.values())
    return records[0] if len(records) == 1 else None


def evaluation_problem(record: MetricRecord | None, weighted_by_key: str) -> str | None:
    """Why a site's evaluation must be left out of the aggregate (no single MetricRecord, an
    invalid example count, a metric out of range), or None."""
    if record is None:
        return "expected one MetricRecord"
    key = weighted_by_key
    reason = validate_example_count(record.get(key)) if key in record else f"no {key} in the metrics"
    return reason or validate_metrics(record, skip=(key,))


def aggregate_evaluations(
    rnd: int,
    records: Sequence[tuple[str, MetricRecord | None]],
    aggregate: MetricsAggregation | None,
    weighted_by_key: str,
    weighting: ExampleWeighting,
) -> tuple[dict[str, str], MetricRecord | None]:
    """Check each site's evaluation (its example count and metric ranges), weigh the accepted
    ones (``example-weights``) and aggregate them. The records are not changed.

    Args:
        rnd: the round whose model was evaluated.
        records: ``(site, evaluation MetricRecord)`` of each site that evaluated (None: a
            reply without exactly one MetricRecord, dropped).
        aggregate: the strategy's evaluation metric aggregation (None: no aggregate).
        weighted_by_key: the metric that weights each site (its example count).
        weighting: the ``example-weights`` policy.

    Returns:
        Why each dropped site's evaluation was left out (logged by node id), and the
        aggregate of the others (None when none is left or no aggregation is set).
    """
    dropped: dict[str, str] = {}
    accepted: list[tuple[str, MetricRecord]] = []
    for site, record in records:
        reason = evaluation_problem(record, weighted_by_key)
        if reason is not None:
            dropped[site] = reason
            log.warning("round %d: dropped the evaluation of %s: %s", rnd, site, reason)
        elif record is not None:
            accepted.append((site, MetricRecord(dict(record))))
    if not accepted or aggregate is None:
        return dropped, None
    apply_example_weights(rnd, accepted, weighted_by_key, weighting, "evaluation")
    contents = [RecordDict({"metrics": record}) for _, record in accepted]
    return dropped, drop_per_site(aggregate(contents, weighted_by_key))


def take_evaluations(
    rnd: int,
    replies: list[Message],
    aggregate: MetricsAggregation | None,
    weighted_by_key: str,
    recorder: RoundRecorder | None,
    weighting: ExampleWeighting = DEFAULT_WEIGHTING,
) -> None:
    """Remove the evaluation of round ``rnd``'s model from train replies (the
    ``evaluate`` MetricRecord, or the ``evaluate-error`` ConfigRecord of a site whose
    evaluation failed), aggregate it as an evaluation phase would
    (:func:`aggregate_evaluations`), and hand it to the recorder.

    Args:
        rnd: the round whose model the sites evaluated.
        replies: the train replies (changed in place).
        aggregate: the strategy's evaluation metric aggregation (None: no aggregate).
        weighted_by_key: the metric that weights each site in the aggregate.
        recorder: per-round bookkeeping.
        weighting: the ``example-weights`` policy.
    """
    sites: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    records: list[tuple[str, MetricRecord]] = []
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
            records.append((site_label(msg), record))
    if not sites and not errors:
        return
    for site, text in errors.items():
        log.warning("round %d: evaluation failed at %s: %s", rnd, site, text)
    dropped, metrics = aggregate_evaluations(rnd, records, aggregate, weighted_by_key, weighting)
    errors.update({site: f"evaluation dropped: {reason}" for site, reason in dropped.items()})
    if recorder is not None:
        recorder.add_evaluation(rnd, sites, metrics, errors)
