"""Typed configuration of the J-RAS method, loaded from YAML with validation.

Every hyperparameter of the method is a field here (``configs/default.yaml`` states them
all); the defaults are the method's defaults, chosen by the benchmarks in ``docs/results``.
Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the file and the offending key.

The configs of the project (this one, a site's :class:`~jras_core.site.SiteConfig` and
:class:`~jras_core.data.sources.DataSourceConfig`, the server's
:class:`~server.settings.ServerSettings`, a synthetic
:class:`~jras_core.data.synthetic.vendors.VendorSpec`) are pydantic dataclasses made by
:func:`config_class`: strict types (an integer is no float, a flag no number), tuples read
from lists, ranges checked by field constraints and validators, and every failure turned by
:func:`config_error` into one line ``<source>: <dotted.key>: <problem>``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
"""Accepted values of ``train.device`` (and of every ``--device``)."""


# --------------------------------------------------------------------------- validation machinery

_C = TypeVar("_C", bound=type)
_T = TypeVar("_T")


def config_class(
    cls: _C | None = None, /, *, frozen: bool = False, error: type[Exception] = ConfigError
) -> Any:
    """Make ``cls`` a validated config: a pydantic dataclass that refuses unknown keys and
    non-finite numbers, validates each assignment (unless ``frozen``), accepts fields by their
    alias (a run config's key) and by name, and raises ``error`` (one line, by
    :func:`config_error`, the class named as the source) instead of pydantic's
    ``ValidationError`` when constructed or assigned a bad value. A class without its own
    ``validate()`` gets one that checks the current values again.

    Fields use strict types (``StrictInt``, ``StrictFloat``, ...), so values are never
    converted between kinds, except integers into float fields and lists into tuples.
    """

    def make(cls: _C) -> _C:
        config = ConfigDict(
            extra="forbid", allow_inf_nan=False, validate_assignment=not frozen, populate_by_name=True
        )
        cls = pydantic_dataclass(cls, config=config, frozen=frozen)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise config_error(exc, type(self).__name__, type(self), error) from None

        cls.__init__ = __init__
        if not frozen:
            setattr_ = cls.__setattr__

            @functools.wraps(setattr_)
            def __setattr__(self, name: str, value: Any) -> None:
                try:
                    setattr_(self, name, value)
                except ValidationError as exc:
                    raise config_error(exc, type(self).__name__, type(self), error) from None

            cls.__setattr__ = __setattr__
        if "validate" not in cls.__dict__:

            def validate(self) -> None:
                """Check the current values again (a list or mapping may have changed in place)."""
                validate_as(type(self), dataclasses.asdict(self), type(self).__name__, error)

            cls.validate = validate
        return cls

    return make if cls is None else make(cls)


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def validate_as(cls: type[_T], data: Any, source: str, error: type[Exception] = ConfigError) -> _T:
    """``data`` (a mapping, e.g. a YAML section) validated as config class ``cls``; raises
    ``error`` naming ``source`` and the key."""
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as exc:
        raise config_error(exc, source, cls, error) from None


def config_error(
    exc: ValidationError, source: str, schema: type | None = None, error: type[Exception] = ConfigError
) -> Exception:
    """The one-line ``error`` for a failed validation, naming ``source``, the dotted key and
    the problem of the first failure (and how many more there are):
    ``configs/x.yaml: train.epochs: must be >= 0, got -1``, or
    ``configs/x.yaml: unknown key 'train.epochz'; allowed in train: batch_size, ...``.
    ``schema``: the class validated, which names the keys allowed where one is unknown."""
    errors = exc.errors(include_url=False)
    if not errors:
        return error(f"{source}: invalid ({exc.title})")
    first = errors[0]
    loc = tuple(first["loc"])
    kind = first["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument", "invalid_key"):
        parent = _dotted(loc[:-1])
        key = f"{parent}.{loc[-1]}" if parent else str(loc[-1])
        allowed = _keys_at(schema, loc[:-1])
        text = f"unknown key {key!r}"
        if allowed:
            text += f"; allowed{f' in {parent}' if parent else ''}: {', '.join(allowed)}"
    elif kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        text = f"missing key {_dotted(loc)!r}"
    else:
        key = _dotted(loc)
        text = f"{key}: {_problem(first)}" if key else _problem(first)
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error(" ".join(f"{source}: {text}".split()))


def _dotted(loc: tuple) -> str:
    """``("segmenter", "channels", 2)`` -> ``segmenter.channels[2]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_PROBLEMS: dict[str, str] = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "dict_type": "must be a mapping",
    "mapping_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
    "dataclass_exact_type": "must be a mapping",
    "model_type": "must be a mapping",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "multiple_of": "must be a multiple of {multiple_of}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must not be empty",
    "literal_error": "must be {expected}",
}


def _problem(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    if err["type"] in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])  # a validator's own words, which show the value
    template = _PROBLEMS.get(err["type"])
    what = template.format(**ctx) if template else err["msg"][:1].lower() + err["msg"][1:]
    return f"{what}, got {_shown(err.get('input'))}"


def _keys_at(schema: type | None, loc: tuple) -> list[str]:
    """The keys of the config class at ``loc`` inside ``schema`` (aliases where set)."""
    cls = schema
    for part in loc:
        fields = getattr(cls, "__pydantic_fields__", None) or {}
        by_key = {f.alias or name: f for name, f in fields.items()}
        if part not in by_key:
            return []
        cls = by_key[part].annotation
    fields = getattr(cls, "__pydantic_fields__", None) or {}
    return [f.alias or name for name, f in fields.items()]


def check(ok: Callable[[Any], bool], problem: str) -> AfterValidator:
    """A field rule beyond pydantic's constraints, for ``Annotated[type, check(...)]``: a value
    for which ``ok`` is false is refused with ``<problem>, got <value>``."""

    def rule(value: Any) -> Any:
        if not ok(value):
            raise ValueError(f"{problem}, got {_shown(value)}")
        return value

    return AfterValidator(rule)


def _empty_if_none(value: Any) -> Any:
    return {} if value is None else value


Section = Annotated[_T, BeforeValidator(_empty_if_none)]
"""A config section; an empty one in YAML (``train:`` with nothing under it) keeps its defaults."""

Fraction = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
"""A number in [0, 1]."""


# --------------------------------------------------------------------------- sections


@config_class
class LabelConfig:
    """Foreground class names of a dataset (background is class 0 and implicit)."""

    names: Annotated[
        list[StrictStr], Field(min_length=1), check(lambda v: len(set(v)) == len(v), "must not repeat a name")
    ] = field(default_factory=lambda: ["LV", "MYO", "RV"])

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.names) + 1


@config_class
class PreprocessConfig:
    """How volumes become fixed-size, normalised 2-D slices."""

    size: Annotated[StrictInt, Field(ge=16, multiple_of=16)] = 128
    """Side of the square slice after crop/pad, in pixels."""
    fov_mm: Annotated[StrictFloat, Field(gt=0)] | None = 240.0
    """In-plane field of view after resampling; spacing = fov_mm / size. None keeps the native spacing."""
    intensity_percentiles: Annotated[
        tuple[StrictFloat, StrictFloat],
        check(lambda v: 0.0 <= v[0] < v[1] <= 100.0, "must satisfy 0 <= lo < hi <= 100"),
    ] = (1.0, 99.0)
    keep_empty_slices: StrictBool = False
    """Keep slices whose mask has no foreground (off: only labelled slices are used)."""


@config_class
class AugmentConfig:
    """Strong intensity augmentation (vendor-style appearance change) and light geometry."""

    intensity: StrictBool = True
    prob: Fraction = 0.8
    gamma: Annotated[
        tuple[StrictFloat, StrictFloat],
        check(lambda v: 0 < v[0] <= v[1], "must be a range of positive numbers"),
    ] = (0.5, 2.0)
    bias_field: StrictFloat = 0.4
    noise_std: StrictFloat = 0.08
    contrast_shift: StrictFloat = 0.25
    non_monotone: Fraction = 0.0
    """Probability of a non-monotone intensity remap (tissue order may change between vendors)."""
    flip: StrictBool = False
    """Random flips: each sample is flipped along H with probability 0.5 and along W with
    probability 0.5, independently (of each other and of ``prob``). See
    :mod:`jras_core.data.spatial`, which applies ``flip``, ``rotate_deg`` and ``scale``."""
    rotate_deg: Annotated[StrictFloat, Field(ge=0.0, le=180.0)] = 0.0
    """Random in-plane rotation about the slice centre: with probability ``prob`` a sample is
    rotated by an angle uniform in ``[-rotate_deg, rotate_deg]`` degrees, in [0, 180]
    (sources can differ by ~90 degrees in orientation). 0: no rotation."""
    scale: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.0
    """Random isotropic zoom: with probability ``prob`` (with the rotation) a sample is zoomed
    by a factor uniform in ``[1 - scale, 1 + scale]``, in [0, 1). 0: no zoom."""
    guides: Literal["none", "shared", "independent"] = "shared"
    """How phase A's guide images are augmented. ``shared`` (default): guides are retrieved
    for the unaugmented query, then the query and its K guides receive one intensity change
    together, so they always look alike (as at a site whose bank holds its own scanner's
    images) and the segmenter can read the query's appearance off its guides, as the
    appearance prior does. ``none``: the query is augmented before retrieval and its guides
    keep their bank appearance (cheaper: no augmentation of guide images).
    ``independent``: the query as in ``none``, each guide its own random change."""
    test_views: Annotated[StrictInt, Field(ge=0)] = 0
    """Test-time augmentation: the prediction averages the class probabilities of the
    unchanged query and of this many randomly changed views of it, drawn as in training (under
    ``guides: shared`` a query and its guides share each change). Inference only; each view
    costs one more guided forward. 0: no extra views. Measured: ``docs/results/levers.md``."""

    @field_validator("test_views")
    @classmethod
    def _views_need_intensity(cls, value: int, info: ValidationInfo) -> int:
        if value and info.data.get("intensity") is False:
            raise ValueError("draws intensity changes: it needs augment.intensity: true")
        return value


@config_class
class SegmenterConfig:
    backbone: Literal["unet", "dynunet", "swinunetr", "segformer"] = "unet"
    channels: Annotated[tuple[StrictInt, ...], Field(min_length=2)] = (16, 32, 64, 128)
    fusion: Literal["concat", "prior", "feature", "none"] = "concat"
    dropout: StrictFloat = 0.0
    guide_init: Literal["default", "zero"] = "zero"
    """Initial weights of the backbone's input connections from the guide channels:
    ``default`` (the layer's own initialisation) or ``zero`` (the segmenter starts as the
    plain one and learns to use its guides only as far as they help)."""
    appearance: StrictBool = True
    """Also feed the segmenter the query's class probabilities under a per-class intensity
    model fitted to its guides (which intensities mean which tissue at this scanner)."""
    guide_path: Literal["input", "residual"] = "residual"
    """Where the guides enter. ``input``: as extra channels of the backbone's input (one
    network for the guided and the guide-free path). ``residual``: the backbone sees the query
    alone and is trained as a plain segmenter; a small head (``head_channels``) reads the
    query, the backbone's prediction and the guides and adds a correction, starting at zero
    (:class:`~jras_core.models.segmenter.GuidedSegmenter`)."""
    head_channels: Annotated[
        tuple[Annotated[StrictInt, Field(ge=1)], ...], Field(min_length=2)
    ] = (16, 32, 64)
    """Widths of the ``residual`` head's U-Net."""
    refine: StrictBool = False
    """With ``fusion: none`` (no retrieval): give the plain segmenter the residual head all the
    same, reading the query and the backbone's prediction only. A two-stage cascade of the
    residual J-RAS segmenter's size without guides: the control for what that head adds beyond
    its guides. Ignored by segmenters that use guides."""
    norm: Literal["batch", "instance"] = "batch"
    """Normalisation of the segmenter's convolutions: ``batch`` (batch statistics, running
    averages at inference; AdaBN re-estimates them at a new site) or ``instance`` (each
    slice's own feature statistics with a learned scale and shift, as nnU-Net does: nothing
    to average across sites or re-estimate at a new one)."""


@config_class
class RetrieverConfig:
    kind: Literal["cnn", "shared_encoder"] = "cnn"
    """cnn: a CNN of its own (``channels``, ``input_size``) and a projection head.
    shared_encoder: a head on the segmenter's encoder features, pooled over the slice and
    under each class map of its input (pass-1 prediction or true mask); no encoder of its own,
    so less to train and to send, but the segmenter's encoder embeds every bank entry
    (``segmenter.backbone`` unet or dynunet; ``channels`` and ``input_size`` unused, the
    latter must stay null). Measured: ``docs/results/levers.md``, ``docs/results/cost.md``."""
    embed_dim: Annotated[StrictInt, Field(ge=2)] = 128
    channels: tuple[StrictInt, ...] = (16, 32, 64, 64)
    input: Literal["image", "image+pred"] = "image+pred"
    """What the retriever sees: the image alone, or the image plus the pass-1 prediction."""
    mode: Literal["learned", "frozen", "mask"] = "learned"
    """learned: trained contrastively; frozen: never trained; mask: non-learned ranking by
    centroid-aligned mask Dice against the pass-1 prediction (ablation)."""
    pool_grid: Annotated[StrictInt, Field(ge=1)] = 1
    """Pooling of the encoder's last feature map before the projection head: 1 averages it
    to one vector; g > 1 averages it to a g x g grid kept in the embedding (where things are)."""
    input_size: Annotated[StrictInt, Field(ge=16, multiple_of=16)] | None = None
    """Side in pixels to which the retriever's inputs (bank entries and queries alike) are
    resampled by area averaging before its encoder; None: the slice size. Half the slice
    size makes the retriever about four times cheaper (phase B, bank refresh, query embedding)."""


HNSW_FROM = 100_000
"""Default bank size from which ``retrieval.index: auto`` builds the approximate HNSW index.
A local epoch searches a site's bank with about as many queries as it has entries and
rebuilds the index once (the refresh): at 100k entries HNSW's build plus its searches took
half the flat index's searches, at 10k three times as long (``docs/results/cost.md``, "Large
banks")."""


@config_class
class RetrievalConfig:
    k: Annotated[StrictInt, Field(ge=1)] = 3
    train_pool: StrictInt = 5
    """During training the K guides are drawn from the top ``train_pool`` (K+2)."""
    guide_dropout: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.0
    """Probability that a phase-A query trains without guides. Under ``segmenter.guide_path:
    residual`` the guide-free path trains on every query anyway, and a dropped query only
    withholds a step from the head; under ``input`` the one network learns both paths from it."""
    align_centroid: StrictBool = True
    """Shift guides onto the query's pass-1 centroid before fusion."""
    align_scale: Annotated[
        StrictFloat, check(lambda v: v >= 1.0, "is the largest magnification, >= 1 (1: none)")
    ] = 1.0
    """Also magnify each guide about that centroid so that its foreground area matches the
    query's predicted one, by a factor between ``1 / align_scale`` and ``align_scale``.
    1.0: no scaling. Needs ``align_centroid``. Measured: ``docs/results/levers.md``."""
    index: Literal["flat", "hnsw", "auto"] = "auto"
    """The bank's search index. ``flat``: exact inner product (FAISS ``IndexFlatIP``).
    ``hnsw``: approximate (FAISS ``IndexHNSWFlat``, 32 links, efSearch 128), faster on large
    banks. ``auto``: ``hnsw`` from ``hnsw_from`` entries on, else ``flat``. Either way a query
    never retrieves its own case (or volume). Measured: ``docs/results/cost.md``, section 7."""
    hnsw_from: Annotated[StrictInt, Field(ge=1)] = HNSW_FROM
    """Bank entries from which ``index: auto`` builds HNSW."""
    first_pass: Literal["fresh", "reuse", "warmup"] = "reuse"
    """Where training takes each query's pass-1 prediction from. ``fresh``: a guide-free
    forward of the current segmenter at every step, as at inference. ``reuse``: the
    segmenter's own prediction for that slice at its last phase-A step (guided, on another
    augmentation, kept per slice in 8 bits), computed fresh only for slices not yet seen in
    this call of local training (its first epoch). ``warmup``: as ``reuse``, but when a
    call trains two or more epochs its first phase A trains the segmenter without guides,
    and those predictions fill the memory (no pass-1 forwards at all).
    With ``reuse`` and ``warmup`` phase B trains the retriever on the views phase A trained
    on (kept with their predictions) instead of augmenting anew. Inference always runs
    pass 1."""
    exclude: Literal["case", "volume", "auto"] = "auto"
    """What a training query may not retrieve from its own site's bank. ``case``: any slice
    of its patient (the bank then behaves as at a new patient). ``volume``: only slices of
    its own volume (the patient's other cardiac phase is eligible). ``auto``: ``case``,
    except at a site whose training data is a single patient, where ``case`` would leave
    every query without guides; there ``volume``."""
    test_draws: Annotated[StrictInt, Field(ge=1)] = 1
    """Guide sets per query at inference. 1: the top K. n > 1: the segmenter's softmax is
    averaged over the top K and n - 1 random draws of K from the top ``train_pool`` (drawn
    as training draws them); n segmenter forwards per query instead of one. Training is
    unchanged."""
    test_passes: Annotated[StrictInt, Field(ge=1)] = 2
    """Retrieval rounds at inference. 1: retrieve (and align the guides) with the guide-free
    pass-1 prediction. n > 1: retrieve again with the previous round's guided prediction, as
    training does with its reused pass 1 (``first_pass: reuse``); n - 1 extra retrievals and
    segmenter forwards per query. Measured: ``docs/results/levers.md``."""

    @field_validator("train_pool")
    @classmethod
    def _pool_holds_k(cls, value: int, info: ValidationInfo) -> int:
        k = info.data.get("k")
        if k is not None and value < k:
            raise ValueError(f"must be >= k ({k}), got {value}")
        return value

    @field_validator("align_scale")
    @classmethod
    def _scale_needs_centroid(cls, value: float, info: ValidationInfo) -> float:
        if value > 1.0 and info.data.get("align_centroid") is False:
            raise ValueError(
                "magnifies guides about the query's centroid: it needs retrieval.align_centroid: true"
            )
        return value


@config_class
class ContrastiveConfig:
    candidates: Annotated[StrictInt, Field(ge=2)] = 8
    """M candidates per query: top M/2 by the current retriever plus random ones."""
    relevance: Literal["utility", "mask"] = "mask"
    tau: Annotated[StrictFloat, Field(gt=0)] = 0.1
    tau_relevance: Annotated[StrictFloat, Field(gt=0)] = 0.05
    lr: StrictFloat = 1e-3
    steps_per_epoch: Annotated[StrictInt, check(lambda v: v >= 1, "must be >= 1 or null")] | None = None
    """Batches of phase B per local epoch (None: one pass over the data)."""
    batch_fraction: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 0.4
    """Fraction of a local epoch's batches that phase B trains on (the first ``ceil(f n)``
    of the epoch's shuffled batches; at most ``steps_per_epoch`` when that is set). Scales
    with the site's size, unlike ``steps_per_epoch``. Measured: ``docs/results/levers.md``."""
    keys: Literal["encoded", "stored"] = "stored"
    """The candidates' side of each similarity. ``encoded``: candidates are embedded anew
    with gradients, so both sides are trained. ``stored``: their embeddings are read from
    the bank (as of its last refresh) and only the queries' side is trained; phase B then
    embeds the batch's queries only."""

    def phase_b_steps(self, batches: int) -> int:
        """How many of an epoch's ``batches`` phase B trains on."""
        steps = max(1, math.ceil(self.batch_fraction * batches - 1e-9))
        return min(steps, self.steps_per_epoch) if self.steps_per_epoch is not None else steps


@config_class
class TrainConfig:
    epochs: Annotated[StrictInt, Field(ge=0)] = 25
    batch_size: Annotated[StrictInt, Field(ge=1)] = 16
    lr: Annotated[StrictFloat, Field(gt=0)] = 1e-3
    weight_decay: StrictFloat = 1e-5
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """The learning rate over the whole training (``lr`` for the segmenter, ``contrastive.lr``
    for the retriever, each scaled alike): ``constant``, or ``cosine``: half a cosine from the
    base rate at the first step to ``lr_final_fraction`` of it at the last, over all epochs of
    central training or all rounds x local epochs of a federation (each round's rates follow
    from its number; :mod:`jras_core.training.lr_schedule`). Fine-tuning at a site keeps
    ``adapt.lr`` constant. Measured: ``docs/results/levers.md``."""
    lr_final_fraction: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] = 0.0
    """Under ``lr_schedule: cosine``, the learning rate at the end as a fraction of the base."""
    seed: StrictInt = 0
    num_threads: StrictInt | None = None
    """torch intra-op threads (None: leave torch's default)."""
    proximal_mu: StrictFloat = 0.0
    device: Annotated[
        StrictStr,
        check(lambda v: DEVICE_PATTERN.match(v.strip().lower()), "must be auto, cpu, cuda or cuda:N"),
    ] = "auto"
    """Where the models compute: ``auto`` (a CUDA device when one is present, else the CPU),
    ``cpu``, ``cuda`` or ``cuda:N``. Slices, banks and the FAISS index stay on the CPU; each
    batch crosses to the device once. Asking for CUDA where there is none is an error."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Arithmetic of the models' forwards and backwards (``torch.autocast``): ``fp32``, ``bf16``
    (CUDA or CPU) or ``fp16`` (CUDA only, with a gradient scaler). Training, inference and
    AdaBN alike; weights stay fp32."""


@config_class
class PostprocessConfig:
    """What is done to predicted label maps before they are scored."""

    largest_component: StrictBool = True
    """Keep only the largest connected component of each class in each volume (3-D, faces
    connected), which removes stray islands far from the structure."""


@config_class
class AdaptConfig:
    """What a site that never trained (a held-out site, evaluated with its support bank) does
    to the global model before it evaluates; training is unchanged. The fine-tuning fields
    apply where a site adapts the global model with its annotated cases (``jras site adapt``,
    the benchmarks' ``+ft`` methods, a federation's ``personalise``:
    :func:`jras_core.training.finetune.adapt_site`)."""

    norm_stats: StrictBool = True
    """Re-estimate every batch-norm layer's running statistics from the site's own support
    images (AdaBN, :func:`jras_core.training.adapt.recalibrate_norm`) instead of keeping the
    federation's. False: keep the federation's. Measured: ``docs/results/levers.md``."""
    guides: Literal["always", "auto", "never"] = "always"
    """Whether a held-out site predicts with its retrieved guides. ``always``; ``never`` (the
    segmenter's guide-free path); ``auto``: the site decides on its own support cases, each
    predicted with guides from its other support cases (or, at a one-patient site, from the
    patient's other volumes) and without guides, and keeps guides only if they score at least
    as well (:func:`jras_core.training.adapt.choose_guides`). Retrieval methods only."""
    epochs: Annotated[StrictInt, Field(ge=0)] = 20
    """Most fine-tuning epochs over the site's annotated cases kept for fitting (0: AdaBN only,
    no fine-tuning)."""
    patience: Annotated[StrictInt, Field(ge=1)] = 6
    """Stop after this many epochs without a better validation Dice than the best so far. The
    first epochs may score below the start before the best one (LGE sample: epochs 1-4 below
    epoch 0, epoch 7 best; ``docs/results/adapt.md``)."""
    lr: Annotated[StrictFloat, Field(gt=0)] = 1e-3
    """Learning rate of the fine-tuning (segmenter, and retriever with ``tune_retriever``).
    Early stopping, not a small rate, guards against overfitting a few cases: at 1e-4 the
    held-out Dice barely moved in 4 epochs on the LGE sample and an inverted-contrast vendor
    (``docs/results/adapt.md``)."""
    val_fraction: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.3
    """Share of the site's annotated cases held out to choose the epoch (at least one case;
    with a single case and ``min_cases: 1``, one of its volumes; with a single volume,
    nothing is fine-tuned).
    0: no validation, ``epochs`` epochs on every case and the last one kept (no early stopping,
    no guarantee against overfitting)."""
    min_cases: Annotated[StrictInt, Field(ge=1)] = 2
    """Fewest annotated cases a site fine-tunes with; with fewer, AdaBN only. 1 lets a one-case
    site fine-tune, one of its volumes held out to pick the epoch: measured on M&Ms B, that
    volume (the same patient's other phase) rose while the other patients fell (-0.079
    against no fine-tuning; ``docs/results/adapt.md``)."""
    tune_retriever: StrictBool = False
    """Also train the retriever (phase B, contrastive) while fine-tuning; retriever methods with
    ``retriever.mode: learned`` only."""


@config_class
class JRASConfig:
    """The whole method configuration."""

    labels: Section[LabelConfig] = field(default_factory=LabelConfig)
    preprocess: Section[PreprocessConfig] = field(default_factory=PreprocessConfig)
    augment: Section[AugmentConfig] = field(default_factory=AugmentConfig)
    segmenter: Section[SegmenterConfig] = field(default_factory=SegmenterConfig)
    retriever: Section[RetrieverConfig] = field(default_factory=RetrieverConfig)
    retrieval: Section[RetrievalConfig] = field(default_factory=RetrievalConfig)
    contrastive: Section[ContrastiveConfig] = field(default_factory=ContrastiveConfig)
    train: Section[TrainConfig] = field(default_factory=TrainConfig)
    postprocess: Section[PostprocessConfig] = field(default_factory=PostprocessConfig)
    adapt: Section[AdaptConfig] = field(default_factory=AdaptConfig)

    @property
    def uses_retrieval(self) -> bool:
        return self.segmenter.fusion != "none"

    @property
    def trains_retriever(self) -> bool:
        return self.uses_retrieval and self.retriever.mode == "learned"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), as YAML states it; :meth:`from_dict` round-trips it."""
        return _adapter(JRASConfig).dump_python(self, mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "<dict>") -> JRASConfig:
        return validate_as(cls, {} if data is None else data, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> JRASConfig:
        return cls.from_dict(load_yaml(path), source=str(path))

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "overrides") -> JRASConfig:
        """A copy with dotted-key overrides applied, e.g. ``{"train.epochs": 3}``; errors name
        ``source``."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            parts = key.split(".")
            for depth, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    where = ".".join(parts[:depth])
                    allowed = ""
                    if isinstance(node, dict):
                        allowed = f"; allowed{f' in {where}' if where else ''}: {', '.join(node)}"
                    raise ConfigError(f"{source}: unknown config key {key!r}{allowed}")
                if depth < len(parts) - 1:
                    node = node[part]
            node[parts[-1]] = value
        return JRASConfig.from_dict(data, source=source)


def parse_overrides(items: Iterable[str], source: str = "--set") -> dict[str, Any]:
    """Dotted-key overrides from ``KEY=VALUE`` items, values read as YAML:
    ``["train.epochs=3", "segmenter.channels=[8, 16]"]`` -> ``{"train.epochs": 3, ...}``.

    The one override syntax: ``--set`` items of the command line, ``method-overrides`` of a
    run config (items joined by ``;``) and a benchmark method's ``[...]`` (joined by ``;``).
    ``source`` names where the items came from in errors.
    """
    out: dict[str, Any] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"{source}: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{source}: {key.strip()}: the value {value.strip()!r} is not valid YAML") from None
    return out


# --------------------------------------------------------------------------- loading


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML{_yaml_where(exc)}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _yaml_where(exc: yaml.YAMLError) -> str:
    """Where and what the YAML error is, on one line (e.g. ``" at line 3, column 1: expected ','"``)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"
