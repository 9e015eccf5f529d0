"""Tests of jras_core.training.finetune: a site's adaptation with its annotated cases (AdaBN,
fine-tuning with early stopping, the best checkpoint from epoch 0 on)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_methods import TINY16

from jras_core.config import JRASConfig
from jras_core.data.slices import build_slice_set
from jras_core.data.synthetic import generate_volumes
from jras_core.models import build_model
from jras_core.retrieval.bank import RetrievalBank
from jras_core.training import JRASTrainer
from jras_core.training.adapt import recalibrate_norm
from jras_core.training.finetune import adapt_site, holdout_split, validation_dice

CFG = JRASConfig().with_overrides(TINY16)


@pytest.fixture(scope="module")
def site_slices():
    """Four synthetic vendor-D cases (ED and ES each): a site the model never trained on."""
    return build_slice_set(generate_volumes("D", num_cases=4, seed=5, size=64), CFG.preprocess, CFG.labels.num_classes)


@pytest.fixture(scope="module")
def trained_model(tiny_data):
    """A tiny J-RAS model trained a little on vendor A."""
    torch.manual_seed(0)
    model = build_model(CFG)
    JRASTrainer(model, CFG, tiny_data[0]).fit(3)
    return model


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_holdout_split_by_case_then_volume_then_nothing(site_slices):
    fit, val, unit = holdout_split(site_slices, 0.3, seed=1)
    fit_cases, val_cases = set(fit.case_ids.tolist()), set(val.case_ids.tolist())
    assert unit == "case" and len(val_cases) == 1 and len(fit_cases) == 3 and not fit_cases & val_cases
    assert len(fit) + len(val) == len(site_slices)
    again = holdout_split(site_slices, 0.3, seed=1)[1]
    assert set(again.case_ids.tolist()) == val_cases  # deterministic in the seed
    assert {frozenset(holdout_split(site_slices, 0.3, seed=s)[1].case_ids.tolist()) for s in range(8)} != {
        frozenset(val_cases)}  # and the seed matters
    # at least one case on each side, whatever the fraction
    assert len(set(holdout_split(site_slices, 0.99, seed=0)[0].case_ids.tolist())) == 1
    # one case: one of its volumes is held out
    one = site_slices.select_cases([site_slices.cases[0]])
    fit, val, unit = holdout_split(one, 0.3, seed=0)
    assert unit == "volume" and len(set(val.volume_ids.tolist())) == 1
    assert not set(fit.volume_ids.tolist()) & set(val.volume_ids.tolist())
    # one volume, or no validation asked for: nothing held out
    volume = one.subset(torch.nonzero(one.volume_ids == one.volume_ids[0]).flatten())
    assert holdout_split(volume, 0.3, seed=0)[2] == "none" and len(holdout_split(volume, 0.3, seed=0)[1]) == 0
    fit, val, unit = holdout_split(site_slices, 0.0, seed=0)
    assert unit == "none" and len(fit) == len(site_slices) and len(val) == 0


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(trained_model, site_slices):
    cfg = CFG.with_overrides({"adapt.epochs": 6, "adapt.patience": 2, "adapt.lr": 1e-3})
    start = _weights(trained_model)
    adapted, record = adapt_site(trained_model, site_slices, cfg, RetrievalBank(site_slices, 4))
    assert all(torch.equal(v, start[k]) for k, v in trained_model.state_dict().items())  # the global model is untouched
    scores = record.val_dice
    assert record.holdout == "case" and record.fit_cases == 3 and record.val_cases == 1
    assert len(scores) == record.epochs_run + 1 and 1 <= record.epochs_run <= 6
    assert record.best_epoch == int(np.argmax(scores)) and record.val_dice_best == pytest.approx(max(scores))
    assert record.val_dice_start == scores[0] and record.val_dice_best >= record.val_dice_start
    if record.epochs_run < 6:  # stopped early: the last `patience` epochs were no better
        assert record.epochs_run - record.best_epoch == 2 and "stopped" in record.note
    # the returned weights are the best epoch's: they score its held-out Dice again
    fit, val, _ = holdout_split(site_slices, cfg.adapt.val_fraction, cfg.train.seed)
    fit_bank = RetrievalBank(fit, 4, cfg.retrieval.index, cfg.retrieval.exclude)
    assert validation_dice(adapted, val, cfg, fit_bank) == pytest.approx(record.val_dice_best, abs=1e-6)


@pytest.mark.slow
def test_fine_tuning_that_only_hurts_returns_the_unadapted_start(trained_model, tiny_data):
    """A learning rate that wrecks the segmenter: the adaptation keeps epoch 0, i.e. the
    model after AdaBN, and is never worse on its held-out cases than not fine-tuning."""
    cfg = CFG.with_overrides({"adapt.epochs": 3, "adapt.patience": 2, "adapt.lr": 5.0})
    site_slices = tiny_data[1]  # cases of the vendor the model trained on: a start worth keeping
    adapted, record = adapt_site(trained_model, site_slices, cfg, None)
    assert record.val_dice_start > 0.05  # a model worth keeping
    assert record.best_epoch == 0 and record.val_dice_best == record.val_dice_start
    assert max(record.val_dice[1:]) < record.val_dice_start and record.epochs_run == 2
    reference = build_model(cfg)
    reference.load_state_dict(trained_model.state_dict())
    recalibrate_norm(reference, site_slices, cfg, RetrievalBank(site_slices, 4))
    expected = reference.state_dict()
    for key, value in adapted.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value.cpu(), expected[key], atol=1e-5), key


@pytest.mark.slow
def test_a_one_case_site_holds_out_a_volume_and_a_one_volume_site_is_not_fine_tuned(trained_model, site_slices):
    cfg = CFG.with_overrides({"adapt.epochs": 2, "adapt.patience": 2})
    one = site_slices.select_cases([site_slices.cases[1]])
    # by default a one-case site is not fine-tuned (AdaBN only)
    adapted, record = adapt_site(trained_model, one, cfg, RetrievalBank(one, 4, exclude="auto"))
    assert record.epochs_run == 0 and "fewer than adapt.min_cases (2)" in record.note
    params = dict(trained_model.named_parameters())
    assert all(torch.equal(p.cpu(), params[k].cpu()) for k, p in adapted.named_parameters())
    # min_cases 1: one of its volumes picks the epoch
    cfg = cfg.with_overrides({"adapt.min_cases": 1})
    adapted, record = adapt_site(trained_model, one, cfg, RetrievalBank(one, 4, exclude="auto"))
    assert record.holdout == "volume" and record.fit_cases == 1 and record.val_cases == 1
    assert record.epochs_run >= 1 and math.isfinite(record.val_dice_best)
    assert record.val_dice_best >= record.val_dice_start
    volume = one.subset(torch.nonzero(one.volume_ids == one.volume_ids[0]).flatten())
    adapted, record = adapt_site(trained_model, volume, cfg, None)
    assert record.holdout == "none" and record.epochs_run == 0 and "not fine-tuned" in record.note
    assert all(torch.equal(p.cpu(), params[k].cpu()) for k, p in adapted.named_parameters())  # AdaBN only


@pytest.mark.slow
def test_fixed_epochs_without_validation(trained_model, site_slices):
    cfg = CFG.with_overrides({"adapt.epochs": 2, "adapt.val_fraction": 0.0, "adapt.norm_stats": False})
    adapted, record = adapt_site(trained_model, site_slices, cfg, None)
    assert record.holdout == "none" and record.epochs_run == 2 and record.best_epoch == 2
    assert math.isnan(record.val_dice_best) and "fixed epochs" in record.note and not record.norm_stats
    params = dict(trained_model.named_parameters())
    assert any(not torch.equal(p.cpu(), params[k].cpu()) for k, p in adapted.named_parameters() if k.startswith("seg."))
    assert all(torch.equal(p.cpu(), params[k].cpu()) for k, p in adapted.named_parameters() if k.startswith("retr."))


def test_an_empty_site_is_refused(site_slices):
    with pytest.raises(ValueError, match="at least one"):
        adapt_site(build_model(CFG), site_slices.subset([]), CFG)
