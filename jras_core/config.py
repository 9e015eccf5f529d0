"""Typed configuration of the J-RAS method, loaded from YAML with validation.

Every hyperparameter of the method is a field here (``configs/default.yaml`` states them
all); the defaults are the method's defaults, chosen by the benchmarks in ``docs/results``.
Unknown keys, wrong types and out-of-range values raise
:class:`ConfigError` naming the file and the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid."""


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
"""Accepted values of ``train.device`` (and of every ``--device``)."""


# --------------------------------------------------------------------------- sections


@dataclass
class LabelConfig:
    """Foreground class names of a dataset (background is class 0 and implicit)."""

    names: list[str] = field(default_factory=lambda: ["LV", "MYO", "RV"])

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.names) + 1

    def validate(self) -> None:
        if not self.names:
            raise ConfigError("labels.names must list at least one foreground class")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"labels.names has duplicates: {self.names}")


@dataclass
class PreprocessConfig:
    """How volumes become fixed-size, normalised 2-D slices."""

    size: int = 128
    """Side of the square slice after crop/pad, in pixels."""
    fov_mm: float | None = 240.0
    """In-plane field of view after resampling; spacing = fov_mm / size. None keeps the native spacing."""
    intensity_percentiles: tuple[float, float] = (1.0, 99.0)
    keep_empty_slices: bool = False
    """Keep slices whose mask has no foreground (off: only labelled slices are used)."""

    def validate(self) -> None:
        if self.size < 16 or self.size % 16:
            raise ConfigError(f"preprocess.size must be a multiple of 16 and >= 16, got {self.size}")
        if self.fov_mm is not None and self.fov_mm <= 0:
            raise ConfigError(f"preprocess.fov_mm must be positive, got {self.fov_mm}")
        lo, hi = self.intensity_percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ConfigError(f"preprocess.intensity_percentiles must satisfy 0 <= lo < hi <= 100, got {lo, hi}")


@dataclass
class AugmentConfig:
    """Strong intensity augmentation (vendor-style appearance change) and light geometry."""

    intensity: bool = True
    prob: float = 0.8
    gamma: tuple[float, float] = (0.5, 2.0)
    bias_field: float = 0.4
    noise_std: float = 0.08
    contrast_shift: float = 0.25
    non_monotone: float = 0.0
    """Probability of a non-monotone intensity remap (tissue order may change between vendors)."""
    flip: bool = False
    """Random flips: each sample is flipped along H with probability 0.5 and along W with
    probability 0.5, independently (of each other and of ``prob``). See
    :mod:`jras_core.data.spatial`, which applies ``flip``, ``rotate_deg`` and ``scale``."""
    rotate_deg: float = 0.0
    """Random in-plane rotation about the slice centre: with probability ``prob`` a sample is
    rotated by an angle uniform in ``[-rotate_deg, rotate_deg]`` degrees, in [0, 180]
    (sources can differ by ~90 degrees in orientation). 0: no rotation."""
    scale: float = 0.0
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
    test_views: int = 0
    """Test-time augmentation: the prediction averages the class probabilities of the
    unchanged query and of this many randomly changed views of it, drawn as in training (under
    ``guides: shared`` a query and its guides share each change). Inference only; each view
    costs one more guided forward. 0: no extra views. Measured: ``docs/results/levers.md``."""

    def validate(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"augment.prob must be in [0, 1], got {self.prob}")
        if not 0.0 <= self.non_monotone <= 1.0:
            raise ConfigError(f"augment.non_monotone must be in [0, 1], got {self.non_monotone}")
        if self.gamma[0] <= 0 or self.gamma[0] > self.gamma[1]:
            raise ConfigError(f"augment.gamma must be a range of positive numbers, got {self.gamma}")
        if not 0.0 <= self.rotate_deg <= 180.0:
            raise ConfigError(f"augment.rotate_deg must be in [0, 180], got {self.rotate_deg}")
        if not 0.0 <= self.scale < 1.0:
            raise ConfigError(f"augment.scale must be in [0, 1), got {self.scale}")
        if self.test_views < 0:
            raise ConfigError(f"augment.test_views must be >= 0, got {self.test_views}")
        if self.test_views and not self.intensity:
            raise ConfigError("augment.test_views draws intensity changes: it needs augment.intensity: true")


@dataclass
class SegmenterConfig:
    backbone: Literal["unet", "dynunet", "swinunetr", "segformer"] = "unet"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    fusion: Literal["concat", "prior", "feature", "none"] = "concat"
    dropout: float = 0.0
    guide_init: Literal["default", "zero"] = "zero"
    """Initial weights of the backbone's input connections from the guide channels:
    ``default`` (the layer's own initialisation) or ``zero`` (the segmenter starts as the
    plain one and learns to use its guides only as far as they help)."""
    appearance: bool = True
    """Also feed the segmenter the query's class probabilities under a per-class intensity
    model fitted to its guides (which intensities mean which tissue at this scanner)."""
    guide_path: Literal["input", "residual"] = "residual"
    """Where the guides enter. ``input``: as extra channels of the backbone's input (one
    network for the guided and the guide-free path). ``residual``: the backbone sees the query
    alone and is trained as a plain segmenter; a small head (``head_channels``) reads the
    query, the backbone's prediction and the guides and adds a correction, starting at zero
    (:class:`~jras_core.models.segmenter.GuidedSegmenter`)."""
    head_channels: tuple[int, ...] = (16, 32, 64)
    """Widths of the ``residual`` head's U-Net."""
    refine: bool = False
    """With ``fusion: none`` (no retrieval): give the plain segmenter the residual head all the
    same, reading the query and the backbone's prediction only. A two-stage cascade of the
    residual J-RAS segmenter's size without guides: the control for what that head adds beyond
    its guides. Ignored by segmenters that use guides."""
    norm: Literal["batch", "instance"] = "batch"
    """Normalisation of the segmenter's convolutions: ``batch`` (batch statistics, running
    averages at inference; AdaBN re-estimates them at a new site) or ``instance`` (each
    slice's own feature statistics with a learned scale and shift, as nnU-Net does: nothing
    to average across sites or re-estimate at a new one)."""

    def validate(self) -> None:
        if len(self.channels) < 2:
            raise ConfigError("segmenter.channels needs at least two levels")
        if len(self.head_channels) < 2 or min(self.head_channels) < 1:
            raise ConfigError("segmenter.head_channels needs at least two positive levels")


@dataclass
class RetrieverConfig:
    embed_dim: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 64)
    input: Literal["image", "image+pred"] = "image+pred"
    """What the retriever sees: the image alone, or the image plus the pass-1 prediction."""
    mode: Literal["learned", "frozen", "mask"] = "learned"
    """learned: trained contrastively; frozen: never trained; mask: non-learned ranking by
    centroid-aligned mask Dice against the pass-1 prediction (ablation)."""
    pool_grid: int = 1
    """Pooling of the encoder's last feature map before the projection head: 1 averages it
    to one vector; g > 1 averages it to a g x g grid kept in the embedding (where things are)."""
    input_size: int | None = None
    """Side in pixels to which the retriever's inputs (bank entries and queries alike) are
    resampled by area averaging before its encoder; None: the slice size. Half the slice
    size makes the retriever about four times cheaper (phase B, bank refresh, query embedding)."""

    def validate(self) -> None:
        if self.embed_dim < 2:
            raise ConfigError(f"retriever.embed_dim must be >= 2, got {self.embed_dim}")
        if self.pool_grid < 1:
            raise ConfigError(f"retriever.pool_grid must be >= 1, got {self.pool_grid}")
        if self.input_size is not None and (self.input_size < 16 or self.input_size % 16):
            raise ConfigError(f"retriever.input_size must be a multiple of 16 and >= 16, got {self.input_size}")


@dataclass
class RetrievalConfig:
    k: int = 3
    train_pool: int = 5
    """During training the K guides are drawn from the top ``train_pool`` (K+2)."""
    guide_dropout: float = 0.0
    """Probability that a phase-A query trains without guides. Under ``segmenter.guide_path:
    residual`` the guide-free path trains on every query anyway, and a dropped query only
    withholds a step from the head; under ``input`` the one network learns both paths from it."""
    align_centroid: bool = True
    """Shift guides onto the query's pass-1 centroid before fusion."""
    align_scale: float = 1.0
    """Also magnify each guide about that centroid so that its foreground area matches the
    query's predicted one, by a factor between ``1 / align_scale`` and ``align_scale``.
    1.0: no scaling. Needs ``align_centroid``. Measured: ``docs/results/levers.md``."""
    index: Literal["flat", "hnsw"] = "flat"
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
    test_draws: int = 1
    """Guide sets per query at inference. 1: the top K. n > 1: the segmenter's softmax is
    averaged over the top K and n - 1 random draws of K from the top ``train_pool`` (drawn
    as training draws them); n segmenter forwards per query instead of one. Training is
    unchanged."""
    test_passes: int = 2
    """Retrieval rounds at inference. 1: retrieve (and align the guides) with the guide-free
    pass-1 prediction. n > 1: retrieve again with the previous round's guided prediction, as
    training does with its reused pass 1 (``first_pass: reuse``); n - 1 extra retrievals and
    segmenter forwards per query. Measured: ``docs/results/levers.md``."""

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"retrieval.k must be >= 1, got {self.k}")
        if self.train_pool < self.k:
            raise ConfigError(f"retrieval.train_pool ({self.train_pool}) must be >= k ({self.k})")
        if not 0.0 <= self.guide_dropout < 1.0:
            raise ConfigError(f"retrieval.guide_dropout must be in [0, 1), got {self.guide_dropout}")
        if self.test_draws < 1:
            raise ConfigError(f"retrieval.test_draws must be >= 1, got {self.test_draws}")
        if self.test_passes < 1:
            raise ConfigError(f"retrieval.test_passes must be >= 1, got {self.test_passes}")
        if self.align_scale < 1.0:
            raise ConfigError(f"retrieval.align_scale is the largest magnification, >= 1 (1: none), "
                              f"got {self.align_scale}")
        if self.align_scale > 1.0 and not self.align_centroid:
            raise ConfigError("retrieval.align_scale magnifies guides about the query's centroid: "
                              "it needs retrieval.align_centroid: true")


@dataclass
class ContrastiveConfig:
    candidates: int = 8
    """M candidates per query: top M/2 by the current retriever plus random ones."""
    relevance: Literal["utility", "mask"] = "mask"
    tau: float = 0.1
    tau_relevance: float = 0.05
    lr: float = 1e-3
    steps_per_epoch: int | None = None
    """Batches of phase B per local epoch (None: one pass over the data)."""
    batch_fraction: float = 0.4
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

    def validate(self) -> None:
        if self.candidates < 2:
            raise ConfigError(f"contrastive.candidates must be >= 2, got {self.candidates}")
        if not 0.0 < self.batch_fraction <= 1.0:
            raise ConfigError(f"contrastive.batch_fraction must be in (0, 1], got {self.batch_fraction}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"contrastive.steps_per_epoch must be >= 1 or null, got {self.steps_per_epoch}")
        if self.tau <= 0 or self.tau_relevance <= 0:
            raise ConfigError("contrastive.tau and contrastive.tau_relevance must be positive")


@dataclass
class TrainConfig:
    epochs: int = 25
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    num_threads: int | None = None
    """torch intra-op threads (None: leave torch's default)."""
    proximal_mu: float = 0.0
    device: str = "auto"
    """Where the models compute: ``auto`` (a CUDA device when one is present, else the CPU),
    ``cpu``, ``cuda`` or ``cuda:N``. Slices, banks and the FAISS index stay on the CPU; each
    batch crosses to the device once. Asking for CUDA where there is none is an error."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Arithmetic of the models' forwards and backwards (``torch.autocast``): ``fp32``, ``bf16``
    (CUDA or CPU) or ``fp16`` (CUDA only, with a gradient scaler). Training, inference and
    AdaBN alike; weights stay fp32."""

    def validate(self) -> None:
        if not DEVICE_PATTERN.match(self.device.strip().lower()):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.epochs < 0:
            raise ConfigError(f"train.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")


@dataclass
class PostprocessConfig:
    """What is done to predicted label maps before they are scored."""

    largest_component: bool = True
    """Keep only the largest connected component of each class in each volume (3-D, faces
    connected), which removes stray islands far from the structure."""

    def validate(self) -> None:
        pass


@dataclass
class AdaptConfig:
    """What a site that never trained (a held-out site, evaluated with its support bank) does
    to the global model before it evaluates; training is unchanged."""

    norm_stats: bool = True
    """Re-estimate every batch-norm layer's running statistics from the site's own support
    images (AdaBN, :func:`jras_core.training.adapt.recalibrate_norm`) instead of keeping the
    federation's. False: keep the federation's. Measured: ``docs/results/levers.md``."""
    guides: Literal["always", "auto", "never"] = "always"
    """Whether a held-out site predicts with its retrieved guides. ``always``; ``never`` (the
    segmenter's guide-free path); ``auto``: the site decides on its own support cases, each
    predicted with guides from its other support cases (or, at a one-patient site, from the
    patient's other volumes) and without guides, and keeps guides only if they score at least
    as well (:func:`jras_core.training.adapt.choose_guides`). Retrieval methods only."""

    def validate(self) -> None:
        pass


@dataclass
class JRASConfig:
    """The whole method configuration."""

    labels: LabelConfig = field(default_factory=LabelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    @property
    def uses_retrieval(self) -> bool:
        return self.segmenter.fusion != "none"

    @property
    def trains_retriever(self) -> bool:
        return self.uses_retrieval and self.retriever.mode == "learned"

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "<dict>") -> JRASConfig:
        cfg = from_mapping(cls, data or {}, source=source)
        try:
            cfg.validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> JRASConfig:
        return cls.from_dict(load_yaml(path), source=str(path))

    def with_overrides(self, overrides: Mapping[str, Any]) -> JRASConfig:
        """A copy with dotted-key overrides applied, e.g. ``{"train.epochs": 3}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                if part not in node or not isinstance(node[part], dict):
                    raise ConfigError(f"unknown config key {key!r}")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"unknown config key {key!r}")
            node[parts[-1]] = value
        return JRASConfig.from_dict(data, source="overrides")


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


def from_mapping(cls: type, data: Mapping[str, Any], source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}"
        )
    required = sorted(
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in data
    )
    if required:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: missing key(s) {required} in {where}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, source, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value if value is not None else {}, source, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must have {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, source, key) for a, v in zip(args, value))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, source, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{source}: {key} must be a path, got {value!r}")
        return Path(value)
    return value


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
