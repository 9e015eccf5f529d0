"""The model entries' dtype on the wire (``transfer-dtype``).

Outgoing entries are cast to the transfer dtype (``float16`` halves the bytes of a round)
and the replies' entries back to ``float32`` before validation and aggregation; with
``float32`` nothing is cast. Integer entries (counters) are never cast.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message

from federation.protocol import transfer_cast
from federation.records import arrays_to_record, record_to_arrays


def to_wire(messages: list[Message], transfer_dtype: str) -> list[Message]:
    """Cast the outgoing model entries to ``transfer_dtype`` (in place; one cast for all)."""
    if transfer_dtype == "float32":
        return messages
    cast: dict[int, ArrayRecord] = {}
    for msg in messages:
        for name, record in list(msg.content.array_records.items()):
            if id(record) not in cast:
                cast[id(record)] = arrays_to_record(transfer_cast(record_to_arrays(record), transfer_dtype))
            msg.content[name] = cast[id(record)]
    return messages


def from_wire(replies: list[Message], transfer_dtype: str) -> None:
    """Turn the replies' model entries back to float32 (in place) before validation and aggregation."""
    if transfer_dtype == "float32":
        return
    for msg in replies:
        if msg.has_error():
            continue
        for name, record in list(msg.content.array_records.items()):
            msg.content[name] = arrays_to_record(transfer_cast(record_to_arrays(record), "float32"))
