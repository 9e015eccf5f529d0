"""Tests of jras_core.training.adapt: a site's choice of guides on its support cases."""

from __future__ import annotations

import pytest
import torch
from tiny_methods import TINY16

from jras_core.config import JRASConfig
from jras_core.models import build_model
from jras_core.training import JRASTrainer, evaluate


@pytest.mark.slow
def test_a_site_drops_guides_that_hurt_on_its_support_cases(tiny_data):
    from jras_core.retrieval.bank import RetrievalBank
    from jras_core.training.adapt import choose_guides

    train, support = tiny_data
    cfg = JRASConfig().with_overrides({**TINY16, "segmenter.guide_path": "residual", "adapt.guides": "auto"})
    model = build_model(cfg)
    JRASTrainer(model, cfg, train).fit(3)
    bank = RetrievalBank(support, cfg.labels.num_classes)
    bank.refresh(model.retr)
    with torch.no_grad():  # a head that wrecks every guided prediction
        model.seg.head_out.bias.copy_(torch.tensor([50.0, -50.0, -50.0, -50.0]))
    choice = choose_guides(model, support, cfg, bank)
    assert not choice.use_guides and choice.dice_guided < choice.dice_noguide
    with torch.no_grad():  # guided = guide-free: a tie keeps the guides
        model.seg.head_out.weight.zero_()
        model.seg.head_out.bias.zero_()
    assert choose_guides(model, support, cfg, bank).use_guides
    assert not choose_guides(model, support, cfg.with_overrides({"adapt.guides": "never"}), bank).use_guides
    always = choose_guides(model, support, cfg.with_overrides({"adapt.guides": "always"}), bank)
    assert always.use_guides and always.dice_guided != always.dice_guided  # nan: nothing predicted
    plain = evaluate(model, support, cfg, bank, diagnostics=False, use_guides=False)
    assert plain["guides_used"] == 0.0
    assert plain["dice_mean"] == pytest.approx(evaluate(model, support, cfg, bank)["dice_noguide"])
