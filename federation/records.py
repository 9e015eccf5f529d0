"""Model entries in Flower's records: the one conversion between an ``ArrayRecord`` and the
named numpy arrays (:data:`~federation.protocol.Arrays`) that the protocol's maths works on.

Flower's own constructors take a torch ``state_dict`` or a list of arrays, not named numpy
arrays in a chosen dtype; the protocol needs names (local entries stay out) and dtypes
(``transfer-dtype``), so both the server and the sites convert here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from federation.protocol import Arrays


def record_to_arrays(record: ArrayRecord) -> Arrays:
    """An ``ArrayRecord`` as named numpy arrays (each entry's own dtype and shape)."""
    return {k: v.numpy() for k, v in record.items()}


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ``ArrayRecord`` (C-ordered copies where needed)."""
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
