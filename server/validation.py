"""Checks of a site's reply before it is aggregated. No Flower import here.

Every number a site sends is a claim the server checks before it weighs in an aggregate:

* **the update** (:func:`validate_update`): exactly the keys, shapes and dtypes of the
  global model's aggregated entries, all values finite, the buffers plausible
  (:func:`validate_buffers`), and the update ``||w_site - w_global||`` (L2 over the float
  entries named by ``norm_keys``, the trained parameters) within an absolute bound; a
  round-relative bound (:func:`relative_norm_bound`) is applied over the round's replies;
* **the example count** (``num-examples``, the reply's weight in FedAvg and its kin):
  a positive whole number (:func:`validate_example_count`), which
  :class:`ExampleWeighting` turns into the aggregation weight (claimed, capped relative
  to the round's median, or equal);
* **the metrics** (:func:`validate_metrics`): finite, and within the range of their
  kind (:data:`METRIC_RANGES`: Dice and other fractions in [0, 1], losses, times,
  distances and counts >= 0).

A reason returned for a rejected reply names keys and numbers only, never array content.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal, get_args

import numpy as np

DEFAULT_NORM_BOUND_FACTOR = 10.0
"""A reply whose update norm is above this many times the round's median is rejected."""
MIN_REPLIES_FOR_RELATIVE_BOUND = 3
"""Fewest replies whose median update norm sets a bound: with two, either one is the median's half."""
DEFAULT_MAX_EXAMPLE_RATIO = 3.0
"""Under ``capped`` weights, a reply weighs at most this many times the round's median count."""
MAX_EXAMPLE_COUNT = 2**53
"""Largest example count accepted at all: whole numbers above it are not exact in float64."""

ExampleWeights = Literal["claimed", "capped", "equal"]
EXAMPLE_WEIGHTS: tuple[str, ...] = get_args(ExampleWeights)


def _keys(keys: Collection[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------- the update


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


@dataclass(frozen=True)
class BufferLimits:
    """Plausible values of the normalisation buffers a site sends back, by entry name.

    Buffers are not trained by gradient steps, so the update norm (over the trained
    parameters) does not bound them, and a relative bound on their change would not fit
    either: running statistics follow each site's own data, and a site whose images differ
    from the others' (another scanner: the non-IID case these federations are for) moves
    them far more than the others, honestly. What makes a buffer harmful is a value no
    data can produce, so each kind is screened against its physical range instead:

    Attributes:
        max_variance: ``*running_var`` entries must lie in ``[0, max_variance]``. Negative
            variances turn ``1/sqrt(var + eps)`` into NaN once averaged in; 0 is harmless
            (BatchNorm adds ``eps``) and honest: a constant channel's variance decays to 0,
            and a tiny one rounds to 0 on the ``float16`` wire.
        max_abs_mean: ``*running_mean`` entries must lie in ``[-max_abs_mean, max_abs_mean]``.
        max_counter_step: ``*num_batches_tracked`` counters must lie in
            ``[0, global value + max_counter_step]`` (a round of local steps adds far fewer).
        max_counter: and never above this (the float64 average of integer counters is exact
            below 2**53; near the int64 maximum it wraps around).
    """

    max_variance: float = 1e6
    max_abs_mean: float = 1e6
    max_counter_step: int = 10**7
    max_counter: int = 2**53


BUFFER_LIMITS = BufferLimits()
"""The default buffer limits."""

VARIANCE_SUFFIX = "running_var"
MEAN_SUFFIX = "running_mean"
COUNTER_SUFFIX = "num_batches_tracked"


def validate_buffers(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], limits: BufferLimits = BUFFER_LIMITS
) -> str | None:
    """Why the buffers of a site's (finite, well-shaped) update must be rejected, or None.

    Entries are recognised by name (:data:`VARIANCE_SUFFIX`, :data:`MEAN_SUFFIX`,
    :data:`COUNTER_SUFFIX`); others are left to :func:`validate_update`.
    """
    for key in sorted(reference):
        got = np.asarray(arrays[key])
        if got.size == 0:
            continue
        if key.endswith(VARIANCE_SUFFIX):
            lo, hi = float(got.min()), float(got.max())
            if lo < 0 or hi > limits.max_variance:
                return f"{key}: variances in [{lo:.4g}, {hi:.4g}], outside [0, {limits.max_variance:.4g}]"
        elif key.endswith(MEAN_SUFFIX):
            top = float(np.abs(got).max())
            if top > limits.max_abs_mean:
                return f"{key}: |running mean| up to {top:.4g}, above {limits.max_abs_mean:.4g}"
        elif key.endswith(COUNTER_SUFFIX):
            lo, hi = int(got.min()), int(got.max())
            ceiling = min(int(np.asarray(reference[key]).max()) + limits.max_counter_step, limits.max_counter)
            if lo < 0 or hi > ceiling:
                return f"{key}: counter {lo if lo < 0 else hi}, outside [0, {ceiling}]"
    return None


def validate_update(
    arrays: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    bound: float = 0.0,
    norm_keys: Collection[str] | None = None,
    buffer_limits: BufferLimits = BUFFER_LIMITS,
) -> str | None:
    """Why a site's update must be rejected, or None if it is acceptable.

    Args:
        arrays: the entries a site sent back.
        reference: the global model's entries that were sent out (and are aggregated).
        bound: largest accepted update norm ``||arrays - reference||``; 0 turns the check off.
        norm_keys: entries the norm is taken over (the trained parameters); None: every
            floating-point entry.
        buffer_limits: the plausible range of the normalisation buffers (:func:`validate_buffers`).
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
    reason = validate_buffers(arrays, reference, buffer_limits)
    if reason is not None:
        return reason
    if bound > 0:
        norm = update_norm(arrays, reference, norm_keys)
        if not norm <= bound:
            return f"update norm {norm:.4g} above the bound {bound:.4g}"
    return None


def relative_norm_bound(
    norms: Sequence[float], factor: float = DEFAULT_NORM_BOUND_FACTOR, min_replies: int = MIN_REPLIES_FOR_RELATIVE_BOUND
) -> float | None:
    """The round's own update-norm bound: ``factor`` times the median of the replies' update
    norms, or None (no relative bound) when ``factor`` is 0, with fewer than ``min_replies``
    replies (the median of two is their mean, which either one sets), or when the median is 0.

    With at least three replies the median is an honest site's norm as long as the honest
    sites are a majority, so no single site can raise the bound it is measured against.
    """
    if factor <= 0 or len(norms) < min_replies:
        return None
    median = float(np.median(np.asarray(norms, dtype=np.float64)))
    if not median > 0 or not math.isfinite(median):
        return None
    return factor * median


# --------------------------------------------------------------------------- the example count


def validate_weight(value: object) -> str | None:
    """Why a reply's aggregation weight (``num-examples``) must be rejected, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"weight is not a number ({type(value).__name__})"
    if not math.isfinite(value) or value <= 0:
        return f"weight {value!r} is not a positive finite number"
    return None


def validate_example_count(value: object) -> str | None:
    """Why a reply's example count (``num-examples``) must be rejected, or None: it must be
    a positive finite whole number (a float such as ``120.0`` is fine), at most
    :data:`MAX_EXAMPLE_COUNT`."""
    reason = validate_weight(value)
    if reason is not None:
        return reason
    if not float(value).is_integer():  # type: ignore[arg-type]
        return f"example count {value!r} is not a whole number"
    if value > MAX_EXAMPLE_COUNT:  # type: ignore[operator]
        return f"example count {value!r} is above {MAX_EXAMPLE_COUNT}"
    return None


def lower_median(values: Sequence[float]) -> float:
    """The lower of the two middle values (the middle one for an odd count): with two
    replies it is the smaller, so a site cannot raise it by inflating its own count."""
    ordered = sorted(float(v) for v in values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class ExampleWeighting:
    """How the replies' claimed example counts (already validated) become aggregation weights.

    Attributes:
        policy: ``claimed``: a reply weighs its claimed count (at most ``max_examples``
            when given); ``capped``: also at most ``max_ratio`` times the lower median of the
            round's claimed counts, so a single site weighs at most ``max_ratio`` times a
            typical one (with two sites: at most ``max_ratio / (max_ratio + 1)`` of the
            aggregate); ``equal``: every reply weighs 1.
        max_ratio: the ``capped`` ratio (>= 1).
        max_examples: absolute cap of a count (0: none), under ``claimed`` and ``capped``.
    """

    policy: str = "capped"
    max_ratio: float = DEFAULT_MAX_EXAMPLE_RATIO
    max_examples: int = 0

    def __post_init__(self) -> None:
        if self.policy not in EXAMPLE_WEIGHTS:
            raise ValueError(f"example weights {self.policy!r}: expected one of {', '.join(EXAMPLE_WEIGHTS)}")

    def cap(self, counts: Sequence[float]) -> float:
        """The largest weight a reply gets in a round with these claimed counts (inf: none)."""
        cap = math.inf
        if self.policy == "equal":
            return cap
        if self.policy == "capped" and len(counts) > 0:
            cap = self.max_ratio * lower_median(counts)
        if self.max_examples > 0:
            cap = min(cap, float(self.max_examples))
        return cap

    def weights(self, counts: Sequence[float]) -> list[float]:
        """The aggregation weight of each reply, in the order of ``counts``."""
        if self.policy == "equal":
            return [1.0] * len(counts)
        cap = self.cap(counts)
        return [min(float(c), cap) for c in counts]

    def describe_cap(self, counts: Sequence[float]) -> str:
        """Where the round's cap comes from, for the log."""
        cap = self.cap(counts)
        if self.max_examples > 0 and cap == self.max_examples:
            return f"max-examples {self.max_examples}"
        return f"{self.max_ratio:g} x the round's median count {lower_median(counts):g}"


DEFAULT_WEIGHTING = ExampleWeighting()
"""The default ``example-weights`` policy: ``capped`` at 3 x the round's median count."""


# --------------------------------------------------------------------------- the metrics


@dataclass(frozen=True)
class MetricRange:
    """The range of the metrics whose names match one of ``patterns`` (``fnmatch`` style)."""

    patterns: tuple[str, ...]
    low: float
    high: float
    meaning: str


METRIC_RANGES: tuple[MetricRange, ...] = (
    MetricRange(("*dice*",), 0.0, 1.0, "Dice overlaps: dice_mean, dice_<class>, slice_dice_mean, guide_dice, "
                "dice_oracle, dice_random, dice_noguide, support_dice_guided, support_dice_noguide"),
    MetricRange(("retrieval*",), 0.0, 1.0, "retrieval scores, fractions"),
    MetricRange(("guides_used",), 0.0, 1.0, "whether a site's prediction used its guides (1 or 0)"),
    MetricRange(("hd95*",), 0.0, math.inf, "HD95 distances in mm"),
    MetricRange(("*loss*",), 0.0, math.inf, "training losses: seg_loss (Dice + cross-entropy, plus FedProx's "
                "proximal term), retr_loss (soft InfoNCE)"),
    MetricRange(("*_s", "*-s"), 0.0, math.inf, "seconds: seg_time_s, retr_time_s, refresh_time_s, epoch_time_s, "
                "client-time-s, client-cpu-s"),
    MetricRange(("*-mb",), 0.0, math.inf, "memory: peak-rss-mb"),
    MetricRange(("num*",), 0.0, math.inf, "counts: num_slices, num_volumes"),
    MetricRange(("partition-id",), 0.0, math.inf, "a simulated node's partition index"),
    MetricRange(("personal-epochs-run", "personal-best-epoch"), 0.0, math.inf, "a site's personalisation at the "
                "last round (run config personalise): fine-tuning epochs run, the epoch kept"),
)
"""The ranges of the metrics the ClientApp sends (train: the losses and times of
``JRASTrainer``, ``client-time-s``, ``client-cpu-s``, ``peak-rss-mb``; evaluation: the Dice,
HD95 and retrieval diagnostics of ``jras_core.training.evaluate``; both: ``partition-id`` in
simulation), first match wins. Every metric must be finite or NaN (NaN: not measured at
that site, e.g. the Dice of a class its cases lack; :func:`server.metrics.mean_of_measured`
leaves it out of that metric's mean); one no entry names has no other bound. The weighting key (``num-examples``) is checked by :func:`validate_example_count`."""


def metric_range(name: str) -> MetricRange | None:
    """The entry of :data:`METRIC_RANGES` for a metric name, or None."""
    for entry in METRIC_RANGES:
        if any(fnmatchcase(name, p) for p in entry.patterns):
            return entry
    return None


def validate_metrics(metrics: Mapping[str, object], skip: Collection[str] = ()) -> str | None:
    """Why a reply's metrics must not be aggregated (or logged as the round's), or None:
    each must be a number (or a list of them) in its range (:data:`METRIC_RANGES`) or NaN
    (not measured); infinities are refused.

    Args:
        metrics: metric name to value, as a MetricRecord holds them.
        skip: names checked elsewhere (the weighting key).
    """
    for name in sorted(metrics):
        if name in skip:
            continue
        value = metrics[name]
        values = value if isinstance(value, (list, tuple)) else [value]
        entry = metric_range(name)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"metric {name} is not a number ({type(v).__name__})"
            if math.isnan(v):
                continue  # not measured at this site (a class it lacks, no guides): left out of that mean
            if not math.isfinite(v):
                return f"metric {name} = {v!r} is not finite"
            if entry is not None and not entry.low <= v <= entry.high:
                return f"metric {name} = {v:.4g} outside [{entry.low:g}, {entry.high:g}]"
    return None
