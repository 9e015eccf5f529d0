"""Model entries that stay at the sites, and the aggregate merged back into the global model.

Local entries (FedBN's normalisation entries; the retriever when only the segmenter is
aggregated) are neither sent nor checked nor aggregated: the global model keeps its values
for them. Merged back, the aggregated shared entries get the model's dtypes again
(integer counters stay integers).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TypeVar

from flwr.app import ArrayRecord

from federation.protocol import Arrays, cast_like
from federation.records import arrays_to_record

_Entry = TypeVar("_Entry")


def without_local(entries: Mapping[str, _Entry], local_keys: Collection[str]) -> dict[str, _Entry]:
    """The shared entries: ``entries`` less those named by ``local_keys``."""
    return {k: v for k, v in entries.items() if k not in local_keys}


def shared_record(arrays: ArrayRecord, local_keys: Collection[str]) -> ArrayRecord:
    """The part of ``arrays`` that is sent and aggregated (``arrays`` itself when nothing stays local)."""
    if not local_keys:
        return arrays
    return ArrayRecord(without_local(arrays, local_keys))


def merge_into_global(global_arrays: Arrays | None, shared: Arrays) -> ArrayRecord:
    """The new global model: ``global_arrays`` with the aggregated ``shared`` entries put in,
    in the global model's dtypes."""
    merged = dict(global_arrays or {})
    merged.update(shared)
    return arrays_to_record(cast_like(merged, global_arrays or {}))
