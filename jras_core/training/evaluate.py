"""Evaluation with the diagnostics every J-RAS evaluation reports.

Beside Dice / HD95 (per class, per volume) with retrieved guides, it reports:
``guide_dice`` (retrieval quality: mean Dice between the query's mask and its
guides' masks), ``dice_oracle`` (guides chosen by true-mask similarity: the
ceiling of any retriever), ``dice_random`` (random guides: does the segmenter
use its guides at all?) and ``dice_noguide`` (the pass-1 prediction).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from jras_core.config import JRASConfig
from jras_core.data.augment import BatchIntensityAugment
from jras_core.data.slices import SliceSet
from jras_core.device import autocast, module_device
from jras_core.metrics import dice_per_class, summarise, volume_metrics
from jras_core.models.batching import inference_batch_size
from jras_core.models.jras import JRASModel
from jras_core.postprocess import postprocess
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.finder import GuideFinder, Guides

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(
    model: JRASModel,
    slices: SliceSet,
    cfg: JRASConfig,
    bank: RetrievalBank | None = None,
    source: str = "retrieved",
    exclude_own_case: bool = True,
    batch_size: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, list[Guides]]:
    """Predict labels ``(N, S, S)`` for every slice, post-processed as ``cfg.postprocess`` says.

    Args:
        source: ``retrieved`` (``retrieval.test_draws`` guide sets, ``retrieval.test_passes``
            rounds, ``augment.test_views`` extra views; for a model without retrieval, its
            prediction with those views), ``oracle``, ``random`` or ``none`` (no guides).
        exclude_own_case: never use a guide from the query's own case (or volume, as
            the bank's ``exclude`` says; needed when the bank contains the evaluated cases).
        batch_size: slices per forward (default:
            :func:`~jras_core.models.batching.inference_batch_size` of the slice size).

    Returns:
        predictions and, per batch, the guides used (the top K where several sets are
        drawn; empty list for ``none``), on the CPU. The model computes on its own device
        (where it was placed) in ``train.precision``.
    """
    model.eval()
    use_guides = cfg.uses_retrieval and source != "none"
    if use_guides and bank is None:
        raise ValueError("a retrieval method needs a bank to evaluate")
    finder = GuideFinder(model, bank, cfg, torch.Generator().manual_seed(seed)) if use_guides else None
    owners = bank.owner_keys(slices) if finder is not None and exclude_own_case else None
    views = cfg.augment.test_views if source == "retrieved" else 0
    augment = BatchIntensityAugment(cfg.augment, seed=seed) if views else None
    preds, used = [], []
    batch_size = batch_size or inference_batch_size(int(slices.images.shape[-1]))
    for start in range(0, len(slices), batch_size):
        images = slices.images[start : start + batch_size]
        guides = None
        if finder is None:
            scores = _plain_logits(model, images, cfg)
        else:
            names = owners[start : start + batch_size] if owners is not None else None
            truth = slices.masks[start : start + batch_size].long()
            if source == "retrieved":
                scores, guides = _retrieved_probs(model, finder, images, names, cfg)
            else:
                guides, _ = finder.find(images, names, source=source, true_masks=truth)
                scores = _guided_logits(model, images, guides, cfg)
            used.append(guides)
        if augment is not None:  # the primary prediction: retrieved guides, or a plain model's logits
            probs = scores if finder is not None else torch.softmax(scores, dim=1)
            scores = _with_views(model, images, guides, probs, augment, views, cfg)
        preds.append(scores.argmax(dim=1))  # logits or probabilities
    return postprocess(torch.cat(preds), slices, cfg.postprocess, cfg.labels.num_classes), used


def _retrieved_probs(
    model: JRASModel, finder: GuideFinder, images: torch.Tensor, owners: list[str] | None, cfg: JRASConfig
) -> tuple[torch.Tensor, Guides]:
    """Class probabilities ``(B, C, H, W)`` for ``images`` with retrieved guides, and the top-K
    guides of the last round: ``retrieval.test_passes`` rounds of retrieval, each after the
    first retrieving with the previous round's prediction; in each, the softmax averaged over
    ``retrieval.test_draws`` guide sets."""
    r = cfg.retrieval
    probs = None
    for _ in range(r.test_passes):
        if r.test_draws > 1:
            sets = finder.find_draws(images, r.test_draws, owners, probs=probs)
            probs = torch.stack([torch.softmax(_guided_logits(model, images, g, cfg), dim=1) for g in sets]).mean(0)
            guides = sets[0]
        else:
            guides, _ = finder.find(images, owners, probs=probs)
            probs = torch.softmax(_guided_logits(model, images, guides, cfg), dim=1)
    return probs, guides


def _with_views(
    model: JRASModel, images: torch.Tensor, guides: Guides | None, probs: torch.Tensor,
    augment: BatchIntensityAugment, views: int, cfg: JRASConfig,
) -> torch.Tensor:
    """Class probabilities ``(B, C, H, W)`` averaged over the unchanged queries (``probs``) and
    ``views`` intensity-changed views of them (``augment.test_views``). Under
    ``augment.guides: shared`` each query and its guides share one change, as in phase A;
    otherwise the guides keep their bank appearance."""
    total = probs.clone()
    for _ in range(views):
        if guides is None:
            logits = _plain_logits(model, augment(images), cfg)
        elif cfg.augment.guides == "shared":
            changed = augment(torch.cat([images, guides.images.flatten(1, 2)], dim=1))  # (B, 1 + K, H, W)
            logits = _guided_logits(model, changed[:, :1], guides.with_images(changed[:, 1:].unsqueeze(2)), cfg)
        else:
            logits = _guided_logits(model, augment(images), guides, cfg)
        total += torch.softmax(logits, dim=1)
    return total / (views + 1)


def _plain_logits(model: JRASModel, images: torch.Tensor, cfg: JRASConfig) -> torch.Tensor:
    """The segmenter's ``(B, C, H, W)`` float32 CPU output for ``images`` without guides."""
    device = module_device(model.seg)
    with autocast(device, cfg.train.precision):
        logits = model.seg(images.to(device), guide_present=torch.zeros(len(images), dtype=torch.bool, device=device))
    return logits.float().cpu()


def _guided_logits(model: JRASModel, images: torch.Tensor, guides: Guides, cfg: JRASConfig) -> torch.Tensor:
    """The segmenter's ``(B, C, H, W)`` float32 CPU output for ``images`` with ``guides``
    (computed on the model's device in ``train.precision``)."""
    device = module_device(model.seg)
    g = guides.to(device)
    with autocast(device, cfg.train.precision):
        logits = model.seg(images.to(device), g.images, g.masks, g.sims, g.present)
    return logits.float().cpu()


def guide_quality(slices: SliceSet, guides: list[Guides], num_classes: int) -> float:
    """Mean Dice between each query's true mask and its (aligned) guides' masks."""
    vals = []
    start = 0
    for g in guides:
        b, k = g.idx.shape
        truth = slices.masks[start : start + b].long().repeat_interleave(k, dim=0)
        d = dice_per_class(g.masks.flatten(0, 1), truth, num_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            per_pair = np.nanmean(d.numpy(), axis=1)
        vals.append(per_pair[(g.idx >= 0).flatten().numpy()])
        start += b
    flat = np.concatenate(vals) if vals else np.array([])
    return float(np.nanmean(flat)) if flat.size else float("nan")


def evaluate(
    model: JRASModel,
    slices: SliceSet,
    cfg: JRASConfig,
    bank: RetrievalBank | None = None,
    diagnostics: bool = True,
    exclude_own_case: bool = True,
    seed: int = 0,
    use_guides: bool = True,
) -> dict[str, float]:
    """Volume Dice/HD95 per class and the retrieval diagnostics, as a flat dict of floats.

    ``use_guides=False`` scores a retrieval method's guide-free prediction (a site that
    decided against its guides: :func:`~jras_core.training.adapt.choose_guides`); the
    diagnostics still describe its guides.

    Keys: ``dice_mean``, ``dice_<class>``, ``hd95_mean``, ``hd95_<class>``, ``slice_dice_mean``,
    ``num_slices``, ``num_volumes`` and, for retrieval methods, ``guides_used`` (1 or 0),
    ``guide_dice``, ``dice_oracle``, ``dice_random``, ``dice_noguide``.
    """
    names = cfg.labels.names
    c = cfg.labels.num_classes
    pred, guides = predict(model, slices, cfg, bank, "retrieved" if use_guides else "none", exclude_own_case,
                           seed=seed)
    if cfg.uses_retrieval and not use_guides and diagnostics:  # the guides it would have used
        _, guides = predict(model, slices, cfg, bank, "retrieved", exclude_own_case, seed=seed)
    vol = volume_metrics(pred, slices, c)
    out = summarise(vol["dice"], names, "dice")
    out.update(summarise(vol["hd95"], names, "hd95"))
    out["slice_dice_mean"] = summarise(dice_per_class(pred, slices.masks.long(), c).numpy(), names, "d")["d_mean"]
    out["num_slices"] = float(len(slices))
    out["num_volumes"] = float(len(vol["dice"]))
    if cfg.uses_retrieval:
        out["guides_used"] = float(use_guides)
    if cfg.uses_retrieval and diagnostics:
        out["guide_dice"] = guide_quality(slices, guides, c)
        for source in ("oracle", "random", "none"):
            p, _ = predict(model, slices, cfg, bank, source, exclude_own_case, seed=seed)
            key = "dice_noguide" if source == "none" else f"dice_{source}"
            out[key] = summarise(volume_metrics(p, slices, c, hd95=False)["dice"], names, "d")["d_mean"]
    return out
