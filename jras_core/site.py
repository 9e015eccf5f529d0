"""A site: its configuration (one YAML), its data splits, its private bank, and
the local training and evaluation that the federation asks of it.

Everything here is plain Python; the Flower ClientApp only translates messages
into calls of :class:`Site`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field, StrictFloat, StrictInt, StrictStr, field_validator

from jras_core.config import ConfigError, JRASConfig, Section, config_class, load_yaml, validate_as
from jras_core.data.slices import PREPROCESS_VERSION, SliceSet, build_slice_set
from jras_core.data.sources import DataSourceConfig, load_volumes, source_digest
from jras_core.data.volume import DataError
from jras_core.files import resolve_path
from jras_core.models.jras import JRASModel
from jras_core.models.retriever import RetrieverModule
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.crypto import ENV_VAR, resolve_key
from jras_core.retrieval.store import BankStore
from jras_core.site_store import SiteStore
from jras_core.sysinfo import release_free_heap
from jras_core.training.adapt import choose_guides
from jras_core.training.evaluate import evaluate
from jras_core.training.joint import JRASTrainer
from jras_core.training.lr_schedule import TrainingSpan

log = logging.getLogger(__name__)

SITE_NAME_MAX = 64
"""Longest site name."""

_SITE_NAME = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{SITE_NAME_MAX - 1}}}")


def check_site_name(name: str) -> str:
    """``name`` if it is a safe site name, else ValueError: letters, digits, ``-``, ``_`` and
    ``.`` (not first), at most :data:`SITE_NAME_MAX` characters. A site's name becomes part of
    file names (its store, per-site results), so it must not hold a path."""
    if not _SITE_NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid site name: use letters, digits, '-', '_' and '.' "
            f"(not first), at most {SITE_NAME_MAX} characters"
        )
    return name


def safe_site_name(text: str) -> str:
    """A valid site name made from ``text`` (e.g. a file's stem): other characters become
    ``_``, a leading ``.`` is dropped, the length is cut to :data:`SITE_NAME_MAX`."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:SITE_NAME_MAX]
    return name or "site"


@config_class
class SiteConfig:
    """One site (hospital) as described by its YAML file.

    Attributes:
        name: site name, unique in a federation: letters, digits, ``-``, ``_`` and ``.``
            (not first), at most 64 characters.
        data: where the site's annotated volumes come from.
        vendor: scanner vendor label used in reports.
        val_fraction: fraction of cases held out for validation (split by case).
        split_seed: seed of the case split.
        support_cases: for a site that never trains (held-out vendor): number of its
            annotated cases that form its bank; the rest is evaluated.
        bank_dir: where the site's bank is stored (``jras bank build``, ``jras site init``);
            relative to the site YAML's folder.
        key_file: the site's bank encryption key file (32 bytes, mode 0600; relative to
            the site YAML's folder). Without it, ``$JRAS_BANK_KEY`` is used if set; with
            neither, the bank is stored unencrypted.
        cache_dir: folder of the site's encrypted store of derived data (preprocessed slices,
            bank embeddings; :attr:`Site.store`), sealed with the site's key; relative to the
            site YAML's folder. None: the store is in ``bank_dir``. Without a key nothing
            derived is written: the site keeps it in memory.
        adapted_model: where the site keeps its model adapted to its own cases (``jras site
            adapt``'s default ``--out``, a federation's ``personalise``); relative to the site
            YAML's folder. None: ``<cache_dir or the YAML's folder>/<name>-adapted.pt``.
    """

    name: Annotated[StrictStr, Field(min_length=1)]
    data: Section[DataSourceConfig] = field(default_factory=DataSourceConfig)
    vendor: StrictStr = ""
    val_fraction: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.2
    split_seed: StrictInt = 0
    support_cases: Annotated[StrictInt, Field(ge=1)] | None = None
    bank_dir: StrictStr | None = None
    key_file: StrictStr | None = None
    cache_dir: StrictStr | None = None
    adapted_model: StrictStr | None = None

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_site_name(value)

    def validate(self, root: Path | None = None, source: str = "site config") -> None:
        """Raise :class:`ConfigError` (naming ``source``) if the values are invalid or the
        data source is incomplete or points nowhere (relative paths against ``root``)."""
        validate_as(type(self), dataclasses.asdict(self), source)  # values changed in place
        self.data.validate(root, source=source, prefix="data.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>", root: Path | None = None) -> SiteConfig:
        cfg = validate_as(cls, data, source)
        cfg.validate(root, source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, root: Path | None = None) -> SiteConfig:
        """Load a site YAML; relative data paths resolve against ``root`` (default: the YAML's folder)."""
        path = Path(path)
        return cls.from_dict(load_yaml(path), source=str(path), root=root or path.parent)


class Site:
    """A site's data and the local work the federation asks of it.

    Args:
        config: the site's configuration.
        method: the method configuration (labels, preprocessing, training).
        root: folder that relative data paths resolve against.
    """

    def __init__(self, config: SiteConfig, method: JRASConfig, root: Path | None = None):
        self.config = config
        self.method = method
        self.root = root
        self._slices: SliceSet | None = None
        self._split: tuple[SliceSet, SliceSet] | None = None
        self._bank: RetrievalBank | None = None
        self._store: SiteStore | None | bool = False  # False: not resolved yet
        self._digest: str | None = None
        """The digest of the slices in memory (None: not stored)."""
        self._stored_fingerprint: str | None = None
        """The retriever fingerprint of the bank embeddings in the store."""

    @classmethod
    def from_yaml(cls, path: str | Path, method: JRASConfig) -> Site:
        """The site of a site YAML, its relative paths against the YAML's folder."""
        path = Path(path)
        return cls(SiteConfig.from_yaml(path), method, path.parent)

    @property
    def name(self) -> str:
        return self.config.name

    # ------------------------------------------------------------------ paths and bank storage
    def resolve_path(self, value: str | Path | None) -> Path | None:
        """A path from the site YAML: ``~`` expanded, relative to the YAML's folder (:attr:`root`)."""
        if not value:
            return None
        return resolve_path(value, [self.root] if self.root is not None else [])

    @property
    def key_path(self) -> Path | None:
        """The site's key file (``key_file`` resolved against the YAML's folder), or None."""
        return self.resolve_path(self.config.key_file)

    @property
    def bank_path(self) -> Path | None:
        """The site's bank directory (``bank_dir`` resolved against the YAML's folder), or None."""
        return self.resolve_path(self.config.bank_dir)

    @property
    def adapted_model_path(self) -> Path:
        """Where the site's adapted model is written (``adapted_model``, else
        ``<cache_dir or the YAML's folder>/<name>-adapted.pt``)."""
        path = self.resolve_path(self.config.adapted_model)
        if path is not None:
            return path
        folder = self.resolve_path(self.config.cache_dir) or self.root or Path.cwd()
        return Path(folder) / f"{self.name}-adapted.pt"

    def bank_store(self, directory: str | Path | None = None, key_file: str | Path | None = None) -> BankStore:
        """The store of the site's bank: in ``directory`` (default ``bank_dir``), encrypted with
        the key from ``key_file`` (default the site's ``key_file``, else ``$JRAS_BANK_KEY``)."""
        folder = Path(directory) if directory is not None else self.bank_path
        if folder is None:
            raise ConfigError(f"site {self.name}: no bank directory (set bank_dir in the site YAML or pass --out)")
        return BankStore(folder, key=resolve_key(key_file or self.key_path))

    # ------------------------------------------------------------------ derived data
    @property
    def store_path(self) -> Path | None:
        """The folder of the site's :attr:`store`: ``cache_dir``, else ``bank_dir`` (resolved
        against the YAML's folder), or None."""
        return self.resolve_path(self.config.cache_dir) or self.bank_path

    @property
    def store(self) -> SiteStore | None:
        """The site's encrypted store of derived data (:class:`~jras_core.site_store.SiteStore`):
        in ``cache_dir``, else ``bank_dir``, sealed with the site's key (``key_file``, else
        ``$JRAS_BANK_KEY``). None without a key or a folder: the site then keeps its derived
        data in memory and rebuilds it in every process (one warning says so)."""
        if self._store is False:
            key = resolve_key(self.key_path)
            folder = self.store_path
            if key is None:
                self._store = None
                log.warning("site %s: no key (key_file in the site YAML, or $%s): its derived data (preprocessed "
                            "slices, bank embeddings) is kept in memory only, unencrypted, and rebuilt by every "
                            "process%s", self.name, ENV_VAR,
                            "; cache_dir is not used without a key" if self.config.cache_dir else "")
            elif folder is None:
                self._store = None
                log.warning("site %s: no cache_dir or bank_dir: its derived data is kept in memory only and "
                            "rebuilt by every process", self.name)
            else:
                self._store = SiteStore(folder, key, self.name)
                self._drop_plaintext_caches(folder)
        return self._store

    def _drop_plaintext_caches(self, folder: Path) -> None:
        """Remove the site's unencrypted slice caches (``<name>-<digest>.pt``) from ``folder``:
        the encrypted store replaces them."""
        pattern = re.compile(re.escape(f"{self.name}-") + r"[0-9a-f]{16}\.pt")
        for path in folder.iterdir() if folder.is_dir() else ():
            if pattern.fullmatch(path.name):
                path.unlink(missing_ok=True)
                log.warning("site %s: removed the unencrypted slice cache %s (the encrypted store replaces it)",
                            self.name, path)

    def _data_digest(self) -> str:
        """Digest of what the slices derive from: the data source's config and the bytes of
        every file it reads (:func:`~jras_core.data.sources.source_digest`), the preprocessing
        (its settings and :data:`~jras_core.data.slices.PREPROCESS_VERSION`) and the label set,
        so that an edited image or mask, or other settings, never reuse slices built before."""
        key = json.dumps(
            {
                "data": source_digest(self.config.data, self.root),
                "pre": vars(self.method.preprocess),
                "version": PREPROCESS_VERSION,
                "labels": self.method.labels.names,
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _bank_digest(self, data_digest: str) -> str:
        """Digest of the bank's entries: the slices' digest and the split that picks them."""
        key = json.dumps([data_digest, self.config.val_fraction, self.config.split_seed, self.config.support_cases])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def slices(self) -> SliceSet:
        """All preprocessed labelled slices of the site: read from the site's :attr:`store` when
        it holds them for the present data and preprocessing, else built from the data (and
        stored); kept in memory."""
        if self._slices is None:
            store = self.store
            digest = self._data_digest() if store is not None else None
            stored = store.load("slices", digest) if store is not None else None
            if stored is not None:
                self._slices = SliceSet.from_arrays(*stored)
                del stored
            else:
                try:
                    # one volume at a time: read, preprocessed, let go
                    volumes = load_volumes(self.config.data, self.method.labels.num_classes, self.root, stream=True)
                    self._slices = build_slice_set(volumes, self.method.preprocess, self.method.labels.num_classes)
                except DataError as exc:
                    raise DataError(f"site {self.name}: {exc}") from None
                release_free_heap()  # the volumes' pages, freed but kept by the C heap
                if store is not None:
                    store.save("slices", digest, *self._slices.to_arrays())
            self._digest = digest
            log.info("site %s: %d slices of %d cases", self.name, len(self._slices), len(self._slices.cases))
        return self._slices

    def _splits(self) -> tuple[SliceSet, SliceSet]:
        if self._split is None:
            slices = self.slices
            if self.config.support_cases is not None:
                try:
                    chosen = slices.random_cases(self.config.support_cases, self.config.split_seed)
                except DataError as exc:
                    raise DataError(f"site {self.name}: {exc} (support_cases in the site YAML)") from None
                whole, rest, support = slices.partition(chosen)
                self._split = support, rest
            else:
                whole, train, val = slices.partition(slices.validation_cases(self.config.val_fraction,
                                                                             self.config.split_seed))
                self._split = train, val
            # the site keeps the parted copy, whose two parts are views of it: one copy in memory
            self._slices = whole
        return self._split

    @property
    def no_validation(self) -> str | None:
        """Why the site has no validation slices, or None when it has some. A site of one
        case trains on it and is not evaluated (a case is never split)."""
        if len(self.val_set) > 0:
            return None
        cases = len(self.slices.cases)
        if cases < 2:
            return (f"site {self.name}: no validation cases: the site has {cases} case, and a case is never "
                    "split between training and validation (add cases to evaluate it)")
        return f"site {self.name}: no validation cases (val_fraction is {self.config.val_fraction})"

    @property
    def train_set(self) -> SliceSet:
        """Training slices (for a held-out site: its support cases)."""
        return self._splits()[0]

    @property
    def val_set(self) -> SliceSet:
        """Validation slices (for a held-out site: every case not in the support set)."""
        return self._splits()[1]

    @property
    def bank(self) -> RetrievalBank:
        """The site's private bank over its training (or support) slices."""
        if self._bank is None:
            self._bank = RetrievalBank.for_method(self.train_set, self.method)
            if self.store is not None and self._digest is not None:
                stored = self.store.load("bank", self._bank_digest(self._digest))
                if stored is not None:
                    arrays, meta = stored
                    try:
                        self._bank.offer_embeddings(arrays["embeddings"], str(meta["retriever"]))
                        self._stored_fingerprint = str(meta["retriever"])
                    except (KeyError, ValueError) as exc:
                        log.warning("site %s: ignoring stored bank embeddings that do not fit the bank (%s)",
                                    self.name, exc)
        return self._bank

    def refresh_bank(self, retriever: RetrieverModule) -> RetrievalBank:
        """The site's :attr:`bank`, embedded with ``retriever`` (reusing the stored embeddings
        when they were computed with exactly these weights), and its embeddings stored when
        they are new: the next process that embeds with the same weights (a deployment's
        evaluation, then the next round's training from the same global model) reads them."""
        bank = self.bank
        bank.refresh(retriever)
        store = self.store
        if store is not None and self._digest is not None and bank.embeddings is not None:
            fingerprint = bank.embedded_fingerprint
            if fingerprint is not None and fingerprint != self._stored_fingerprint:
                store.save("bank", self._bank_digest(self._digest), {"embeddings": bank.embeddings},
                           {"retriever": fingerprint})
                self._stored_fingerprint = fingerprint
        return bank

    # ------------------------------------------------------------------ work
    def train(
        self,
        model: JRASModel,
        epochs: int | None = None,
        proximal_reference: Mapping[str, torch.Tensor] | None = None,
        writer=None,
        progress: bool = False,
        method: JRASConfig | None = None,
        span: TrainingSpan | None = None,
    ) -> dict[str, float]:
        """Run local epochs of the alternating optimisation; returns scalar metrics
        (averaged over the epochs) including ``num-examples``.

        ``span``: where these epochs lie in the whole training (a federated round's place,
        which sets its learning rate under ``train.lr_schedule``; default: these epochs are
        the whole training).

        ``method``: the method config of this call, e.g. with a round's seed (default: the
        site's); it must preprocess as the site's does (the slices and bank are the site's).
        """
        method = method or self.method
        bank = self.bank if method.uses_retrieval else None
        # the prediction memory (retrieval.first_pass: reuse) lives for this call only: a
        # round depends on the global model and the site's data alone, so a resumed or
        # rescheduled round computes what it would have computed
        trainer = JRASTrainer(
            model, method, self.train_set, bank=bank,
            proximal_reference=proximal_reference, writer=writer, progress=progress, span=span,
        )
        history = trainer.fit(epochs)
        out = {k: float(np.mean([h[k] for h in history])) for k in history[0]} if history else {}
        out["num-examples"] = float(len(self.train_set))
        return out

    def evaluate(self, model: JRASModel, diagnostics: bool = True) -> dict[str, float]:
        """Dice/HD95 on the validation split, retrieving from the site's own bank."""
        if self.no_validation is not None:
            raise ConfigError(self.no_validation)
        bank = None
        if self.method.uses_retrieval:
            bank = self.refresh_bank(model.retr)
        choice = None
        if self.config.support_cases is not None:  # held out: it may decide against its guides
            choice = choose_guides(model, self.train_set, self.method, bank)
        out = evaluate(model, self.val_set, self.method, bank, diagnostics=diagnostics,
                       use_guides=choice is None or choice.use_guides)
        if choice is not None and self.method.adapt.guides == "auto" and bank is not None:
            out["support_dice_guided"], out["support_dice_noguide"] = choice.dice_guided, choice.dice_noguide
        out["num-examples"] = float(len(self.val_set))
        return out
