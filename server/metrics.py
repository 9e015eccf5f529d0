"""Metrics of the sites' replies as the server aggregates them.

Entries that identify a site (``partition-id``) are dropped from aggregates. With
``evaluate_in_train``, train replies also carry the evaluation of the model the sites
received (an ``evaluate`` MetricRecord, or an ``evaluate-error`` ConfigRecord when it
failed): it is taken out of the replies before aggregation, aggregated as an evaluation
phase would, and handed to the recorder as that model's round's evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Message, MetricRecord, RecordDict

from federation.protocol import EVALUATION, EVALUATION_ERROR
from server.messages import site_label
from server.tracking import RoundRecorder

log = logging.getLogger(__name__)

PER_SITE_ONLY = ("partition-id",)
"""Reply metrics that identify a site and mean nothing averaged: dropped from aggregates."""

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]
"""Flower's metric aggregation: the replies' contents and the weighting key to one MetricRecord."""


def drop_per_site(metrics: MetricRecord | None) -> MetricRecord | None:
    """``metrics`` less the :data:`PER_SITE_ONLY` entries (``metrics`` itself if it has none)."""
    if metrics is None or not any(k in metrics for k in PER_SITE_ONLY):
        return metrics
    return MetricRecord({k: v for k, v in metrics.items() if k not in PER_SITE_ONLY})


def take_evaluations(
    rnd: int,
    replies: list[Message],
    aggregate: MetricsAggregation | None,
    weighted_by_key: str,
    recorder: RoundRecorder | None,
) -> None:
    """Remove the evaluation of round ``rnd``'s model from train replies (the
    ``evaluate`` MetricRecord, or the ``evaluate-error`` ConfigRecord of a site whose
    evaluation failed), aggregate it as an evaluation phase would, and hand it to the
    recorder.

    Args:
        rnd: the round whose model the sites evaluated.
        replies: the train replies (changed in place).
        aggregate: the strategy's evaluation metric aggregation (None: no aggregate).
        weighted_by_key: the metric that weights each site in the aggregate.
        recorder: per-round bookkeeping.
    """
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
    metrics = None
    if contents and aggregate is not None:
        metrics = drop_per_site(aggregate(contents, weighted_by_key))
    if recorder is not None:
        recorder.add_evaluation(rnd, sites, metrics, errors)
