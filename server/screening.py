"""Which of a round's train replies are aggregated.

Every (non-error) train reply is checked before aggregation: one ArrayRecord and one
MetricRecord, a positive finite weight (``num-examples``), and an update that fits the
global model (:func:`~server.validation.validate_update`: keys, shapes, dtypes, finite
values, update norm). Failing replies are rejected and logged; the rest are put in
:func:`aggregation_order`; below ``min_train_nodes`` valid replies the round's aggregate is
skipped and the global model stays as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from flwr.app import Message

from federation.protocol import Arrays
from federation.records import record_to_arrays
from server.messages import metrics_of, site_label
from server.tracking import RoundRecorder
from server.validation import validate_update, validate_weight

log = logging.getLogger(__name__)


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


def reply_problem(
    msg: Message,
    reference: Arrays | None,
    weighted_by_key: str = "num-examples",
    max_update_norm: float = 0.0,
    buffer_keys: Collection[str] = (),
) -> str | None:
    """Why a (non-error) train reply must be rejected, or None.

    Args:
        msg: the reply.
        reference: the global model's shared entries that were sent out (None: the
            arrays are not checked).
        weighted_by_key: the metric that weights the reply in the aggregate.
        max_update_norm: largest accepted update norm; 0 turns the check off.
        buffer_keys: entries left out of the update norm (buffers, not trained).
    """
    if len(msg.content.array_records) != 1 or len(msg.content.metric_records) != 1:
        return (f"expected one ArrayRecord and one MetricRecord, got {len(msg.content.array_records)} "
                f"and {len(msg.content.metric_records)}")
    metrics = next(iter(msg.content.metric_records.values()))
    key = weighted_by_key
    reason = validate_weight(metrics.get(key)) if key in metrics else f"no {key} in the metrics"
    if reason is not None:
        return reason
    if reference is None:
        return None
    try:
        arrays = record_to_arrays(next(iter(msg.content.array_records.values())))
    except Exception as exc:  # noqa: BLE001 - an undecodable array is a rejected reply
        return f"arrays cannot be read ({type(exc).__name__})"
    norm_keys = {k for k in reference if k not in buffer_keys}
    return validate_update(arrays, reference, max_update_norm, norm_keys)


def keep_valid(
    rnd: int,
    replies: list[Message],
    check: Callable[[Message], str | None],
    min_train_nodes: int,
    recorder: RoundRecorder | None,
) -> list[Message] | None:
    """Drop (and log) the replies that ``check`` rejects.

    Returns the replies to aggregate, in :func:`aggregation_order` (error replies are kept
    for Flower to count), or None when fewer than ``min_train_nodes`` valid ones remain
    (after failed, timed-out and rejected sites).

    Args:
        rnd: the (global) round.
        replies: the round's train replies, error replies included.
        check: why a non-error reply must be rejected, or None.
        min_train_nodes: fewest valid replies the round is aggregated with.
        recorder: per-round bookkeeping (the ``rejected_replies`` and ``aggregate_skipped`` stats).
    """
    kept: list[Message] = []
    rejected = 0
    for msg in replies:
        reason = None if msg.has_error() else check(msg)
        if reason is None:
            kept.append(msg)
        else:
            rejected += 1
            log.warning("round %d: rejected the update of %s: %s", rnd, site_label(msg), reason)
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
