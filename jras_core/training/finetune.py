"""Adapting a global model to one site with the site's annotated cases: AdaBN, then
fine-tuning with early stopping.

:func:`adapt_site` is what ``jras site adapt``, the benchmarks' ``+ft`` methods and a
federation's personalisation (run config ``personalise``) call. It

1. re-estimates the batch-norm statistics on all the site's images (AdaBN,
   :func:`~jras_core.training.adapt.recalibrate_norm`) when ``adapt.norm_stats`` says so;
2. holds out part of the site's annotated data to choose the epoch (:func:`holdout_split`):
   ``adapt.val_fraction`` of its **cases** (at least one, at least one left to fit). A site
   with fewer than ``adapt.min_cases`` cases (default 2) is **not fine-tuned** (AdaBN only):
   one patient's other volume is too alike to the fitted one to judge overfitting to that
   patient. With ``min_cases: 1`` a single case holds out one of its **volumes** (e.g. ES when
   ED is fitted); a single volume is never fine-tuned (slices of one volume judge nothing);
3. fine-tunes the segmenter (phase A of :class:`~jras_core.training.joint.JRASTrainer`, with
   guides from a bank of the fitted cases alone) and, with ``adapt.tune_retriever``, the
   retriever (phase B) at ``adapt.lr``, for at most ``adapt.epochs`` epochs, scoring the
   held-out part after each epoch as inference predicts it (two passes, retrieval from the
   fitted cases' bank, post-processing; volume Dice);
4. stops after ``adapt.patience`` epochs without a better score and returns the best
   checkpoint, **epoch 0 included** (the model after AdaBN, before any step): on its own
   held-out cases the result is never worse than not fine-tuning.

``adapt.val_fraction: 0`` fine-tunes ``adapt.epochs`` epochs on every case and keeps the
last (fixed-epoch fine-tuning, with none of the guarantees above).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from jras_core.config import JRASConfig
from jras_core.data.slices import SliceSet
from jras_core.device import place
from jras_core.metrics import summarise, volume_metrics
from jras_core.models.jras import JRASModel
from jras_core.retrieval.bank import RetrievalBank
from jras_core.training.adapt import recalibrate_norm
from jras_core.training.evaluate import predict
from jras_core.training.joint import JRASTrainer

log = logging.getLogger(__name__)


@dataclass
class Adaptation:
    """What :func:`adapt_site` did, for the checkpoint's metadata and the printed table.

    Attributes:
        norm_stats: batch-norm statistics were re-estimated on the site's images (AdaBN).
        holdout: the unit held out for early stopping: ``case``, ``volume`` or ``none``
            (nothing held out: fine-tuning skipped at a one-volume site, or
            ``val_fraction: 0``).
        fit_cases, val_cases: cases (for ``volume``: volumes) fitted and held out.
        fit_slices, val_slices: their slices.
        epochs_run: fine-tuning epochs trained (0: none).
        best_epoch: the epoch whose weights were kept (0: the model before fine-tuning).
        val_dice_start: held-out volume Dice before fine-tuning (after AdaBN); NaN without
            a held-out part.
        val_dice_best: held-out volume Dice of the kept weights.
        val_dice: held-out Dice after each epoch, epoch 0 first.
        note: why fine-tuning was skipped or stopped.
    """

    norm_stats: bool
    holdout: str
    fit_cases: int
    val_cases: int
    fit_slices: int
    val_slices: int
    epochs_run: int = 0
    best_epoch: int = 0
    val_dice_start: float = float("nan")
    val_dice_best: float = float("nan")
    val_dice: list[float] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for a checkpoint's ``adaptation`` entry; torch's safe loader reads it)."""
        return asdict(self)

    def metrics(self, prefix: str = "adapt-", sep: str = "-") -> dict[str, float]:
        """The scalar figures, e.g. as a site reports them to the server (no data, no weights):
        ``<prefix>epochs-run``, ``best-epoch``, ``val-dice-start``, ``val-dice-best`` (words joined by ``sep``)."""
        values = {"epochs-run": float(self.epochs_run), "best-epoch": float(self.best_epoch),
                  "val-dice-start": self.val_dice_start, "val-dice-best": self.val_dice_best}
        return {prefix + k.replace("-", sep): v for k, v in values.items()}

    def rows(self) -> list[tuple[str, str]]:
        """``(item, value)`` rows of a two-column table."""
        unit = "volumes" if self.holdout == "volume" else "cases"
        return [
            ("AdaBN", "yes" if self.norm_stats else "no"),
            ("held out", f"{self.holdout}" + (f" ({self.val_cases} {unit}, {self.val_slices} slices)"
                                             if self.holdout != "none" else "")),
            ("fitted", f"{self.fit_cases} {unit}, {self.fit_slices} slices"),
            ("epochs run", str(self.epochs_run)),
            ("best epoch", str(self.best_epoch)),
            ("val Dice before", _fmt(self.val_dice_start)),
            ("val Dice after", _fmt(self.val_dice_best)),
            *([("note", self.note)] if self.note else []),
        ]


def _fmt(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.4f}"


def holdout_split(slices: SliceSet, val_fraction: float, seed: int) -> tuple[SliceSet, SliceSet, str]:
    """``(fit, held_out, unit)``: the site's slices split for early stopping, deterministic in ``seed``.

    ``unit`` is ``case`` (two or more cases: ``round(val_fraction x cases)`` whole cases held
    out, at least one, at least one left), ``volume`` (one case of several volumes: one volume
    held out) or ``none`` (one volume, or ``val_fraction`` 0: ``held_out`` is empty).
    """
    empty = slices.subset([])
    if val_fraction <= 0:
        return slices, empty, "none"
    cases = sorted(set(slices.case_ids.tolist()))
    if len(cases) > 1:
        fit, val = slices.split_by_case(val_fraction, seed)
        return fit, val, "case"
    volumes = sorted(set(slices.volume_ids.tolist()))
    if len(volumes) > 1:
        n_val = min(max(int(round(val_fraction * len(volumes))), 1), len(volumes) - 1)
        order = np.random.default_rng(seed).permutation(len(volumes))
        held = {volumes[i] for i in order[:n_val]}
        is_val = torch.tensor([v in held for v in slices.volume_ids.tolist()], dtype=torch.bool)
        return (slices.subset(torch.nonzero(~is_val).flatten()), slices.subset(torch.nonzero(is_val).flatten()),
                "volume")
    return slices, empty, "none"


def validation_dice(model: JRASModel, slices: SliceSet, cfg: JRASConfig, bank: RetrievalBank | None) -> float:
    """Mean volume Dice (foreground classes) of ``model`` on ``slices`` as inference predicts
    them (:func:`~jras_core.training.evaluate.predict`: two passes, guides retrieved from
    ``bank``, post-processing), without guides where ``adapt.guides`` is ``never``."""
    source = "none" if cfg.adapt.guides == "never" else "retrieved"
    if bank is not None and cfg.uses_retrieval:
        bank.refresh(model.retr)
    pred, _ = predict(model, slices, cfg, bank, source, exclude_own_case=True)
    dice = volume_metrics(pred, slices, cfg.labels.num_classes, hd95=False)["dice"]
    return summarise(dice, cfg.labels.names, "d")["d_mean"]


def _better(value: float, best: float) -> bool:
    return math.isfinite(value) and (not math.isfinite(best) or value > best)


def adapt_site(
    model: JRASModel,
    slices: SliceSet,
    cfg: JRASConfig,
    bank: RetrievalBank | None = None,
    norm_stats: bool | None = None,
    progress: bool = False,
) -> tuple[JRASModel, Adaptation]:
    """A copy of ``model`` adapted to a site with its annotated ``slices`` (see the module).

    Args:
        model: the global model (unchanged).
        slices: the site's annotated slices ``(N, 1, S, S)`` with masks ``(N, S, S)``, several
            cases or volumes (the split for early stopping is by case, else by volume).
        cfg: method configuration; ``adapt`` says what is done, ``train.seed`` seeds the split
            and the fine-tuning.
        bank: the site's bank over ``slices`` (retrieval methods; default: one is built for
            AdaBN): used by AdaBN and refreshed with the adapted retriever at the end;
            fine-tuning retrieves from a bank of its fitted cases only (the held-out cases
            must not guide training).
        norm_stats: re-estimate batch-norm statistics (default ``cfg.adapt.norm_stats``;
            True for a FedBN model, which has no shared statistics).
        progress: show a progress bar over the epochs.

    Returns:
        the adapted model (on ``train.device``, eval mode) and what was done.
    """
    a = cfg.adapt
    if len(slices) == 0:
        raise ValueError("adapt_site needs at least one annotated slice")
    adapted = copy.deepcopy(model)
    place(adapted, cfg.train.device)
    norm = a.norm_stats if norm_stats is None else norm_stats
    if norm:
        # the guided path's statistics need guides: a retrieval method without a bank gets one
        norm_bank = bank if bank is not None or not cfg.uses_retrieval else RetrievalBank.for_method(slices, cfg)
        recalibrate_norm(adapted, slices, cfg, norm_bank)
    fit, val, unit = holdout_split(slices, a.val_fraction, cfg.train.seed)
    unit_ids = (lambda s: set(s.volume_ids.tolist())) if unit == "volume" else (lambda s: set(s.case_ids.tolist()))
    record = Adaptation(norm, unit, len(unit_ids(fit)), len(unit_ids(val)), len(fit), len(val))
    n_cases = len(set(slices.case_ids.tolist()))
    if a.epochs == 0:
        record.note = "adapt.epochs is 0: AdaBN only"
    elif a.val_fraction > 0 and n_cases < a.min_cases:
        record.note = f"{n_cases} annotated case(s), fewer than adapt.min_cases ({a.min_cases}): not fine-tuned"
    elif unit == "none" and a.val_fraction > 0:
        record.note = "a single annotated volume: nothing to hold out, not fine-tuned"
    if record.note:
        _finish(adapted, cfg, bank, record)
        return adapted, record

    ft_cfg = cfg.with_overrides({"train.lr": a.lr, "contrastive.lr": a.lr, "train.lr_schedule": "constant"})
    fit_bank = None
    if cfg.uses_retrieval:
        fit_bank = bank if (unit == "none" and bank is not None) else RetrievalBank.for_method(fit, cfg)
    trainer = JRASTrainer(adapted, ft_cfg, fit, bank=fit_bank)
    tune_retriever = a.tune_retriever and cfg.trains_retriever
    validated = unit != "none"
    best = validation_dice(adapted, val, cfg, fit_bank) if validated else float("nan")
    record.val_dice_start = record.val_dice_best = best
    record.val_dice.append(best)
    best_state = copy.deepcopy(adapted.state_dict())
    stale = 0
    bar = tqdm(range(1, a.epochs + 1), desc="fine-tuning", leave=False, disable=not progress)
    for epoch in bar:
        trainer.phase_segmenter(guided=trainer.epoch_is_guided(epoch - 1, a.epochs))
        if tune_retriever:
            trainer.phase_retriever()
        trainer.epoch += 1
        record.epochs_run = epoch
        if not validated:
            continue
        score = validation_dice(adapted, val, cfg, fit_bank)
        record.val_dice.append(score)
        bar.set_postfix(val_dice=f"{score:.3f}", best=f"{record.val_dice_best:.3f}")
        if _better(score, record.val_dice_best):
            record.val_dice_best, record.best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(adapted.state_dict())
        else:
            stale += 1
            if stale >= a.patience:
                record.note = f"stopped: no better validation Dice in {a.patience} epochs"
                break
    if validated:
        adapted.load_state_dict(best_state)
    else:
        record.best_epoch = record.epochs_run
        record.note = "adapt.val_fraction is 0: fixed epochs, last kept"
    _finish(adapted, cfg, bank, record)
    return adapted, record


def save_adapted(path: str | Path, model: JRASModel, cfg: JRASConfig, record: Adaptation, **info: Any) -> Path:
    """Write an adapted model as a checkpoint (:func:`jras_core.checkpoint.save_model`) that
    ``jras eval --checkpoint`` reads: its config says ``adapt.norm_stats: false`` (the
    statistics are the site's already) and its ``adaptation`` entry holds ``record`` and ``info``."""
    from jras_core.checkpoint import save_model

    stored = cfg.with_overrides({"adapt.norm_stats": False})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_model(path, model, stored, adaptation={**info, **record.to_dict()})


def _finish(model: JRASModel, cfg: JRASConfig, bank: RetrievalBank | None, record: Adaptation) -> None:
    model.eval()
    if bank is not None and cfg.uses_retrieval:
        bank.refresh(model.retr)
    log.info("site adaptation: %s", ", ".join(f"{k} {v}" for k, v in record.rows()))


__all__ = ["Adaptation", "adapt_site", "holdout_split", "save_adapted", "validation_dice"]
