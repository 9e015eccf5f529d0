"""Checks of a site's model update before it is aggregated. No Flower import here.

A train reply is accepted only if its arrays have exactly the keys, shapes and
dtypes of the global model's aggregated entries, all values are finite, and the
update ``||w_site - w_global||`` (L2 over the float entries named by ``norm_keys``)
is within a bound. The reason returned for a rejected update names keys and
numbers only, never array content.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np


def _keys(keys: Collection[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def update_norm(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], norm_keys: Collection[str] | None = None
) -> float:
    """L2 norm of ``arrays - reference`` over the floating-point entries (those in ``norm_keys`` if given)."""
    total = 0.0
    for key, ref in reference.items():
        if norm_keys is not None and key not in norm_keys:
            continue
        ref = np.asarray(ref)
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        diff = np.asarray(arrays[key], dtype=np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def validate_update(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    bound: float = 0.0,
    norm_keys: Collection[str] | None = None,
) -> str | None:
    """Why a site's update must be rejected, or None if it is acceptable.

    Args:
        arrays: the entries a site sent back.
        reference: the global model's entries that were sent out (and are aggregated).
        bound: largest accepted update norm ``||arrays - reference||``; 0 turns the check off.
        norm_keys: entries the norm is taken over (the trained parameters); None: every
            floating-point entry.
    """
    missing = set(reference) - set(arrays)
    extra = set(arrays) - set(reference)
    if missing:
        return f"missing keys: {_keys(missing)}"
    if extra:
        return f"unexpected keys: {_keys(extra)}"
    for key, ref in reference.items():
        got, ref = np.asarray(arrays[key]), np.asarray(ref)
        if got.shape != ref.shape:
            return f"shape of {key}: {tuple(got.shape)} instead of {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"dtype of {key}: {got.dtype} instead of {ref.dtype}"
    for key, ref in reference.items():
        got = np.asarray(arrays[key])
        if np.issubdtype(got.dtype, np.inexact) and not np.isfinite(got).all():
            return f"non-finite values in {key}"
    if bound > 0:
        norm = update_norm(arrays, reference, norm_keys)
        if not norm <= bound:
            return f"update norm {norm:.4g} above the bound {bound:.4g}"
    return None


def validate_weight(value: object) -> str | None:
    """Why a reply's aggregation weight (``num-examples``) must be rejected, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"weight is not a number ({type(value).__name__})"
    if not math.isfinite(value) or value <= 0:
        return f"weight {value!r} is not a positive finite number"
    return None
