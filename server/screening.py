"""Which of a round's train replies are aggregated, and how much each one weighs.

Every (non-error) train reply is checked before aggregation (:func:`screen_reply`): one
ArrayRecord and one MetricRecord, a valid example count (``num-examples``: a positive whole
number), and an update that fits the global model (:func:`~server.validation.validate_update`:
keys, shapes, dtypes, finite values, plausible buffers, the absolute update-norm bound
``max-update-norm``). Then :func:`keep_valid` applies the round's relative bound (an update
norm above ``norm-bound-factor`` times the median of the round's, with at least three
replies: :func:`~server.validation.relative_norm_bound`). Failing replies are rejected and
logged by node id; the rest are put in :func:`aggregation_order`; below
``min_train_nodes`` valid replies the round's aggregate is skipped and the global model
stays as it is. Last, :func:`apply_example_weights` replaces each kept reply's claimed count
with its aggregation weight (``example-weights``), the one place where weights are set for
every weighted strategy (FedAvg, FedProx, FedBN, FedAdam, their DP wrapper, and the
evaluation aggregates of :mod:`server.metrics`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

from flwr.app import Message, MetricRecord

from federation.protocol import Arrays
from federation.records import record_to_arrays
from server.messages import metrics_of, site_label
from server.tracking import RoundRecorder
from server.validation import (
    ExampleWeighting,
    relative_norm_bound,
    update_norm,
    validate_example_count,
    validate_update,
)

log = logging.getLogger(__name__)


class Verdict(NamedTuple):
    """The screening of one train reply."""

    reason: str | None
    """Why it is rejected (None: accepted so far)."""
    norm: float = math.nan
    """Its update norm over the trained entries (NaN: not measured), for the round's relative bound."""


def aggregation_order(msg: Message) -> tuple[int, int]:
    """Sort key of a train reply: replies are aggregated in this order, not in the order they
    arrived, so that the float sums (and a seeded federation's weights) do not depend on which
    site finished first. Simulated sites by ``partition-id``, others by node id, errors last."""
    if msg.has_error():
        return (2, int(msg.metadata.src_node_id))
    metrics = metrics_of(msg)
    if "partition-id" in metrics:
        return (0, int(metrics["partition-id"]))
    return (1, int(msg.metadata.src_node_id))


def screen_reply(
    msg: Message,
    reference: Arrays | None,
    weighted_by_key: str = "num-examples",
    max_update_norm: float = 0.0,
    buffer_keys: Collection[str] = (),
) -> Verdict:
    """Why a (non-error) train reply must be rejected (None: accepted), and its update norm.

    Args:
        msg: the reply.
        reference: the global model's shared entries that were sent out (None: the
            arrays are not checked).
        weighted_by_key: the metric that weights the reply in the aggregate (its example count).
        max_update_norm: largest accepted update norm; 0 turns the absolute bound off.
        buffer_keys: entries left out of the update norm (buffers, not trained; they are
            screened by :func:`~server.validation.validate_buffers` instead).
    """
    if len(msg.content.array_records) != 1 or len(msg.content.metric_records) != 1:
        return Verdict(f"expected one ArrayRecord and one MetricRecord, got {len(msg.content.array_records)} "
                       f"and {len(msg.content.metric_records)}")
    metrics = next(iter(msg.content.metric_records.values()))
    key = weighted_by_key
    reason = validate_example_count(metrics.get(key)) if key in metrics else f"no {key} in the metrics"
    if reason is not None or reference is None:
        return Verdict(reason)
    try:
        arrays = record_to_arrays(next(iter(msg.content.array_records.values())))
    except Exception as exc:  # noqa: BLE001 - an undecodable array is a rejected reply
        return Verdict(f"arrays cannot be read ({type(exc).__name__})")
    norm_keys = {k for k in reference if k not in buffer_keys}
    reason = validate_update(arrays, reference, max_update_norm, norm_keys)
    if reason is not None:
        return Verdict(reason)
    return Verdict(None, update_norm(arrays, reference, norm_keys))


def keep_valid(
    rnd: int,
    replies: list[Message],
    check: Callable[[Message], Verdict],
    min_train_nodes: int,
    recorder: RoundRecorder | None,
    norm_bound_factor: float = 0.0,
) -> list[Message] | None:
    """Drop (and log) the replies that ``check`` rejects, then those whose update norm is
    above ``norm_bound_factor`` times the median of the others' (with at least three).

    Returns the replies to aggregate, in :func:`aggregation_order` (error replies are kept
    for Flower to count), or None when fewer than ``min_train_nodes`` valid ones remain
    (after failed, timed-out and rejected sites).

    Args:
        rnd: the (global) round.
        replies: the round's train replies, error replies included.
        check: the verdict on a non-error reply (:func:`screen_reply`).
        min_train_nodes: fewest valid replies the round is aggregated with.
        recorder: per-round bookkeeping (the ``rejected_replies`` and ``aggregate_skipped`` stats).
        norm_bound_factor: the relative update-norm bound (0: off).
    """
    kept: list[Message] = []
    norms: dict[int, float] = {}
    rejected = 0

    def reject(msg: Message, reason: str) -> None:
        nonlocal rejected
        rejected += 1
        log.warning("round %d: rejected the update of %s: %s", rnd, site_label(msg), reason)

    for msg in replies:
        verdict = Verdict(None) if msg.has_error() else check(msg)
        if verdict.reason is not None:
            reject(msg, verdict.reason)
            continue
        kept.append(msg)
        if not msg.has_error() and math.isfinite(verdict.norm):
            norms[id(msg)] = verdict.norm
    bound = relative_norm_bound(list(norms.values()), norm_bound_factor)
    if bound is not None:
        within = []
        for msg in kept:
            norm = norms.get(id(msg), 0.0)
            if norm > bound:
                reject(msg, f"update norm {norm:.4g} above the round's bound {bound:.4g} "
                            f"({norm_bound_factor:g} x the median update norm)")
            else:
                within.append(msg)
        kept = within
    if recorder is not None:
        recorder.set_round_stat("rejected_replies", rejected)
    kept.sort(key=aggregation_order)
    valid = sum(1 for m in kept if not m.has_error())
    if valid < min_train_nodes:
        log.warning(
            "round %d: %d valid update(s) (%d rejected, %d failed), fewer than min-nodes %d: "
            "aggregation skipped, the global model is unchanged",
            rnd, valid, rejected, sum(1 for m in replies if m.has_error()), min_train_nodes,
        )
        if recorder is not None:
            recorder.set_round_stat("aggregate_skipped", 1)
        return None
    return kept


def apply_example_weights(
    rnd: int,
    records: Sequence[tuple[str, MetricRecord]],
    weighted_by_key: str,
    weighting: ExampleWeighting,
    what: str = "update",
) -> int:
    """Replace each record's claimed example count (already validated) with its aggregation
    weight under ``weighting``, in place; log each clipped count by site.

    Args:
        rnd: the (global) round.
        records: ``(site, MetricRecord holding its count)`` of each accepted reply.
        weighted_by_key: the count's key.
        weighting: the ``example-weights`` policy.
        what: what the count weighs, for the log (``update`` or ``evaluation``).

    Returns:
        How many counts were clipped.
    """
    counts = [float(record[weighted_by_key]) for _, record in records]  # type: ignore[arg-type]
    weights = weighting.weights(counts)
    clipped = 0
    for (site, record), count, weight in zip(records, counts, weights):
        if weighting.policy != "equal" and weight < count:
            clipped += 1
            log.warning("round %d: %s of the %s of %s clipped from %g to %g (%s)", rnd, weighted_by_key, what, site,
                        count, weight, weighting.describe_cap(counts))
        record[weighted_by_key] = float(weight)
    return clipped


def weigh_replies(
    rnd: int, replies: list[Message], weighted_by_key: str, weighting: ExampleWeighting, recorder: RoundRecorder | None
) -> None:
    """:func:`apply_example_weights` on the kept (non-error) train replies, in place; the
    number clipped is the round's ``clipped_weights`` stat."""
    records = [(site_label(m), next(iter(m.content.metric_records.values()))) for m in replies if not m.has_error()]
    clipped = apply_example_weights(rnd, records, weighted_by_key, weighting)
    if recorder is not None:
        recorder.set_round_stat("clipped_weights", clipped)
