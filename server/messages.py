"""Flower records and messages as the server reads and writes them.

A site is named in logs by its node id; an error reply's text is made one readable line; a
message's metrics and model bytes are read off it (model entries convert in
:mod:`federation.records`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flwr.app import Message


def site_label(msg: Message) -> str:
    """How a site is named in logs: its node id (names never travel in messages)."""
    return f"node-{msg.metadata.src_node_id}"


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


def metrics_of(msg: Message) -> dict[str, float]:
    """The numeric metrics of a message, over all its MetricRecords."""
    out: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        out.update({k: v for k, v in record.items() if isinstance(v, (int, float))})
    return out


def array_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the model arrays the messages carry."""
    return sum(record.count_bytes() for msg in messages for record in msg.content.array_records.values())
