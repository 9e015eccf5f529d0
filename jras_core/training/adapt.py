"""Adapting a trained model to a new site without training: normalisation statistics.

A site that never trained (a held-out vendor) has no normalisation statistics of its
own; under FedBN the federation never even produced shared ones. :func:`recalibrate_norm`
re-estimates the running mean and variance of every batch-norm layer from the site's
own images (AdaBN), in the same two passes that inference takes: pass 1 without guides
(segmenter, then the retriever on the image and the pass-1 prediction), pass 2 with the
guides retrieved from the site's bank. Only statistics change; no weight is trained.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from jras_core.config import JRASConfig
from jras_core.data.slices import SliceSet
from jras_core.device import autocast, module_device
from jras_core.models.jras import JRASModel
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.finder import GuideFinder

log = logging.getLogger(__name__)

BatchNorms = (nn.modules.batchnorm._BatchNorm,)


def _norm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, BatchNorms) and m.track_running_stats]


def _collect(module: nn.Module, layers: list[nn.modules.batchnorm._BatchNorm]) -> None:
    """Eval mode everywhere except the batch-norm layers, which accumulate statistics."""
    module.eval()
    for m in layers:
        m.train()


@torch.no_grad()
def recalibrate_norm(
    model: JRASModel,
    slices: SliceSet,
    cfg: JRASConfig,
    bank: RetrievalBank | None = None,
    batch_size: int = 32,
) -> int:
    """Re-estimate the batch-norm statistics of ``model`` on ``slices`` (AdaBN), in place.

    Args:
        model: the model; its weights are not changed.
        slices: the site's images ``(N, 1, H, W)`` (labels are not used).
        cfg: method configuration (whether and how guides are retrieved).
        bank: the site's bank (retrieval methods); refreshed with the recalibrated retriever.
        batch_size: images per forward pass.

    Returns:
        the number of batch-norm layers recalibrated (0: nothing to do).
    """
    seg_layers, retr_layers = _norm_layers(model.seg), _norm_layers(model.retr)
    if not seg_layers and not retr_layers:
        return 0
    if len(slices) == 0:
        raise ValueError("recalibrate_norm needs at least one image")
    momentum = {m: m.momentum for m in (*seg_layers, *retr_layers)}
    for m in momentum:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch seen
    device = module_device(model.seg)
    precision = cfg.train.precision
    batches = [slices.images[i : i + batch_size].to(device) for i in range(0, len(slices), batch_size)]
    # pass 1: segmenter without guides
    _collect(model.seg, seg_layers)
    with autocast(device, precision):
        for images in batches:
            model.seg(images, guide_present=torch.zeros(images.shape[0], dtype=torch.bool, device=device))
    model.seg.eval()
    if cfg.uses_retrieval and bank is not None:
        finder = GuideFinder(model, bank, cfg)
        # the retriever on what it sees at inference: bank entries and queries
        _collect(model.retr, retr_layers)
        with autocast(device, precision):
            for start in range(0, len(bank), batch_size):
                model.retr(bank.retriever_input(slice(start, start + batch_size), model.retr.in_channels).to(device))
            for images in batches:
                probs = finder.first_pass(images) if finder.needs_first_pass else None
                model.retr(finder.query_input(images, probs))
        model.retr.eval()
        bank.refresh(model.retr)
        # pass 2: segmenter with the guides retrieved by the recalibrated model
        for images in batches:
            guides, _ = finder.find(images)
            g = guides.to(device)
            _collect(model.seg, seg_layers)
            with autocast(device, precision):
                model.seg(images, g.images, g.masks, g.sims, g.present)
            model.seg.eval()
    model.eval()
    for m, value in momentum.items():
        m.momentum = value
    log.info("recalibrated %d batch-norm layers on %d images", len(seg_layers) + len(retr_layers), len(slices))
    return len(seg_layers) + len(retr_layers)


def adapt_to_site(model: JRASModel, slices: SliceSet, cfg: JRASConfig, bank: RetrievalBank | None = None) -> JRASModel:
    """The model a site that never trained evaluates with, as ``cfg.adapt`` says: ``model``
    itself, or (``adapt.norm_stats``) a copy with batch-norm statistics re-estimated on the
    site's ``slices`` (:func:`recalibrate_norm`; ``bank`` is refreshed with the copy's retriever)."""
    if not cfg.adapt.norm_stats:
        return model
    adapted = copy.deepcopy(model)
    recalibrate_norm(adapted, slices, cfg, bank)
    return adapted


@dataclass(frozen=True)
class GuideChoice:
    """Whether a held-out site predicts with guides, and the support-case Dice behind it."""

    use_guides: bool
    dice_guided: float
    dice_noguide: float


def choose_guides(model: JRASModel, support: SliceSet, cfg: JRASConfig, bank: RetrievalBank | None) -> GuideChoice:
    """Decide on a site's own annotated ``support`` slices whether its guides help.

    Each support slice is predicted twice: with guides retrieved from ``bank`` (the site's
    bank over those same support slices; the query's own case excluded, or its own volume
    only at a one-patient site: ``retrieval.exclude``) and without guides. Guides are kept
    when their mean volume Dice is at least the guide-free one. ``adapt.guides`` ``always``
    and ``never`` decide without predicting; so does a method without retrieval (no guides).
    """
    from jras_core.metrics import summarise, volume_metrics
    from jras_core.training.evaluate import predict

    mode = cfg.adapt.guides
    if not cfg.uses_retrieval or bank is None or mode != "auto":
        use = cfg.uses_retrieval and bank is not None and mode != "never"
        return GuideChoice(use, float("nan"), float("nan"))
    scores = {}
    for source in ("retrieved", "none"):
        pred, _ = predict(model, support, cfg, bank, source, exclude_own_case=True)
        dice = volume_metrics(pred, support, cfg.labels.num_classes, hd95=False)["dice"]
        scores[source] = summarise(dice, cfg.labels.names, "d")["d_mean"]
    use = bool(scores["retrieved"] >= scores["none"])
    log.info("support cases: Dice %.3f with guides, %.3f without: %s", scores["retrieved"], scores["none"],
             "guides kept" if use else "predicting without guides")
    return GuideChoice(use, scores["retrieved"], scores["none"])


__all__ = ["GuideChoice", "adapt_to_site", "choose_guides", "recalibrate_norm"]
