"""Tests of jras_core.training.lr_schedule and the learning rate the trainer and a site's round use."""

from __future__ import annotations

from itertools import pairwise

import pytest
from tiny_methods import TINY16

from jras_core.config import ConfigError, JRASConfig
from jras_core.models.jras import build_model
from jras_core.training import JRASTrainer
from jras_core.training.lr_schedule import TrainingSpan, lr_factor


def test_cosine_runs_from_one_to_the_final_fraction():
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 1.0) == pytest.approx(0.0)
    assert lr_factor("cosine", 1.0, final_fraction=0.1) == pytest.approx(0.1)
    values = [lr_factor("cosine", p / 10) for p in range(11)]
    assert all(a > b for a, b in pairwise(values))
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_factor("step", 0.5)


def test_a_round_is_placed_by_its_number():
    span = TrainingSpan.of_round(server_round=3, last_round=10, epochs=2)
    assert (span.done, span.total) == (4, 20)
    assert span.progress(0) == pytest.approx(0.2) and span.progress(1, 0.5) == pytest.approx(0.275)
    assert TrainingSpan.of_round(server_round=3, last_round=0, epochs=2) is None  # rounds not known
    assert TrainingSpan.of_round(server_round=0, last_round=10, epochs=2) is None
    with pytest.raises(ValueError, match="done <= total"):
        TrainingSpan(done=5, total=4)


def test_the_schedule_is_a_validated_config_key():
    cfg = JRASConfig().with_overrides({"train.lr_schedule": "cosine", "train.lr_final_fraction": 0.05})
    assert cfg.train.lr_schedule == "cosine"
    with pytest.raises(ConfigError, match="lr_schedule"):
        JRASConfig().with_overrides({"train.lr_schedule": "linear"})
    with pytest.raises(ConfigError, match="lr_final_fraction"):
        JRASConfig().with_overrides({"train.lr_final_fraction": 1.5})


def _rates(trainer: JRASTrainer, epochs: int) -> tuple[list[float], list[float]]:
    """The segmenter's and the retriever's learning rate at each of their optimiser steps."""
    seen: dict[str, list[float]] = {"seg": [], "retr": []}
    for name, opt in (("seg", trainer.seg_opt), ("retr", trainer.retr_opt)):
        step = opt.step

        def spy(*a, _opt=opt, _step=step, _name=name, **k):
            seen[_name].append(_opt.param_groups[0]["lr"])
            return _step(*a, **k)

        opt.step = spy
    trainer.fit(epochs)
    return seen["seg"], seen["retr"]


def test_the_trainer_follows_the_schedule_over_its_epochs(tiny_data):
    train, _ = tiny_data
    base = JRASConfig().with_overrides({**TINY16, "train.batch_size": 8, "contrastive.steps_per_epoch": 2})
    seg, retr = _rates(JRASTrainer(build_model(base), base, train), 2)
    assert set(seg) == {base.train.lr} and set(retr) == {base.contrastive.lr}  # constant: as configured

    cfg = base.with_overrides({"train.lr_schedule": "cosine"})
    seg, retr = _rates(JRASTrainer(build_model(cfg), cfg, train), 2)
    steps = len(seg) // 2
    assert steps >= 4 and seg[0] == pytest.approx(cfg.train.lr)
    assert all(a > b for a, b in pairwise(seg))  # falls at every step
    assert seg[steps] == pytest.approx(cfg.train.lr / 2)  # the second of two epochs starts half-way
    assert seg[-1] < 0.02 * cfg.train.lr
    assert retr[0] == pytest.approx(cfg.contrastive.lr)
    assert retr[-1] < retr[0] and max(retr) <= cfg.contrastive.lr


def test_a_federated_round_takes_its_rates_from_its_place(tiny_data):
    train, _ = tiny_data
    cfg = JRASConfig().with_overrides({**TINY16, "train.batch_size": 8, "train.lr_schedule": "cosine",
                                       "contrastive.steps_per_epoch": 2})
    last = TrainingSpan.of_round(server_round=10, last_round=10, epochs=1)
    seg, _ = _rates(JRASTrainer(build_model(cfg), cfg, train, span=last), 1)
    assert max(seg) == pytest.approx(cfg.train.lr * lr_factor("cosine", 0.9))
    assert min(seg) < 0.02 * cfg.train.lr  # near zero at the end
